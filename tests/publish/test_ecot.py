"""`refine-data import-ecot`: Embodied-CoT's nested Bridge reasoning file -> valid refinevla rows + card."""

from __future__ import annotations

import json

import polars as pl
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from refinevla.annotate.cli import app


def ecot_episode(file_path: str, episode_id: int, n: int) -> dict:
    """One entry in ECoT's exact layout: reasoning per step (string keys), features, metadata."""
    subtasks = ["move to the spoon"] * (n // 2) + ["lift the spoon"] * (n - n // 2)
    moves = ["move forward"] * (n // 3) + ["move down, close gripper"] + ["move up"] * (n - n // 3 - 1)
    return {
        "reasoning": {
            str(t): {
                "task": "put the spoon on the towel",
                "plan": "1. move to the spoon 2. lift the spoon",
                "subtask": subtasks[t],
                "subtask_reason": f"because {subtasks[t]} comes next",
                "move": moves[t],
                "move_reason": f"the gripper must {moves[t]}",
            }
            for t in range(n)
        },
        "features": {
            "state_3d": [[0.1 * t, 0.0, 0.05] for t in range(n)],
            "move_primitive": moves,
            "gripper_position": [[10 + t, 20] for t in range(n)],
            "bboxes": [[[0.9, "spoon", [1, 2, 11, 12]], [0.8, "towel", [20, 20, 40, 30]]] for _ in range(n)],
        },
        "metadata": {
            "episode_id": str(episode_id),
            "file_path": file_path,
            "n_steps": n,
            "language_instruction": "put the spoon on the towel",
            "caption": "A spoon lies left of a blue towel on a wooden table.",
        },
    }


def write_fixture(path):  # type: ignore[no-untyped-def]
    data = {
        "/nfs/bridge/raw/a/traj0.pkl": {"0": ecot_episode("/nfs/bridge/raw/a/traj0.pkl", 0, 8)},
        "/nfs/bridge/raw/b/traj1.pkl": {
            "1": ecot_episode("/nfs/bridge/raw/b/traj1.pkl", 1, 6),
            "2": ecot_episode("/nfs/bridge/raw/b/traj1.pkl", 2, 5),
        },
    }
    broken = data["/nfs/bridge/raw/b/traj1.pkl"]["2"]
    del broken["reasoning"]["3"]  # a step without reasoning
    data["/nfs/bridge/raw/a/traj0.pkl"]["0"]["features"]["depth"] = [0] * 8  # an unknown field
    path.write_text(json.dumps(data))


def test_ecot_file_converts_to_valid_rows_and_reports_the_malformed_entry(tmp_path, monkeypatch):
    src = tmp_path / "embodied_features_bridge.json"
    write_fixture(src)
    out = tmp_path / "out"

    def no_whole_file_load(*a, **k):  # the 1.4 GB file must be streamed
        raise AssertionError("json.load called")

    monkeypatch.setattr(json, "load", no_whole_file_load)
    r = CliRunner().invoke(app, ["import-ecot", str(src), "--out", str(out), "--license", "mit"])
    assert r.exit_code == 0, r.output
    assert "2 episodes, 14 steps; 1 malformed" in r.output
    assert "/nfs/bridge/raw/b/traj1.pkl#2" in r.output and "reasoning missing" in r.output
    assert "features.depth" in r.output and "situation_analysis" in r.output

    episodes = pl.read_parquet(out / "episodes")
    steps = pl.read_parquet(out / "data")
    assert episodes.height == 2 and steps.height == 14
    ep = episodes.filter(pl.col("episode_id") == "bridge_orig:/nfs/bridge/raw/a/traj0.pkl#0").row(0, named=True)
    assert ep["task_plan"] == [
        {
            "subtask": "move to the spoon",
            "reason": "because move to the spoon comes next",
            "start_step": 0,
            "end_step": 3,
        },
        {"subtask": "lift the spoon", "reason": "because lift the spoon comes next", "start_step": 4, "end_step": 7},
    ]
    assert ep["observation"].startswith("A spoon lies") and ep["situation_analysis"] == "Not provided by Embodied-CoT."
    assert [m["segment"] for m in ep["move_reasons"]] == [0, 1, 2]
    assert ep["objects"][0]["name"] == "spoon" and ep["objects"][0]["box"] == [1.0, 2.0, 11.0, 12.0]
    s = steps.filter(pl.col("episode_id") == ep["episode_id"]).sort("step")
    assert s["gripper"].to_list() == ["open", "open", "closed", "closed", "closed", "closed", "closed", "closed"]
    assert s["ecot_gripper_position"][3].to_list() == [13.0, 20.0] and s["move"][2] == "move down, close gripper"

    v = CliRunner().invoke(app, ["validate", str(out)])
    assert v.exit_code == 0, v.output
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "mit" and "embodied-cot" in card.data.tags
    assert "Embodied-CoT" in card.text and "arXiv:2407.08693" in card.text and "ecot_" in card.text
    assert (out / ".refine" / "import-rejects.jsonl").read_text().count("traj1.pkl#2") == 1


def test_ecot_import_requires_a_license(tmp_path):
    src = tmp_path / "e.json"
    write_fixture(src)
    r = CliRunner().invoke(app, ["import-ecot", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--license" in r.output
