"""`refine-data annotate --batch` and `refine-data batches OUT`: batch mode as the CLI drives it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...schemas.dataset_layout import PRIVATE_DIR
from ..batch.provider import BatchProvider
from ..batch.runner import REASK_MODES, BatchOptions, BatchRunner, BatchSummary
from ..errors import RefineError
from ..processes import parse_processes

BATCH_TEACHERS = ("openai", "gemini")
GEMINI_OPENAI_SUFFIX = "/v1beta/openai/"  # live mode's Gemini endpoint; the Batch API lives at the host's root


def make_batch_provider(teacher: Any) -> BatchProvider:
    """The Batch API of the teacher's provider, with the teacher's model, sampling and key."""
    if teacher.name == "openai":
        from ..batch.openai import OpenAIBatch

        return OpenAIBatch(teacher)
    if teacher.name == "gemini":
        from ..batch.gemini import GeminiBatch

        base = str(teacher.base_url)
        native = base[: -len(GEMINI_OPENAI_SUFFIX)] + "/" if base.endswith(GEMINI_OPENAI_SUFFIX) else base
        default = "https://generativelanguage.googleapis.com/"
        return GeminiBatch(teacher, base_url=None if native == default else native)
    raise _not_batchable(teacher.name)


def _not_batchable(name: str) -> RefineError:
    return RefineError(f"--batch works with --teacher {' or '.join(BATCH_TEACHERS)} (their Batch APIs), not {name!r}")


def check_batch_args(args: Any, teacher: Any) -> None:
    """Refuse flag combinations batch mode cannot honour, before anything is sent."""
    if teacher.name not in BATCH_TEACHERS:
        raise _not_batchable(teacher.name)
    if (parse_processes(args.processes) or 1) > 1:
        raise RefineError("--batch runs in one process (the provider answers in parallel); drop --processes")
    if args.reask not in REASK_MODES:
        raise RefineError(f"--reask must be one of {', '.join(REASK_MODES)}, not {args.reask!r}")
    if args.max_resubmits < 0 or args.poll_interval <= 0:
        raise RefineError("--max-resubmits must be >= 0 and --poll-interval > 0")


def run_batch_mode(args: Any, setup: Any, progress: Callable[[str], None]) -> BatchSummary:
    """Fill the run's store through the Batch API (rounds until nothing is left to ask)."""
    from ..engine import Engine
    from ..store import ResultStore

    provider = make_batch_provider(setup.teacher)
    store = ResultStore(setup.store_path)
    try:
        engine = Engine(setup.teacher, store, setup.options, setup.prices)
        options = BatchOptions(
            reask=args.reask,
            poll_interval=args.poll_interval,
            max_resubmits=args.max_resubmits,
            max_requests=args.batch_requests,
        )
        runner = BatchRunner(provider, engine, store, options, setup.out / PRIVATE_DIR / "batches", progress)
        return runner.run(lambda: setup.read(setup.start, setup.stop))
    finally:
        provider.close()
        store.close()


def batch_manifest(summary: BatchSummary, args: Any, provider: str) -> dict[str, Any]:
    """The manifest's `batch` entry: the run used the provider's Batch API and its prices."""
    return {
        "provider": provider,
        "pricing": "batch",
        "reask": args.reask,
        "this_run": {
            "rounds": summary.rounds,
            "batches_submitted": summary.batches_submitted,
            "requests_submitted": summary.requests_submitted,
            "answers": summary.answered,
            "invalid_answers": summary.invalid,
            "rejected": summary.rejected,
            "line_errors": dict(summary.line_errors),
            "given_up": summary.given_up,
        },
    }


def store_paths(out: Path) -> list[Path]:
    paths = sorted((out / PRIVATE_DIR).glob("store*.sqlite"))
    if not paths:
        raise RefineError(f"{out}: no annotation store (.refine/store*.sqlite); is this a refine-data output folder?")
    return paths


def list_batches(out: Path, cancel: bool = False) -> list[dict[str, Any]]:
    """Every batch of a run's stores (as dicts for printing); with `cancel`, cancel those not final."""
    from ..batch.provider import FINAL_STATES
    from ..store import ResultStore
    from ..teachers import make_teacher

    rows: list[dict[str, Any]] = []
    providers: dict[tuple[str, str, str | None], BatchProvider] = {}  # one client per provider, model and URL
    try:
        for path in store_paths(out):
            with ResultStore(path) as store:
                batches = store.batches()
            for b in batches:
                row = {
                    "store": path.name,
                    "tag": b.tag,
                    "provider": b.provider,
                    "model": b.model,
                    "batch_id": b.batch_id,
                    "state": b.state,
                    "provider_status": b.provider_status,
                    "requests": b.requests,
                    "counts": b.counts,
                    "estimate_usd": round(b.estimate, 6),
                }
                if cancel and b.batch_id and b.state not in (*FINAL_STATES, "ingested"):
                    which = (b.provider, b.model, b.base_url)
                    if which not in providers:
                        teacher = make_teacher(b.provider, model=b.model, base_url=b.base_url)
                        providers[which] = make_batch_provider(teacher)
                    providers[which].cancel(b.batch_id)
                    row["cancelled"] = True
                rows.append(row)
    finally:
        for provider in providers.values():
            provider.close()
    return rows


def format_batches(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no batches (this run did not use --batch)"
    lines = []
    for r in rows:
        counts = json.dumps(r["counts"], sort_keys=True) if r["counts"] else "{}"
        flag = " (cancel requested)" if r.get("cancelled") else ""
        lines.append(
            f"{r['tag']}  {r['provider']}  {r['batch_id'] or '-'}  {r['state']}"
            f" ({r['provider_status'] or '-'})  {r['requests']} requests  {counts}  ~${r['estimate_usd']:.4f}{flag}"
        )
    return "\n".join(lines)
