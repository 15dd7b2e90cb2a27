"""`refine-data` inspect / stats through Typer's CliRunner, and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from refinevla.annotate.cli import app

runner = CliRunner()


def test_inspect_prints_one_line_per_episode_and_a_summary(write_bridge) -> None:
    d = write_bridge(4)
    res = runner.invoke(app, ["inspect", f"rlds:{d}", "--limit", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("bridge_orig:/nfs/bridge/raw/scene_0/traj0.pkl#0  steps=8")
    assert "3 episodes, 27 steps" in lines[-1]


def test_inspect_json_is_machine_readable(write_bridge) -> None:
    d = write_bridge(3)
    res = runner.invoke(app, ["inspect", f"rlds:{d}", "--json", "--episodes", "1:3"])
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.output.strip().splitlines()]
    assert [o["steps"] for o in objs[:-1]] == [9, 10]
    assert objs[-1]["summary"]["episodes"] == 2 and objs[-1]["summary"]["steps"] == 19


def test_stats_writes_openvla_statistics_with_the_bridge_transform(write_bridge, tmp_path: Path) -> None:
    d = write_bridge(3)
    out = tmp_path / "dataset_statistics.json"
    res = runner.invoke(app, ["stats", f"rlds:{d}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    entry = data["bridge_orig"]
    assert entry["num_trajectories"] == 3
    assert entry["num_transitions"] == (8 - 2) + (9 - 2) + (10 - 2)  # bridge_orig drops first and last
    assert entry["action"]["mask"] == [True] * 6 + [False]
    raw = tmp_path / "raw.json"
    runner.invoke(app, ["stats", f"rlds:{d}", "--transform", "none", "--out", str(raw), "--key", "mine"])
    assert json.loads(raw.read_text())["mine"]["num_transitions"] == 27
    assert not np.allclose(json.loads(raw.read_text())["mine"]["action"]["mean"], entry["action"]["mean"])


def test_bad_input_is_one_red_line_and_exit_1(tmp_path: Path) -> None:
    res = runner.invoke(app, ["inspect", f"rlds:{tmp_path / 'missing'}"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "no such directory" in res.output
    res = runner.invoke(app, ["inspect", "nonsense"])
    assert res.exit_code == 1 and "unknown source" in res.output


def test_help_does_not_import_heavy_stacks() -> None:
    code = (
        "import sys; from refinevla.annotate.cli import app; "
        "heavy = [m for m in ('tensorflow_datasets', 'tensorflow', 'torch', 'datasets', 'openai', 'pyarrow', 'ray', "
        "'rerun') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
