"""Combine the shards of a multi-machine run (`annotate --shard i/n`) into one dataset.

Each machine writes its own Parquet part (`data/train-i-of-n.parquet`), store and manifest
(`.refine/manifest-i-of-n.json`). Once every shard's files are in one OUT (a shared file
system, or copied with `--from`), `refine-data merge OUT` checks that the shards belong to
the same run (source, teacher, model, prompt, schema) and that none is missing, and writes
the run's `refinevla.json` and dataset card, as a one-machine run does.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ..schemas.dataset_layout import (
    EPISODE_FILES,
    EPISODES_DIR,
    PRIVATE_DIR,
    SHARD_MANIFESTS,
    STEP_FILES,
    STEPS_DIR,
    part_name,
)
from .errors import RefineError

_MANIFEST = re.compile(r"manifest-(\d{5})-of-(\d{5})\.json")
# What must agree between shards for them to be one dataset.
_IDENTITY = (
    ("source", "uri"),
    ("source", "dataset"),
    ("source", "split"),
    ("source", "layout"),
    ("teacher", "name"),
    ("teacher", "model"),
    ("teacher", "sampling"),
    ("prompt", "sha256"),
    ("schema", "id"),
    ("schema", "sha256"),
    ("frames", "count"),
    ("frames", "max_side"),
)
_SUMMED = ("episodes", "steps", "selected", "annotated_this_run", "cached", "rejected", "failed", "not_done")


def gather(out: Path, sources: list[Path]) -> None:
    """Copy other machines' shard outputs (Parquet parts, manifests, rejects, stores) into `out`."""
    for src in sources:
        if not (src / PRIVATE_DIR).is_dir():
            raise RefineError(f"{src}: not an annotate output (no {PRIVATE_DIR}/ directory)")
        for pattern in (
            STEP_FILES,
            EPISODE_FILES,
            SHARD_MANIFESTS,
            f"{PRIVATE_DIR}/rejects-*-of-*.jsonl",
            f"{PRIVATE_DIR}/store-*-of-*.sqlite",
        ):
            for f in src.glob(pattern):
                target = out / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


def shard_manifests(out: Path) -> tuple[int, list[dict[str, Any]]]:
    """The shard manifests in `out`, ordered; every shard 0..n-1 must be there."""
    found: dict[int, tuple[int, Path]] = {}
    for f in sorted(out.glob(SHARD_MANIFESTS)):
        m = _MANIFEST.fullmatch(f.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), f)
    if not found:
        raise RefineError(
            f"{out}: no shard manifests ({PRIVATE_DIR}/manifest-i-of-n.json); was it run with --shard i/n?"
        )
    totals = {n for n, _ in found.values()}
    if len(totals) != 1:
        splits = ", ".join(f"of {n}" for n in sorted(totals))
        raise RefineError(f"{out}: shard manifests of different splits ({splits})")
    n = totals.pop()
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise RefineError(
            f"{out}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; run them, or copy their output here "
            "with --from DIR"
        )
    manifests = [json.loads(found[i][1].read_text(encoding="utf-8")) for i in range(n)]
    for i, m in enumerate(manifests):
        for table in (STEPS_DIR, EPISODES_DIR):
            if not (out / table / part_name(i, n)).is_file():
                raise RefineError(f"{out}: {table}/{part_name(i, n)} of shard {i}/{n} is missing")
        for a, b in _IDENTITY:
            if m.get(a, {}).get(b) != manifests[0].get(a, {}).get(b):
                raise RefineError(
                    f"{out}: shard {i}/{n} has {a}.{b} = {m.get(a, {}).get(b)!r} but shard 0/{n} has "
                    f"{manifests[0].get(a, {}).get(b)!r}: not the same run"
                )
    return n, manifests


def merge_manifests(manifests: list[dict[str, Any]], created: str, version: str) -> dict[str, Any]:
    """One manifest for the whole run: identity from shard 0, counts, tokens and cost summed."""
    n = len(manifests)
    first = manifests[0]
    counts: dict[str, Any] = {k: sum(int(m["counts"].get(k, 0)) for m in manifests) for k in _SUMMED}
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m["counts"].get("reject_reasons", {}))
    counts["reject_reasons"] = dict(reasons)
    stops = [m.get("stop_reason") for m in manifests if m.get("stop_reason")]
    return {
        **first,
        "refinevla_version": version,
        "created": created,
        "selection": {
            "shard": f"all {n}",
            "start": min(m["selection"]["start"] for m in manifests),
            "stop": max(m["selection"]["stop"] for m in manifests),
            "limit": first["selection"].get("limit"),
        },
        "counts": counts,
        "tokens": {k: sum(int(m["tokens"].get(k, 0)) for m in manifests) for k in ("prompt", "completion", "requests")},
        "cost_usd": round(sum(float(m.get("cost_usd", 0.0)) for m in manifests), 6),
        "this_run": None,
        "shards": [
            {
                "shard": m["selection"]["shard"],
                "created": m.get("created"),
                "episodes": m["counts"]["episodes"],
                "complete": m.get("complete"),
            }
            for m in manifests
        ],
        "complete": all(m.get("complete") for m in manifests),
        "stop_reason": stops[0] if stops else None,
    }
