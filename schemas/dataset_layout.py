"""The published dataset's on-disk layout (= what is pushed), spelled once, and its manifest.

```
OUT/
  data/train-*.parquet        one row per step
  episodes/train-*.parquet    one row per episode
  README.md                   dataset card
  refinevla.json              manifest: source, teacher, model, prompt, schema, counts, tokens, cost
  .refine/                    store, rejects, locks, shard manifests: private, never uploaded
```

Why here, in `refinevla.schemas`: the layout is a contract between every package that touches a
published dataset — annotate writes it, the card renderer (`refinevla.datacards`, which may not
import annotate) reads it, training reads it — and `schemas` is the bottom package all of them may
import. Like the rationale schema next to it, the layout is data, not behaviour: constants and a few
path functions, no dependencies beyond the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "refinevla.json"  # the run's manifest
CARD = "README.md"  # the dataset card (YAML front matter + body)
STEPS_DIR = "data"  # step rows
EPISODES_DIR = "episodes"  # episode rows
PRIVATE_DIR = ".refine"  # the annotate store, rejects, locks and shard manifests: never uploaded
SPLIT = "train"  # the one split a refinevla dataset has
# The Parquet files of each table, relative to OUT: also the card's `data_files` patterns, so what
# `datasets.load_dataset(OUT)` loads is what validation, the card's statistics and training read.
STEP_FILES = f"{STEPS_DIR}/{SPLIT}-*.parquet"
EPISODE_FILES = f"{EPISODES_DIR}/{SPLIT}-*.parquet"
# A shard's manifest, `.refine/manifest-0000i-of-0000n.json`: merged into MANIFEST by `refine-data merge`.
SHARD_MANIFESTS = f"{PRIVATE_DIR}/manifest-*-of-*.json"


def part_name(i: int, n: int) -> str:
    """The file name of part `i` of `n` of a table (`train-00000-of-00001.parquet`), the same in both dirs."""
    return f"{SPLIT}-{i:05d}-of-{n:05d}.parquet"


def step_files(out: Path) -> list[Path]:
    """The step tables' Parquet files under `out`, in name (= part) order."""
    return sorted(out.glob(STEP_FILES))


def episode_files(out: Path) -> list[Path]:
    """The episode tables' Parquet files under `out`, in name (= part) order."""
    return sorted(out.glob(EPISODE_FILES))


def manifest_path(out: str | Path) -> Path:
    return Path(out) / MANIFEST


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of `out`. Raises FileNotFoundError when there is none (callers say what to run)."""
    return json.loads(manifest_path(out).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def write_manifest(out: str | Path, manifest: dict[str, Any], name: str = MANIFEST) -> Path:
    """Write a manifest atomically (tmp + rename): a crash never leaves half a manifest.

    `name` is relative to `out`: MANIFEST, or a shard's under PRIVATE_DIR.
    """
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
