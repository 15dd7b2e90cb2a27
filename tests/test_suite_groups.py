"""The suite's own split over pytest-xdist's workers (tests/conftest.py): a session fixture that costs
seconds to minutes is built by one worker, a file's tests share its module fixtures, the longest group starts
first, and every process runs one OpenMP thread. Checked on this very session's collection."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

from tests.conftest import LONGEST_FIRST, SHARED_FIXTURE_GROUPS


def group_of(item: pytest.Item) -> str:
    marks = [m.args[0] for m in item.iter_markers("xdist_group")]
    assert len(marks) == 1, (item.nodeid, marks)
    return marks[0]


def whole_suite(request: pytest.FixtureRequest) -> bool:
    """The README's test command collects everything (each xdist worker too); a run of some files checks less."""
    files = {i.location[0] for i in request.session.items}
    return {"tests/evaluate/test_closed_loop.py", "tests/annotate/test_ray_backend.py"} <= files


def test_every_test_has_one_group_and_a_file_never_spans_two(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    groups_of_file: dict[str, set[str]] = defaultdict(set)
    for item in items:
        groups_of_file[item.location[0]].add(group_of(item))
    assert all(len(g) == 1 for g in groups_of_file.values()), {f: g for f, g in groups_of_file.items() if len(g) > 1}


def test_a_costly_session_fixture_lives_in_one_group(request: pytest.FixtureRequest) -> None:
    for fixture, group in SHARED_FIXTURE_GROUPS:
        users = {group_of(i) for i in request.session.items if fixture in getattr(i, "fixturenames", ())}
        # a file using two costly fixtures goes with the first listed; every other user is in the fixture's group
        others = users - {group} - {g for _, g in SHARED_FIXTURE_GROUPS}
        assert not others, (fixture, others)
    ray_users = {i.location[0] for i in request.session.items if "ray_cluster" in getattr(i, "fixturenames", ())}
    if whole_suite(request):
        # (test_ray_vllm.py's driver tests run in test_ray_backend.py's pytest of their own: deselected here)
        assert {"tests/annotate/test_ray_backend.py", "tests/evaluate/test_ray_eval.py"} <= ray_users


def test_the_longest_groups_come_first(request: pytest.FixtureRequest) -> None:
    ranks = [
        LONGEST_FIRST.index(g) if (g := group_of(i)) in LONGEST_FIRST else len(LONGEST_FIRST)
        for i in request.session.items
    ]
    assert ranks == sorted(ranks)
    if whole_suite(request):
        assert group_of(request.session.items[0]) == "simulator-demos"  # the closed loop's, the longest
        closed_loop = [i for i in request.session.items if i.location[0] == "tests/evaluate/test_closed_loop.py"]
        assert {group_of(i) for i in closed_loop} == {"simulator-demos"}  # on the session's demos


def test_each_process_runs_one_openmp_thread() -> None:
    assert os.environ["OMP_NUM_THREADS"] == "1"
    torch = pytest.importorskip("torch")
    assert torch.get_num_threads() == 1


def test_the_scheduler_groups_by_the_marks(request: pytest.FixtureRequest) -> None:
    """What `--dist loadgroup` schedules by is the node id's `@group` suffix, which pytest-xdist writes from the
    marks; with pytest 9.2 it was silently lost and every test went its own way (tests/conftest.py stops such
    a run at collection; this checks the suffix where a test runs)."""
    if not request.config.getoption("loadgroup", False):  # an xdist worker's: set from the controller's --dist
        pytest.skip("not under pytest-xdist's --dist loadgroup (the README's test command is)")
    assert request.node.nodeid.endswith("@" + group_of(request.node)), request.node.nodeid
