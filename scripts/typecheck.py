"""Type-check the five packages as the one package `refinevla` they are installed as: `mypy --strict`.

The repository keeps the design card's top-level folders (annotate/, schemas/, ...), which pyproject
maps to `refinevla.annotate`, `refinevla.schemas`, ... . mypy reads folders, not that mapping: given
the folders themselves, it sees five unrelated top-level packages, and every import from one to
another (`from ..annotate.errors import RefineError`) becomes untyped. So this builds the installed
layout as a farm of symlinks (`.typecheck/refinevla/<folder>` -> `<folder>`) and checks
`-p refinevla.<folder>` for each: cross-package imports are then typed like any other.

Usage: python scripts/typecheck.py [extra mypy arguments]   (exit status: mypy's)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "annotate", "datacards", "train", "evaluate")
FARM = ROOT / ".typecheck"


def build_farm() -> Path:
    """`.typecheck/refinevla/<pkg>` -> `<pkg>` for each package (recreated, so it never goes stale)."""
    root = FARM / "refinevla"
    root.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", "..", name))
    return FARM


def main(argv: list[str]) -> int:
    farm = build_farm()
    cmd = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml")]
    for name in PACKAGES:
        cmd += ["-p", f"refinevla.{name}"]
    env = {**os.environ, "MYPYPATH": str(farm)}
    return subprocess.call([*cmd, *argv], cwd=farm, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
