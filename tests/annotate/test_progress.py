"""The live display of a run: the rich table on a terminal, log lines otherwise; both follow the counters."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import Callable

from rich.console import Console

from refinevla.annotate.engine import Counters
from refinevla.annotate.progress import show_progress

TITLE = "refine-data annotate"


def counters() -> Counters:
    # An hour in: 7200 answers -> 120 req/min; 3 of 10 episodes asked, 6 left -> ETA 2 h. The clock moves
    # while the test runs, but by seconds, which neither figure shows.
    c = Counters(total=10, annotated=2, cached=1, failed=1, in_flight=3, requests=7200)
    c.prompt_tokens, c.completion_tokens, c.cost = 1000, 200, 0.01
    c.started = time.monotonic() - 3600
    return c


def finish(c: Counters) -> None:
    c.annotated, c.cached, c.rejected, c.failed, c.in_flight = 6, 2, 1, 1, 0
    c.requests, c.prompt_tokens, c.completion_tokens, c.cost = 14400, 12345, 678, 0.1234


def rows(frame: str) -> dict[str, str]:
    """The table's rows, label -> value, from one rendered frame."""
    out = {}
    for line in frame.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 2:
            out[cells[0]] = cells[1]
    return out


def last_frame(text: str) -> dict[str, str]:
    return rows(text.rsplit(TITLE, 1)[-1])


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `condition()` holds (the display refreshes on its own clock and a rich thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the display did not show it in time"
        await asyncio.sleep(0.05)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_rich_table_shows_the_counters_and_follows_them():
    console = Console(file=io.StringIO(), force_terminal=True, record=True, width=120)
    c = counters()

    def shown() -> dict[str, str]:
        return last_frame(console.export_text(clear=False))

    async def drive() -> tuple[dict[str, str], dict[str, str]]:
        task = asyncio.create_task(show_progress(c, live=True, console=console))
        await until(lambda: "ETA" in shown())
        before = shown()
        finish(c)
        await until(lambda: shown().get("episodes") != before["episodes"])  # refreshed while running
        during = shown()
        await stop(task)
        return before, during

    first, updated = asyncio.run(drive())
    assert first["episodes"] == "4 / 10"
    assert first["annotated / cached"] == "2 / 1" and first["rejected / failed / stopped"] == "0 / 1 / 0"
    assert first["in flight"] == "3"
    assert first["tokens (prompt + completion)"] == "1,000 + 200"
    assert first["cost"] == "$0.0100" and first["requests / min"] == "120" and first["ETA"] == "2h00m"
    # Refreshed while running, not only at the end.
    assert updated["episodes"] == "10 / 10"
    assert updated["annotated / cached"] == "6 / 2" and updated["rejected / failed / stopped"] == "1 / 1 / 0"
    assert updated["in flight"] == "0"
    assert updated["tokens (prompt + completion)"] == "12,345 + 678"
    assert updated["cost"] == "$0.1234" and updated["requests / min"] == "240" and updated["ETA"] == "0m00s"
    # Cancelling leaves the final numbers on screen (not transient), and it is a terminal: styled output.
    final = console.export_text()
    assert last_frame(final) == updated
    assert "\x1b[" in console.file.getvalue()  # type: ignore[attr-defined]


def test_plain_mode_prints_a_log_line_per_interval_following_the_counters(capsys):
    c = counters()

    err = ""

    def printed() -> str:
        nonlocal err
        err += capsys.readouterr().err
        return err

    async def drive() -> None:
        task = asyncio.create_task(show_progress(c, live=False, interval=0.05))
        await until(lambda: "\n" in printed())
        finish(c)
        await until(lambda: "episodes 10/10" in printed())
        await stop(task)

    asyncio.run(drive())
    lines = printed().splitlines()
    assert len(lines) >= 2 and all(line.startswith("episodes ") for line in lines)
    assert "\x1b[" not in err  # log lines, no terminal control
    assert "ETA" in err.split("\n", 1)[0] and err.endswith("\n")  # whole lines, flushed
    assert lines[0] == (
        "episodes 4/10: 2 annotated, 1 cached, 0 rejected, 1 failed | in flight 3 | tokens 1000+200 | "
        "cost $0.0100 | 120 req/min | retries 0, re-asks 0 | ETA 2h00m"
    )
    assert lines[-1] == (
        "episodes 10/10: 6 annotated, 2 cached, 1 rejected, 1 failed | in flight 0 | tokens 12345+678 | "
        "cost $0.1234 | 240 req/min | retries 0, re-asks 0 | ETA 0m00s"
    )
