"""One run per output: real `refine-data annotate` processes on one OUT, a killed holder, shards
sharing an OUT while `merge` waits for them, a file given as --out, and a disk that fills mid-run."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from refinevla.annotate.outputs import LOCK_DIR, LOCK_NAME, read_holder
from refinevla.annotate.publish.validate import validate_dataset
from tests.annotate.conftest import SECRET, start_annotate, wait_for_answers


def answer_rows(out: Path, store: str = "store.sqlite") -> list[str]:
    with sqlite3.connect(out / LOCK_DIR / store) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM answers")]


def wait_for_holder(proc: subprocess.Popen[str], lock: Path, deadline: float = 60.0) -> None:
    t0 = time.monotonic()
    while (holder := read_holder(lock)) is None or holder.pid != proc.pid:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline, "the run never took its lock"
        time.sleep(0.05)


def refine_data(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    cmd = [sys.executable, "-m", "refinevla.annotate.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_a_second_run_on_the_same_out_is_refused_and_the_first_finishes(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(10)
    out = tmp_path / "out"
    teacher_server.latency = 0.2
    first = start_annotate(uri, teacher_server.url, out)
    wait_for_answers(first, out, 1)

    second = start_annotate(uri, teacher_server.url, out)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: --out {out} is in use by pid {first.pid} on ")
    assert "refine-data annotate" in lines[0] and "give another --out" in lines[0]
    assert SECRET not in err

    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    keys = answer_rows(out)
    assert len(keys) == 10 == len(set(keys))
    assert len(teacher_server.requests) == 10  # every request asked (and paid for) once
    report = validate_dataset(str(out))
    assert report.ok, report.errors
    assert report.episodes == 10


def test_kill_9_of_the_holder_leaves_no_lock_behind(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(8)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    first = start_annotate(uri, teacher_server.url, out)
    wait_for_answers(first, out, 2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    holder = read_holder(out / LOCK_DIR / LOCK_NAME)
    assert holder is not None and holder.pid == first.pid  # the file stays; the lock died with the process

    rerun = start_annotate(uri, teacher_server.url, out)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert validate_dataset(str(out)).ok
    assert read_holder(out / LOCK_DIR / LOCK_NAME).pid == rerun.pid  # type: ignore[union-attr]


def test_shards_share_an_out_and_merge_waits_for_them(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(8)
    out = tmp_path / "out"
    teacher_server.released.clear()  # both shards stay in flight until the refusals are seen
    shard0 = start_annotate(uri, teacher_server.url, out, "--shard", "0/2")
    shard1 = start_annotate(uri, teacher_server.url, out, "--shard", "1/2")
    try:
        wait_for_holder(shard0, out / LOCK_DIR / f"{LOCK_NAME}-00000-of-00002")
        wait_for_holder(shard1, out / LOCK_DIR / f"{LOCK_NAME}-00001-of-00002")
        # the same shard twice is refused; merge (the whole folder) is refused while shards write
        again = start_annotate(uri, teacher_server.url, out, "--shard", "0/2")
        _, err = again.communicate(timeout=60)
        assert again.returncode == 1 and f"in use by pid {shard0.pid}" in err, err
        merged = refine_data("merge", str(out))
        assert merged.returncode == 1 and "Traceback" not in merged.stderr
        assert "is in use by" in merged.stderr and f"pid {shard0.pid}" in merged.stderr
    finally:
        teacher_server.released.set()
        for proc in (shard0, shard1):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    assert not (out / "refinevla.json").exists()
    merged = refine_data("merge", str(out))
    assert merged.returncode == 0, merged.stderr
    assert validate_dataset(str(out)).ok
    assert len(teacher_server.requests) == 8


def test_out_that_is_a_file_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = refine_data("annotate", "sample", "--out", str(afile), "--limit", "1")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --out {afile}: is a file, not a folder; give a folder path"]
    assert afile.read_text() == "x"
    r = refine_data("annotate", "sample", "--out", str(afile / "below"), "--limit", "1")
    assert r.returncode == 1 and "a parent of it is a file" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real size-limited filesystem (tmpfs) at `path`; needs root (skips the caller otherwise)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root; the injected-ENOSPC test covers this path")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_that_fills_mid_run_is_one_line_and_the_rerun_with_room_pays_nothing_twice(
    tiny_rlds, teacher_server, tmp_path
):
    uri = tiny_rlds(25)
    teacher_server.latency = 0.02
    with small_disk(tmp_path / "disk", "256k") as disk:
        out = disk / "out"
        proc = start_annotate(uri, teacher_server.url, out)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("error: disk full writing ") and str(disk) in lines[0]
        assert " free of " in lines[0] and "run the same command again" in lines[0]
        assert not list(out.rglob("*.partial")), "a half-written file was left behind"
        committed = set(answer_rows(out))
        asked = len(teacher_server.requests)
        assert 0 < len(committed) < 25
        assert asked - len(committed) <= 4  # it stopped asking at the first answer it could not store

        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        rerun = start_annotate(uri, teacher_server.url, out)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        assert len(teacher_server.requests) - asked == 25 - len(committed)  # only what was never committed
        assert set(answer_rows(out)) >= committed
        assert validate_dataset(str(out)).ok


def test_disk_full_in_the_store_injected(tiny_rlds, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: SQLite's "database or disk is full" raised at the store's write."""
    from typer.testing import CliRunner

    from refinevla.annotate.cli import app
    from refinevla.annotate.store import ResultStore

    uri = tiny_rlds(6)
    out = tmp_path / "out"
    real = ResultStore.commit_answer
    calls = {"n": 0}

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResultStore, "commit_answer", full)
    r = CliRunner().invoke(app, ["annotate", uri, "--out", str(out), "--progress", "none"])
    assert r.exit_code == 1, r.output
    assert "error: disk full writing " in r.output and str(out) in r.output and "Traceback" not in r.output
    assert not list(out.rglob("*.partial")) and not (out / "data").exists()
    assert len(answer_rows(out)) == 3
    monkeypatch.setattr(ResultStore, "commit_answer", real)
    r = CliRunner().invoke(app, ["annotate", uri, "--out", str(out), "--progress", "none"])
    assert r.exit_code == 0, r.output
    assert validate_dataset(str(out)).ok


