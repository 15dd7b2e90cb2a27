"""A real `refine-data annotate` process killed with SIGKILL, or interrupted with SIGINT, mid-run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

SECRET = "sk-test-crash-SECRET-99"


def start(uri: str, url: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "refinevla.annotate.cli",
        "annotate",
        uri,
        "--teacher",
        "openai-compatible",
        "--base-url",
        url,
        "--model",
        "fake-model",
        "--out",
        str(out),
        "--concurrency",
        "2",
        "--progress",
        "plain",
        *extra,
    ]
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def answered(out: Path) -> set[str]:
    db = out / ".refine" / "store.sqlite"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db) as conn:
            return {row[0] for row in conn.execute("SELECT episode_id FROM answers")}
    except sqlite3.OperationalError:  # tables not created yet
        return set()


def wait_for_answers(proc: subprocess.Popen[str], out: Path, n: int, deadline: float = 60.0) -> None:
    t0 = time.monotonic()
    while len(answered(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline, "the run made no progress"
        time.sleep(0.05)


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
