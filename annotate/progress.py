"""The live view of a run: a rich panel on a terminal, plain log lines otherwise (CI, files)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

from .engine import Counters

if TYPE_CHECKING:
    from rich.console import Console


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary_line(c: Counters) -> str:
    total = "?" if c.total is None else str(c.total)
    return (
        f"episodes {c.finished}/{total}: {c.annotated} annotated, {c.cached} cached, {c.rejected} rejected, "
        f"{c.failed} failed | in flight {c.in_flight} | tokens {c.prompt_tokens}+{c.completion_tokens} | "
        f"cost ${c.cost:.4f} | {c.requests_per_minute():.0f} req/min | retries {c.retries}, re-asks {c.reasks} | "
        f"ETA {_eta(c.eta_seconds())}"
    )


def _table(c: Counters) -> Any:
    from rich.table import Table

    t = Table(title="refine-data annotate", show_header=False, expand=False)
    t.add_row("episodes", f"{c.finished} / {'?' if c.total is None else c.total}")
    t.add_row("annotated / cached", f"{c.annotated} / {c.cached}")
    t.add_row("rejected / failed / stopped", f"{c.rejected} / {c.failed} / {c.stopped}")
    t.add_row("in flight", str(c.in_flight))
    t.add_row("tokens (prompt + completion)", f"{c.prompt_tokens:,} + {c.completion_tokens:,}")
    t.add_row("cost", f"${c.cost:,.4f}")
    t.add_row("requests / min", f"{c.requests_per_minute():.0f}")
    t.add_row("retries / re-asks", f"{c.retries} / {c.reasks}")
    t.add_row("ETA", _eta(c.eta_seconds()))
    return t


async def show_progress(counters: Counters, live: bool, interval: float = 5.0, console: Console | None = None) -> None:
    """Refresh until cancelled: a rich Live table when `live`, else a log line every `interval` s.

    The table goes to `console` (default: a rich Console on stderr); the log lines to stderr.
    """
    if live:
        from rich.console import Console
        from rich.live import Live

        out = console if console is not None else Console(stderr=True)
        with Live(_table(counters), console=out, refresh_per_second=4, transient=False) as view:
            try:
                while True:
                    await asyncio.sleep(0.25)
                    view.update(_table(counters))
            except asyncio.CancelledError:
                view.update(_table(counters))
                raise
    else:
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(interval, 1.0))
            if time.monotonic() - last >= interval:
                last = time.monotonic()
                print(summary_line(counters), file=sys.stderr, flush=True)
