"""An annotated output opened for reading: a local OUT folder, or a Hub dataset ORG/NAME fetched (its manifest and
Parquet files only), with its reject reasons; an episode's rows are read when asked for.

One way to open an output for every command that reads one (`refine-data view`, `refine-data audit`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schemas.dataset_layout import EPISODE_FILES, MANIFEST, PRIVATE_DIR, STEP_FILES, manifest_path, read_manifest
from .errors import RefineError


@dataclass
class Annotated:
    """An OUT: its manifest and reject reasons; an episode's rows are read when it is logged (a dataset
    of a million steps is never loaded to show a few episodes)."""

    root: Path
    manifest: dict[str, Any]
    rejects: dict[str, str]

    def _rows(self, pattern: str, episode_id: str) -> list[dict[str, Any]]:
        import polars as pl

        files = sorted(self.root.glob(pattern))
        if not files:
            return []
        rows = pl.scan_parquet(files).filter(pl.col("episode_id") == episode_id).collect()
        return rows.sort("step").to_dicts() if "step" in rows.columns else rows.to_dicts()

    def episode(self, episode_id: str) -> dict[str, Any] | None:
        """The episode's row (the episode-level rationale), or None when OUT does not hold it."""
        rows = self._rows(EPISODE_FILES, episode_id)
        return rows[0] if rows else None

    def steps(self, episode_id: str) -> list[dict[str, Any]]:
        """The episode's step rows, in step order."""
        return self._rows(STEP_FILES, episode_id)


def open_annotated(name: str) -> Annotated:
    """A local OUT folder or a Hub dataset id ORG/NAME (its manifest and Parquet only)."""
    root = Path(name)
    if not root.exists():
        if name.count("/") != 1 or name.startswith((".", "/")):
            raise RefineError(f"{name}: no such folder (and not an ORG/NAME Hub id)")
        root = _download(name)
    if not manifest_path(root).is_file():
        raise RefineError(f"{manifest_path(root)}: missing (not a refine-data dataset)")
    manifest = read_manifest(root)
    rejects: dict[str, str] = {}
    for f in sorted((root / PRIVATE_DIR).glob("rejects*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rejects[r["episode_id"]] = r["reason"]
    return Annotated(root, manifest, rejects)


def _download(repo: str) -> Path:
    from .publish.push import hf_api, resolve_token

    try:
        return Path(
            hf_api(resolve_token()).snapshot_download(
                repo, repo_type="dataset", allow_patterns=[MANIFEST, STEP_FILES, EPISODE_FILES]
            )
        )
    except Exception as exc:  # the client's errors run over several lines
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RefineError(f"{repo}: cannot download from the Hub ({type(exc).__name__}: {first})") from None
