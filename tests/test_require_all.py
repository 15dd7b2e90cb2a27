"""CI's REFINEVLA_REQUIRE_ALL=1: a part the test command installs that is missing fails the run in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIEW_TESTS = ROOT / "tests" / "annotate" / "test_view.py"  # needs the [viz] extra (rerun)


def run_without_rerun(tmp_path: Path, require_all: bool) -> subprocess.CompletedProcess[str]:
    """pytest on the viewer tests with `rerun` made unimportable (as if the [viz] extra were not installed)."""
    shadow = tmp_path / "shadow" / "rerun"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'rerun'\", name='rerun')\n")
    env = {k: v for k, v in os.environ.items() if k != "REFINEVLA_REQUIRE_ALL"}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")])
    if require_all:
        env["REFINEVLA_REQUIRE_ALL"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(VIEW_TESTS), "-x", "-p", "no:cacheprovider", "-rfEs"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_extra_skips_for_a_developer(tmp_path: Path) -> None:
    r = run_without_rerun(tmp_path, require_all=False)
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: every test of the file skipped at collection
    assert "skipped" in r.stdout and "rerun" in r.stdout


def test_a_missing_extra_fails_ci_in_one_line_naming_it(tmp_path: Path) -> None:
    r = run_without_rerun(tmp_path, require_all=True)
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stdout.splitlines() if "REFINEVLA_REQUIRE_ALL=1 (CI) but skipped" in ln]
    assert lines, r.stdout
    assert "rerun" in lines[0], lines[0]