# --------------------------------------------------------------------------- network filesystems


def test_the_filesystem_type_is_read_from_the_mount_table():
    from refinevla.annotate.outputs import filesystem_type

    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) is not None


def test_a_network_filesystem_is_named_in_a_warning(tmp_path, monkeypatch, capsys):
    from refinevla.annotate import outputs

    monkeypatch.setattr(outputs, "filesystem_type", lambda path: "nfs4")
    with outputs.hold_output(tmp_path / "out", "test"):
        pass
    err = capsys.readouterr().err
    assert "is on nfs4" in err and "lock manager" in err and "--shard" in err


def test_a_filesystem_that_refuses_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from refinevla.annotate import outputs

    def refuse(fd, op):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with outputs.hold_output(tmp_path / "out", "test") as out:
        assert outputs.held_outputs() == [out]
    assert "refuses file locks" in capsys.readouterr().err
    assert outputs.held_outputs() == []


@pytest.mark.parametrize("command", [["push", "--repo-id", "org/name", "--dry-run"], ["card"], ["merge"]])
def test_publishing_commands_are_refused_while_a_run_holds_the_folder(tmp_path, command):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from refinevla.annotate.outputs import hold_output\n"
            f"with hold_output(Path({str(out)!r}), 'refine-data annotate (the run)'):\n"
            "    print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = refine_data(command[0], str(out), *command[1:])
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"is in use by pid {holder.pid} on " in r.stderr and "refine-data annotate (the run)" in r.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
