"""The dataset card: parseable by the Hub's own parser, carrying the YAML and the body the issue asks for,
and a directory that `datasets.load_dataset` loads in both configs without any download."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.datacards.render import write_card
from refinevla.schemas import load_schema


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first Markdown table after `heading`: name (first cell, no backticks) -> cells."""
    section = text.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[3:]:
        if not line.startswith("| `"):
            if rows:
                break
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0].strip("`")] = cells
    return rows


def test_card_yaml_parses_and_carries_license_categories_tags_and_configs(out_copy):
    path = write_card(out_copy)
    card = DatasetCard.load(path)
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0"  # inherited from BridgeData V2
    assert data["task_categories"] == ["robotics"]
    assert {"refinevla", "reasoning", "vision-language-action", "bridge_orig"} <= set(data["tags"])
    assert data["annotations_creators"] == ["machine-generated"]
    assert data["source_datasets"] == ["bridge_orig"] and data["size_categories"] == ["n<1K"]
    configs = {c["config_name"]: c["data_files"] for c in data["configs"]}
    assert configs == {
        "steps": [{"split": "train", "path": "data/train-*.parquet"}],
        "episodes": [{"split": "train", "path": "episodes/train-*.parquet"}],
    }


def test_card_body_has_provenance_prompt_text_statistics_sample_and_citations(out_copy):
    text = write_card(out_copy).read_text()
    assert "<details>" in text and "[system]" in text and "Task instruction:" in text  # the full template
    assert "| teacher | `rule-based` |" in text and "refinevla.rationale/1" in text
    stats = table_rows(
        text.replace("| episodes |", "| `episodes` |").replace("| steps |", "| `steps` |"), "## Statistics"
    )
    assert stats["episodes"][1] == "3" and stats["steps"][1] == "33"
    assert "subtasks per episode | 3.0 mean" in text and "| stop |" in text  # primitive distribution
    assert "## A sample rationale" in text and "put the spoon 0 on the towel" in text
    assert "arXiv:2505.19080" in text and "arXiv:2407.08693" in text and "BridgeData V2" in text
    assert "machine-generated" in text and "no model wrote" in text.lower()


def test_field_tables_are_the_schema_descriptions(out_copy):
    text = write_card(out_copy).read_text()
    schema = load_schema()
    step_rows = table_rows(text, "### `steps`")
    for name, node in schema["$defs"]["step"]["properties"].items():
        assert step_rows[name][3] == node["description"], name
    episode_rows = table_rows(text, "### `episodes`")
    for name, node in schema["properties"].items():
        if name == "steps":
            continue
        assert episode_rows[name][3] == node["description"], name
        assert episode_rows[name][2] == node["x-refinevla-source"].replace("teacher", "teacher")
    assert step_rows["action"][1] == "list<float>[7]"


def test_unknown_source_license_requires_license_flag(out_copy):
    import json

    (out_copy / "README.md").unlink()  # `annotate` wrote one; start from a card-less OUT
    manifest = json.loads((out_copy / "refinevla.json").read_text())
    manifest["source"]["dataset"] = "my_lab_robot"
    (out_copy / "refinevla.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(app, ["card", str(out_copy)])
    assert r.exit_code == 1 and "--license" in r.output and not (out_copy / "README.md").exists()
    r = CliRunner().invoke(app, ["card", str(out_copy), "--license", "mit"])
    assert r.exit_code == 0, r.output
    assert DatasetCard.load(out_copy / "README.md").data.license == "mit"
    # A re-render keeps the license the card already records.
    r = CliRunner().invoke(app, ["card", str(out_copy)])
    assert r.exit_code == 0 and DatasetCard.load(out_copy / "README.md").data.license == "mit"


def test_load_dataset_loads_both_configs_with_features_and_counts(out_copy, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_card(out_copy)
    cache = out_copy.parent / "hf_cache"
    steps = datasets.load_dataset(str(out_copy), "steps", split="train", cache_dir=str(cache))
    episodes = datasets.load_dataset(str(out_copy), "episodes", split="train", cache_dir=str(cache))
    assert steps.num_rows == 33 and episodes.num_rows == 3
    assert {"episode_id", "step", "subtask", "move", "move_reason", "gripper", "action", "state"} <= set(steps.features)
    assert steps.features["action"].length == 7
    assert {"observation", "situation_analysis", "spatial_reasoning", "task_plan", "move_reasons"} <= set(
        episodes.features
    )
    plan = episodes[0]["task_plan"]
    assert plan[0]["start_step"] == 0 and plan[-1]["end_step"] == episodes[0]["num_steps"] - 1
    # The default config is `steps`.
    default = datasets.load_dataset(str(out_copy), split="train", cache_dir=str(cache))
    assert default.num_rows == 33
