"""`annotate --processes P`: several engine processes on one machine, one run.

One engine process tops out at a few hundred requests per second (Python, one core); a
fast local server (vLLM, SGLang) can take more. P worker processes each annotate a
contiguous part of the selection with 1/P of the concurrency, request and token rates and
remaining budget, all writing answers into the run's one SQLite store (WAL is safe across
processes on one machine). Their Parquet parts are concatenated into the same files a
single-process run writes, so the output, the store and a resumed run are the same whatever
P was: a rerun with another P pays nothing twice.

Ctrl-C reaches the parent, which forwards a stop to every worker (SIGUSR1); a worker whose
parent disappears (kill -9) stops dispatching on its own. Either way nothing committed is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import time
import traceback
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..schemas.dataset_layout import PRIVATE_DIR
from .errors import RefineError

if TYPE_CHECKING:
    from .part import AnnotateArgs, PartResult, RunSetup

STOP_SIGNAL = signal.SIGUSR1  # parent -> worker: stop dispatching (a second one cancels in-flight requests)


def split_range(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty sub-ranges of [start, stop), in order."""
    n = stop - start
    bounds = [start + k * n // parts for k in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def worker_args(args: AnnotateArgs, parts: int, budget: float | None) -> AnnotateArgs:
    """Each worker's share of the limits, so that together they respect the user's."""
    return replace(
        args,
        concurrency=max(1, math.ceil(args.concurrency / parts)),
        rpm=args.rpm / parts if args.rpm else args.rpm,
        tpm=args.tpm / parts if args.tpm else args.tpm,
        max_cost=budget,
        progress="none",
        processes="1",
    )


def _worker(args: AnnotateArgs, start: int, stop: int, index: int, rows_root: str, queue: Any) -> None:
    """Entry point of a worker process: run one part, report through `queue`."""
    from .part import run_part, setup_run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it forwards STOP_SIGNAL
    parent = os.getppid()

    def report(counters: Any) -> None:
        snapshot = asdict(counters)
        snapshot.pop("started", None)
        queue.put(("progress", index, snapshot))
        if os.getppid() != parent:  # orphaned (parent killed): stop spending
            os.kill(os.getpid(), STOP_SIGNAL)

    try:
        setup = setup_run(args)
        part = run_part(
            args, setup, start, stop, Path(rows_root), live_progress=False, stop_signal=STOP_SIGNAL, on_counters=report
        )
        queue.put(("done", index, part))
    except RefineError as exc:
        queue.put(("error", index, str(exc)))
    except BaseException:
        queue.put(("crash", index, traceback.format_exc()))


# teachers whose workers may be forked: HTTP clients and the rule-based one load nothing native in this process
# (a vLLM teacher's worker loads its own engine: spawned, as before)
FORKABLE_TEACHERS = frozenset({"openai-compatible", "openai", "gemini", "rule-based"})
NATIVE_THREAD_MODULES = ("tensorflow", "torch", "jax", "vllm")  # loaded here: spawn (a fork copies no threads)


def worker_context(teacher: str) -> Any:
    """How workers start: forked from this process once it has imported what a worker runs, where that is
    safe (Linux, no thread started yet, no library with native thread pools loaded, a teacher that loads no
    engine here), else spawned (a fresh interpreter each).

    A spawned worker imports everything again (the source's reader, the HTTP client, pyarrow: ~1.5 s of
    CPU each, measured to be most of a 2,560-request run's difference between 1 and 2 processes on 2
    cores); a forked one starts at once. The lock on OUT is not inherited (`outputs`), nor any store
    connection (none is open here), so a worker forked or spawned behaves the same.
    """
    import multiprocessing as mp
    import sys
    import threading

    if sys.platform != "linux" or threading.active_count() > 1 or teacher not in FORKABLE_TEACHERS:
        return mp.get_context("spawn")
    if any(name in sys.modules for name in NATIVE_THREAD_MODULES):  # their pools are invisible to `threading`
        return mp.get_context("spawn")
    import pyarrow as pa

    from . import engine, store, writer  # noqa: F401  (imported for the workers)

    pa.array([""], type=pa.string())  # pyarrow's one-time import of pandas, as DatasetWriter pays it
    if teacher in ("openai-compatible", "openai", "gemini"):
        import openai  # noqa: F401

        from .teachers import openai_compat  # noqa: F401
    if threading.active_count() > 1:  # an import started a thread: a fork would copy it half-way
        return mp.get_context("spawn")
    return mp.get_context("fork")


def run_processes(args: AnnotateArgs, setup: RunSetup) -> PartResult:
    """Run the selection in `setup.processes` worker processes; merge their parts into `setup.out`."""
    from .engine import Counters
    from .store import ResultStore

    ranges = split_range(setup.start, setup.stop, setup.processes.count)
    parts = len(ranges)
    budget = args.max_cost
    if budget is not None:
        with ResultStore(setup.store_path) as store:
            prior = store.spend().cost
        budget = prior + max(0.0, budget - prior) / parts  # each worker's engine adds the prior spend it reads
    wargs = worker_args(args, parts, budget)
    parts_root = setup.out / PRIVATE_DIR / f"parts{setup.suffix}"
    shutil.rmtree(parts_root, ignore_errors=True)  # rows of a crashed run: rebuilt from the store
    total = Counters(total=setup.total)  # the run's clock starts before the workers do
    ctx = worker_context(setup.teacher.name)
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(wargs, a, b, k, str(parts_root / f"part-{k:03d}"), queue),
            name=f"refinevla-annotate-{k}",
            daemon=True,
        )
        for k, (a, b) in enumerate(ranges)
    ]
    for proc in procs:
        proc.start()

    snapshots: dict[int, dict[str, Any]] = {}
    results: dict[int, PartResult] = {}
    errors: list[tuple[str, str]] = []

    def absorb(kind: str, index: int, payload: Any) -> None:
        if kind == "progress":
            snapshots[index] = payload
            for f in fields(Counters):
                if f.name not in ("total", "started"):
                    setattr(total, f.name, sum(s[f.name] for s in snapshots.values()))
        elif kind == "done":
            results[index] = payload
            absorb("progress", index, payload.counters)
        else:
            errors.append((kind, payload))
            stop_workers()  # one worker's fatal error (a refused key) is every worker's

    def stop_workers() -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, STOP_SIGNAL)

    async def supervise() -> None:
        from .progress import show_progress

        loop = asyncio.get_running_loop()

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop_workers)
        live = args.progress == "rich" or (args.progress == "auto" and os.isatty(2))
        display = asyncio.create_task(show_progress(total, live)) if args.progress != "none" else None
        try:
            while len(results) + len(errors) < parts:
                try:
                    message = await loop.run_in_executor(None, queue.get, True, 0.5)
                except Exception:  # queue.Empty: check the workers are still there
                    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead and len(results) + len(errors) < parts:
                        missing = parts - len(results) - len(errors)
                        if len(dead) >= missing:
                            errors.append(("crash", f"{dead[0].name} exited with code {dead[0].exitcode}"))
                            break
                    continue
                absorb(*message)
        finally:
            if display is not None:
                display.cancel()
                await asyncio.gather(display, return_exceptions=True)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(supervise())
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    if errors:
        kind, message = errors[0]
        if kind == "error":
            raise RefineError(message)
        raise RuntimeError(f"an annotation worker process failed:\n{message}")
    merged = merge_parts([results[k] for k in sorted(results)])
    merged.seconds = time.monotonic() - total.started
    concat_parquet_parts([parts_root / f"part-{k:03d}" for k in range(parts)], setup.out)
    shutil.rmtree(parts_root, ignore_errors=True)
    return merged


