"""A digest of the simulator's scene files, so results made on different assets never mix silently.

SimplerEnv numbers depend on the scanned stages, object meshes and overlay photos as much as on
the policy. `run.json` records the asset directory and a SHA-256 over every file's relative
path and content under the task's asset folders; a rerun into the same results folder with a
different digest is refused, and `refine-eval report` prints the digest of each run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def asset_digest(root: Path | None, folders: Sequence[str]) -> dict[str, Any]:
    """{"dir", "folders", "digest", "files", "bytes"} over ROOT/folder for each folder (sorted walk)."""
    if root is None or not folders:
        return {"dir": str(root) if root else None, "folders": list(folders), "digest": None, "files": 0, "bytes": 0}
    h = hashlib.sha256()
    files = size = 0
    for folder in sorted(folders):
        base = root / folder
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0")
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
            h.update(b"\0")
            files += 1
    return {"dir": str(root), "folders": sorted(folders), "digest": h.hexdigest(), "files": files, "bytes": size}
