"""`annotate --processes P`: worker processes, one store, the same output as one process."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from contextlib import redirect_stderr
from pathlib import Path

import polars as pl
import pytest

from refinevla.annotate.commands.annotate import AnnotateArgs, PartResult, run_annotate
from refinevla.annotate.errors import RefineError
from refinevla.annotate.outputs import hold_output
from refinevla.annotate.parallel import merge_parts, split_range
from refinevla.annotate.processes import AUTO_MAX_PROCESSES, EPISODES_PER_PROCESS, choose_processes, parse_processes
from tests.annotate.test_crash_resume import SECRET, answered, seed, start, wait_for_answers


def run(uri: str, url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = start(uri, url, out, *extra)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_split_range_is_contiguous_and_complete() -> None:
    assert split_range(10, 17, 3) == [(10, 12), (12, 14), (14, 17)]
    assert split_range(0, 2, 4) == [(0, 1), (1, 2)]  # never an empty part


def test_merged_parts_sum_and_keep_the_most_serious_stop() -> None:
    def part(annotated: int, stop: str | None) -> PartResult:
        return PartResult(
            counters={"total": 5, "annotated": annotated, "cost": 0.5},
            statuses={"annotated": annotated},
            reject_reasons={"schema": 1},
            counts={"episodes": annotated, "steps": 10 * annotated},
            stop_reason=stop,
        )

    merged = merge_parts([part(2, None), part(3, "max-cost"), part(1, "interrupted")])
    assert merged.counters["annotated"] == 6 and merged.counters["total"] == 15 and merged.counters["cost"] == 1.5
    assert merged.counts == {"episodes": 6, "steps": 60} and merged.reject_reasons == {"schema": 3}
    assert merged.stop_reason == "interrupted"


def test_processes_write_what_one_process_writes_and_a_rerun_with_other_p_pays_nothing(
    tiny_rlds, teacher_server, tmp_path
):
    uri = tiny_rlds(9)
    many, one = tmp_path / "many", tmp_path / "one"
    r = run(uri, teacher_server.url, many, "--processes", "3")
    assert r.returncode == 0, r.stderr
    asked = [q.seed for q in teacher_server.requests]
    assert sorted(asked) == list(range(9))  # every episode asked exactly once across the workers
    assert run(uri, teacher_server.url, one).returncode == 0
    for sub, order in (("data", ["episode_id", "step"]), ("episodes", ["episode_id"])):
        # rows are written as episodes finish, so compare in a fixed order
        a = pl.read_parquet(many / sub / "train-00000-of-00001.parquet").sort(order)
        b = pl.read_parquet(one / sub / "train-00000-of-00001.parquet").sort(order)
        assert a.height > 0 and a.equals(b), sub
    assert sorted(p.name for p in (many / ".refine").iterdir()) == ["lock", "rejects.jsonl", "store.sqlite"]
    manifest = json.loads((many / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 9 and manifest["this_run"]["requests"] == 9
    assert manifest["this_run"]["processes"] == 3

    before = len(teacher_server.requests)
    again = run(uri, teacher_server.url, many, "--processes", "2")
    assert again.returncode == 0, again.stderr
    assert len(teacher_server.requests) == before
    assert json.loads((many / "refinevla.json").read_text())["counts"]["cached"] == 9
    assert SECRET not in r.stderr + again.stderr


def _two_workers_answering(tiny_rlds, teacher_server, tmp_path) -> tuple[str, Path, subprocess.Popen[str]]:
    """A run of 16 episodes with 2 processes, once 2 answers are committed: (source, OUT, the command)."""
    uri = tiny_rlds(16)
    out = tmp_path / "out"
    teacher_server.latency = 0.3
    proc = start(uri, teacher_server.url, out, "--processes", "2")
    wait_for_answers(proc, out, 2)
    return uri, out, proc


def test_ctrl_c_stops_every_worker_and_the_rerun_resumes(tiny_rlds, teacher_server, tmp_path):
    uri, out, proc = _two_workers_answering(tiny_rlds, teacher_server, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Resume with: refine-data annotate" in err
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["stop_reason"] == "interrupted"
    committed = {seed(e) for e in answered(out)}
    written = {seed(e) for e in pl.read_parquet(out / "episodes")["episode_id"]}
    assert written == committed and 2 <= len(committed) < 16
    before = len(teacher_server.requests)
    teacher_server.latency = 0.0
    rerun = run(uri, teacher_server.url, out, "--processes", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert not {q.seed for q in teacher_server.requests[before:]} & committed
    assert pl.read_parquet(out / "episodes").height == 16


def test_a_refused_key_in_one_worker_stops_them_all(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(12)
    teacher_server.default = "401"
    r = run(uri, teacher_server.url, tmp_path / "out", "--processes", "2")
    assert r.returncode == 1
    assert "refused the credentials" in r.stderr and "Traceback" not in r.stderr and SECRET not in r.stderr
    assert len(teacher_server.requests) <= 4  # each worker stops at its first refusal


@pytest.mark.parametrize(
    ("teacher", "episodes", "cores", "expected"),
    [
        ("openai-compatible", 10_000, 2, 2),  # a self-hosted server: one process per core
        ("openai-compatible", 10_000, 16, 4),  # ... at most AUTO_MAX_PROCESSES
        ("openai-compatible", 600, 16, 2),  # ... each with EPISODES_PER_PROCESS episodes or more
        ("openai-compatible", 12, 2, 1),  # a small run: a worker's start-up would cost more than it saves
        ("openai", 10_000, 16, 1),  # a hosted API: its rate limit is shared by every process
        ("gemini", 10_000, 16, 1),
        ("vllm", 10_000, 16, 1),  # the local engine holds its GPUs in one process
        ("rule-based", 10_000, 16, 1),  # nothing to wait for
    ],
)
def test_auto_processes_follow_the_cores_and_the_teacher(teacher, episodes, cores, expected) -> None:
    assert AUTO_MAX_PROCESSES == 4 and EPISODES_PER_PROCESS == 256
    choice = choose_processes("auto", teacher, episodes, cores=cores)
    assert choice.count == expected and choice.requested == "auto"
    assert choice.line().startswith(f"annotate: {expected} engine process")


def test_a_number_of_processes_is_used_as_given_and_a_run_that_is_one_process_picks_one() -> None:
    assert choose_processes("3", "openai", 10, cores=1).count == 3
    alone = choose_processes("auto", "openai-compatible", 10_000, cores=8, alone="--batch: one process")
    assert alone.count == 1 and "--batch" in alone.why
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(RefineError, match="--processes must be auto or a number of at least 1"):
            parse_processes(bad)


def test_auto_processes_are_printed_first_and_recorded_in_the_manifest(
    tiny_rlds, teacher_server, tmp_path, monkeypatch
):
    monkeypatch.setattr("refinevla.annotate.processes.EPISODES_PER_PROCESS", 4)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    out = tmp_path / "out"
    args = AnnotateArgs(
        source=tiny_rlds(9),
        teacher="openai-compatible",
        base_url=teacher_server.url,
        model="fake-model",
        out=out,
        progress="none",
        license="mit",
    )
    assert args.processes == "auto"  # the default
    with redirect_stderr(io.StringIO()) as err:
        assert run_annotate(args) == 0
    assert err.getvalue().splitlines()[0] == "annotate: 2 engine processes (auto: openai-compatible server, 2 cores)"
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["this_run"]["processes"] == 2
    assert manifest["backend"] == {
        "name": "local",
        "processes": 2,
        "processes_chosen": "auto: openai-compatible server, 2 cores",
    }
    assert sorted(q.seed for q in teacher_server.requests) == list(range(9))


def test_a_bad_processes_value_is_one_line(tiny_rlds, teacher_server, tmp_path):
    r = run(tiny_rlds(2), teacher_server.url, tmp_path / "out", "--processes", "many")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--processes must be auto or a number of at least 1, not 'many'" in r.stderr


def test_workers_do_not_keep_the_output_locked_after_their_parent_is_killed(tiny_rlds, teacher_server, tmp_path):
    uri, out, proc = _two_workers_answering(tiny_rlds, teacher_server, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # forked workers share the parent's open lock file unless they close it: the lock must die with the parent
    with hold_output(out, "test"):
        pass
    committed = {seed(e) for e in answered(out)}
    teacher_server.latency = 0.0
    rerun = run(uri, teacher_server.url, out, "--processes", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert pl.read_parquet(out / "episodes").height == 16
    assert committed <= {seed(e) for e in answered(out)}


def test_workers_are_spawned_where_a_fork_would_not_be_safe(monkeypatch) -> None:
    import sys
    import threading

    from refinevla.annotate.parallel import worker_context

    assert worker_context("vllm").get_start_method() == "spawn"  # its worker loads its own engine
    monkeypatch.setitem(sys.modules, "torch", sys.modules["json"])  # a library with native thread pools, loaded
    assert worker_context("openai-compatible").get_start_method() == "spawn"
    monkeypatch.delitem(sys.modules, "torch")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:  # a running thread: a forked child would hold a copy of it stopped half-way
        assert worker_context("openai-compatible").get_start_method() == "spawn"
    finally:
        stop.set()
        thread.join()
