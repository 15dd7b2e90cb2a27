"""A real `refine-data annotate` process killed with SIGKILL, or interrupted with SIGINT, mid-run."""

from __future__ import annotations

import json
import signal

import polars as pl

from tests.annotate.conftest import SECRET, answered, wait_for_answers
from tests.annotate.conftest import start_annotate as start


def seed(episode_id: str) -> int:
    return int(episode_id.rsplit("#", 1)[-1])


def test_kill_9_then_rerun_never_asks_again_for_a_committed_answer(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(12)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    proc = start(uri, teacher_server.url, out)
    wait_for_answers(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    committed = {seed(e) for e in answered(out)}
    assert 3 <= len(committed) < 12
    before = len(teacher_server.requests)

    rerun = start(uri, teacher_server.url, out)
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    asked_again = {r.seed for r in teacher_server.requests[before:]}
    assert not asked_again & committed, "a committed answer was paid for twice"
    assert asked_again | committed == set(range(12))
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 12 and manifest["counts"]["cached"] == len(committed)
    assert pl.read_parquet(out / "episodes").height == 12
    assert SECRET not in err


def test_sigint_finishes_writes_and_exits_130_with_the_resume_command(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(12)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    proc = start(uri, teacher_server.url, out)
    wait_for_answers(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Resume with: refine-data annotate" in err and "--base-url" in err
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["stop_reason"] == "interrupted"
    # Whatever was answered (including the requests in flight at Ctrl-C) is in the written files.
    written = set(pl.read_parquet(out / "episodes")["episode_id"])
    assert written == answered(out) and 2 <= len(written) < 12
