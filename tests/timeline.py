"""Where the suite's time goes, per xdist worker: with `REFINEVLA_TIMELINE=DIR`, every worker appends one line
per test to `DIR/<worker>.tsv` (start, end, node id with its `@group`); `python -m tests.timeline DIR` prints
each worker's groups in the order they ran (first start, last end, test seconds, tests) and when each
worker finished.

Why: the suite's wall time is the later worker's end, and `--durations` says nothing of which worker ran what
or when; balancing `LONGEST_FIRST` (tests/conftest.py) needs exactly that. Off unless the variable is set.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMELINE = "REFINEVLA_TIMELINE"
_started: dict[str, float] = {}
_writes: list[bool] = [True]


def pytest_configure(config: Any) -> None:
    """xdist's controller sees every worker's reports again: only the workers (or a run without xdist) write."""
    _writes[0] = not (config.getoption("numprocesses", None) and not hasattr(config, "workerinput"))


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _started[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    folder = os.environ.get(TIMELINE)
    if folder and _writes[0]:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # "main": a run without workers (-n 0)
        with (Path(folder) / f"{worker}.tsv").open("a") as fh:
            fh.write(f"{_started.pop(nodeid, time.time()):.2f}\t{time.time():.2f}\t{nodeid}\n")


@dataclass
class Span:
    worker: str
    group: str
    start: float
    end: float
    seconds: float = 0.0
    tests: int = 0


def group_of(nodeid: str) -> str:
    """The `@group` xdist appended to the id (`test[param]@group`), else the test's file."""
    _, at, group = nodeid.rpartition("@")
    return group if at and "]" not in group and "::" not in group else nodeid.split("::")[0]


def spans(folder: Path) -> Iterator[Span]:
    """Consecutive tests of one group on one worker (one file each), as one span each, in the order they ran."""
    for tsv in sorted(folder.glob("*.tsv")):
        rows = sorted((line.split("\t", 2) for line in tsv.read_text().splitlines()), key=lambda r: float(r[0]))
        span: Span | None = None
        for start, end, nodeid in rows:
            group = group_of(nodeid)
            if span is None or span.group != group:
                if span is not None:
                    yield span
                span = Span(tsv.stem, group, float(start), float(end))
            span.end, span.seconds, span.tests = float(end), span.seconds + float(end) - float(start), span.tests + 1
        if span is not None:
            yield span


def report(folder: Path) -> str:
    found = list(spans(folder))
    if not found:
        return f"{folder}: no timeline (run pytest with {TIMELINE}={folder})"
    t0 = min(s.start for s in found)
    lines = [f"{'worker':<7}{'from s':>8}{'to s':>8}{'test s':>8}{'tests':>6}  group"]
    lines += [
        f"{s.worker:<7}{s.start - t0:8.1f}{s.end - t0:8.1f}{s.seconds:8.1f}{s.tests:6d}  {s.group}" for s in found
    ]
    for worker in sorted({s.worker for s in found}):
        lines.append(f"{worker} ended at {max(s.end for s in found if s.worker == worker) - t0:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.timeline DIR")
    print(report(Path(sys.argv[1])))
