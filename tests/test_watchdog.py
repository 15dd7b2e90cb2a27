"""The watchdog (tests/watchdog.py): a test that fails after running long carries the stacks of the processes it
waited on, so a hang seen once in CI says where it hung."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HANGING = """
import subprocess, sys

CHILD = "import time\\ndef waiting_in_the_child():\\n    time.sleep(60)\\nwaiting_in_the_child()"

def test_waits_on_a_child_that_hangs():
    subprocess.run([sys.executable, "-c", CHILD], timeout=4)

def test_passes_slowly():
    subprocess.run([sys.executable, "-c", "import time; time.sleep(3)"], timeout=30)
"""


def test_a_failing_test_that_ran_long_shows_the_stacks_of_its_children_and_a_passing_one_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_hang.py").write_text(HANGING)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REFINEVLA_WATCHDOG_S": "1.5"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.watchdog", "-rA", "test_hang.py"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    out = r.stdout
    assert "1 failed, 1 passed" in out, out[-3000:]
    failed = out[out.index("test_waits_on_a_child_that_hangs") :]
    assert "watchdog: the stacks of the processes the test waited on" in out
    assert "waiting_in_the_child" in failed and re.search(r"after \d+ s, 1 descendant processes", failed), out[-3000:]
    # the passing test's report has no watchdog section, though dumps were taken while it ran
    assert out.count("watchdog: the stacks") == 1, out[-3000:]
