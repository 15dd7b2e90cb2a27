"""The test command's lock: `constraints.txt`, regenerated on purpose, never by accident.

    python scripts/lock.py write               # fresh venv, the test command's installs without the lock, freeze
    python scripts/lock.py try-newest [PYTEST ARGS...]
                                               # fresh venv without the lock: what moved, and what breaks under it

README command 2 and `.ci/run` install with `-c constraints.txt`, so a fresh machine gets the versions CI
tested, whatever the index serves that day. `try-newest` is the deliberate step that looks ahead: it
installs what the index serves now, prints every package whose version differs from the lock, runs the
tests (all of them, or the PYTEST ARGS given) and says what broke; when it is green, `write` moves the lock.
The lock is made on CI's platform (Linux x86_64, Python 3.11). torch stays out of it: the command pins
torch itself (the CPU wheel here, a CUDA build on a GPU machine).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
EXTRAS = "dev,train,sim,ray,viz,libero"  # the extras README command 2 installs (keep in sync with it and .ci/run)
TORCH = "torch==2.13.0"
UNLOCKED = ("torch",)  # pinned by the command itself


def fresh_venv(where: Path) -> Path:
    """A new virtual environment with the test command's installs, without the lock; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-e", f".[{EXTRAS}]"], check=True, cwd=ROOT)
    return python


def freeze(python: Path) -> dict[str, str]:
    """name -> version of what the venv holds (the editable refinevla and UNLOCKED left out)."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins: dict[str, str] = {}
    for line in out.splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, version = line.split("==", 1)
        if normalise(name) not in UNLOCKED:
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def write(pins: dict[str, str]) -> None:
    header = [
        "# The test command's lock (README command 2, .ci/run: pip install -c constraints.txt ...).",
        "# Regenerate on purpose only: python scripts/lock.py write",
        "# (look ahead first: python scripts/lock.py try-newest).",
        f"# Made {dt.date.today().isoformat()} on {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; torch is pinned by the command itself.",
    ]
    LOCK.write_text("\n".join([*header, *(f"{n}=={v}" for n, v in sorted(pins.items()))]) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("write", "try-newest"):
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="refinevla-lock-") as tmp:
        python = fresh_venv(Path(tmp) / "venv")
        newest = freeze(python)
        if argv[0] == "write":
            write(newest)
            print(f"wrote {LOCK}: {len(newest)} packages")
            return 0
        locked = read_lock()
        moved = sorted(n for n in newest.keys() | locked.keys() if newest.get(n) != locked.get(n))
        print(f"{len(moved)} packages differ from {LOCK.name}:")
        for n in moved:
            print(f"  {n}: {locked.get(n, '-')} -> {newest.get(n, '-')}")
        env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        rc = subprocess.run([str(python), "-m", "pytest", *argv[1:]], cwd=ROOT, env=env).returncode
        verdict = "nothing broke: `python scripts/lock.py write` moves the lock" if rc == 0 else "the failures above"
        print(f"tests under the newest versions: exit {rc} ({verdict})")
        return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
