"""tests/timeline.py: with REFINEVLA_TIMELINE=DIR each xdist worker writes what it ran and when, and the report
puts each group on the worker that ran it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.timeline import group_of, report, spans

ROOT = Path(__file__).resolve().parents[1]


def test_the_group_is_xdists_suffix_else_the_file() -> None:
    assert group_of("tests/a.py::t[x@y]@ray-cluster") == "ray-cluster"
    assert group_of("tests/a.py::t@tests/a.py") == "tests/a.py"
    assert group_of("tests/a.py::t[x@y]") == "tests/a.py"
    assert group_of("tests/a.py::t") == "tests/a.py"


def test_each_worker_writes_its_own_tests_and_the_report_groups_them(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("import time\ndef test_one(): time.sleep(0.3)\ndef test_two(): pass\n")
    (tmp_path / "test_b.py").write_text("def test_three(): pass\n")
    folder = tmp_path / "timeline"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REFINEVLA_TIMELINE": str(folder)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.timeline", "-n", "2"]
    cmd += ["--dist", "loadfile", "test_a.py", "test_b.py"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert "3 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    # the controller registered the plugin too (-p), but only workers write: 3 lines, no main.tsv
    assert sorted(p.name for p in folder.iterdir()) == ["gw0.tsv", "gw1.tsv"]
    found = {s.group: s for s in spans(folder)}
    assert set(found) == {"test_a.py", "test_b.py"} and found["test_a.py"].worker != found["test_b.py"].worker
    assert (found["test_a.py"].tests, found["test_b.py"].tests) == (2, 1)
    assert found["test_a.py"].seconds >= 0.3
    text = report(folder)
    assert "gw0 ended at" in text and "gw1 ended at" in text and "test_a.py" in text
