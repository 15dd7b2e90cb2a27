"""A test that runs long leaves the stacks of every process it waits on in its report.

Why: a subprocess that hangs (a simulator, a Ray driver, a training run) is killed by its test's timeout, and
all the report then says is `TimeoutExpired` with the child's last output lines: where it waited is gone with
it. One such hang was seen once (`refine-eval demos`, the session's demos fixture, after its first episode,
with three pytest-xdist workers) and did not come back in 20 tries. So while a test (its setup, call and
teardown together) runs longer than `WATCHDOG_S`, this dumps, every `WATCHDOG_S`, the Python (and native) stacks of the
worker's descendant processes with py-spy (the `[dev]` extra), and a test that then fails carries them as a
report section ("watchdog"). A test that passes shows nothing; a dump costs about a second per process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path

import pytest

# the closed loop, the slowest test, takes 210-250 s under load: a dump during it costs a second per process
WATCHDOG_S = float(os.environ.get("REFINEVLA_WATCHDOG_S", "240"))
DUMP_TIMEOUT_S = 30  # per process: py-spy attaches with ptrace and reads every thread's stack


def descendants(pid: int) -> list[int]:
    """The pids under `pid` (children first, then theirs), from /proc; empty where /proc has no children file."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


def dump_stacks(pids: list[int]) -> str:
    """py-spy's dump of each process (native frames too: a hang in a C library shows where), one after another."""
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, also when its bin/ is not on PATH
    spy = str(beside) if beside.is_file() else shutil.which("py-spy")
    if spy is None:
        return "py-spy is not installed (the [dev] extra): no stacks"
    parts = []
    for pid in pids:
        head = f"--- pid {pid}: {command_line(pid)[:300]}"
        try:
            r = subprocess.run(
                [spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S
            )
            body = (r.stdout or r.stderr).strip()
        except subprocess.TimeoutExpired:
            body = f"(py-spy did not answer in {DUMP_TIMEOUT_S} s)"
        parts.append(f"{head}\n{body}")
    return "\n".join(parts)


class Watchdog:
    """Dumps the stacks of this process's descendants every `every` seconds until stopped."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.dumps: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="refinevla-test-watchdog", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=DUMP_TIMEOUT_S * 4)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            pids = descendants(os.getpid())
            elapsed = time.monotonic() - self._started
            stacks = dump_stacks(pids) if pids else "(no child process)"
            self.dumps.append(f"after {elapsed:.0f} s, {len(pids)} descendant processes:\n{stacks}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    with Watchdog(WATCHDOG_S) as dog:
        item.stash[WATCHDOG_DUMPS] = dog.dumps
        yield


WATCHDOG_DUMPS = pytest.StashKey[list[str]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    dumps = item.stash.get(WATCHDOG_DUMPS, [])
    if report.failed and dumps:
        report.sections.append(("watchdog: the stacks of the processes the test waited on", "\n\n".join(dumps)))