def merge_parts(parts: list[PartResult]) -> PartResult:
    """Sum what the workers did; the run stopped for the most serious reason any worker stopped for."""
    from collections import Counter

    from .part import PartResult

    counters: dict[str, Any] = {}
    for p in parts:
        for k, v in p.counters.items():
            counters[k] = v if k == "total" else counters.get(k, 0) + v
    counters["total"] = sum(p.counters.get("total") or 0 for p in parts)
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for p in parts:
        statuses.update(p.statuses)
        reasons.update(p.reject_reasons)
        failures.update(p.failure_reasons)
        counts.update(p.counts)
    stops = [p.stop_reason for p in parts if p.stop_reason]
    stop_reason = next((r for r in ("interrupted", "max-cost") if r in stops), stops[0] if stops else None)
    return PartResult(
        counters=counters,
        statuses=dict(statuses),
        reject_reasons=dict(reasons),
        failure_reasons=dict(failures),
        counts={"episodes": counts["episodes"], "steps": counts["steps"]},
        stop_reason=stop_reason,
        seconds=max((p.seconds for p in parts), default=0.0),
    )


def concat_parquet_parts(part_dirs: list[Path], out: Path) -> None:
    """Concatenate each worker's `data/` and `episodes/` files (same names) into `out`, in part order."""
    import pyarrow.parquet as pq

    for sub in ("data", "episodes"):
        names = sorted({f.name for d in part_dirs for f in (d / sub).glob("*.parquet")})
        for name in names:
            files = [d / sub / name for d in part_dirs if (d / sub / name).is_file()]
            target = out / sub / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name("." + name + ".partial")
            schema = pq.read_schema(files[0])
            with pq.ParquetWriter(tmp, schema) as writer:
                for f in files:
                    pf = pq.ParquetFile(f)
                    for g in range(pf.num_row_groups):
                        writer.write_table(pf.read_row_group(g))
            os.replace(tmp, target)
