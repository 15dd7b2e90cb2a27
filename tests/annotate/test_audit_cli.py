"""`refine-data audit` end to end: real outputs of two teachers through the real CLI, ranked; the one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.schemas.dataset_layout import MANIFEST, write_manifest
from refinevla.schemas.truth import EpisodeTruth, Leg, write_truth
from tests.annotate.audit_fixtures import SHIFT, STEPS, hand_made_truth, shifted_full_image_answer


def refine_data(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def last_json(output: str) -> dict[str, Any]:
    summary = json.loads(output.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    return summary


@pytest.fixture
def two_teachers(tiny_rlds: Any, teacher_server: Any, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The same source annotated by the rule-based teacher and by the shifted, full-image fake; their truth."""
    uri = tiny_rlds(3, steps=STEPS)
    good, bad = tmp_path / "rule-based", tmp_path / "shifted"
    r = refine_data("annotate", uri, "--out", str(good), "--progress", "none")
    assert r.exit_code == 0, r.output
    teacher_server.answer = shifted_full_image_answer
    r = refine_data(
        "annotate", uri, "--out", str(bad), "--progress", "none", "--teacher", "openai-compatible",
        "--base-url", teacher_server.url, "--model", "fake-model", env={"OPENAI_API_KEY": "sk-test"},
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    demos = tmp_path / "demos"
    hand_made_truth(demos, good)
    return good, bad, demos


def test_the_audit_ranks_a_teacher_that_misses_the_events_and_boxes_below_the_rule_based_one(
    two_teachers: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    good, bad, demos = two_teachers
    r = refine_data("audit", str(good), "--truth", str(demos), "--json")
    assert r.exit_code == 0, r.output
    g = last_json(r.stdout)
    r = refine_data("audit", str(bad), "--truth", str(demos), "--json", "--out", str(tmp_path / "bad-report"))
    assert r.exit_code == 0, r.output
    b = last_json(r.stdout)
    assert "gripper-event recall" in r.stdout and "worst 3 episodes" in r.stdout  # the terminal tables

    assert g["episodes"] == b["episodes"] == 3 and g["gripper_events"] == b["gripper_events"] == 6
    assert g["event_recall"] >= 0.9 and b["event_recall"] <= 0.2
    assert g["truth_event_recall"] == 1.0 and b["truth_event_recall"] == 0.0
    assert g["truth_boundary_precision"] > b["truth_boundary_precision"]
    assert g["score_mean"] < b["score_mean"]
    # boxes: the rule-based teacher names none; the fake's full-image boxes name both task objects, badly
    assert g["box_iou_mean"] is None and g["object_recall"] == 0.0 and g["hallucinated_per_episode"] == 0.0
    assert b["box_iou_mean"] <= 0.2 and b["box_iou50_rate"] == 0.0 and b["object_recall"] == 1.0
    assert b["hallucinated_per_episode"] == 1.0  # the banana
    assert b["large_box_rate"] == 1.0 and b["boxes"] == 9
    # answers and cost from the output's own store: the fake reports 1000 + 200 tokens per answer
    assert b["tokens"] == 3 * 1200 and b["first_answer_valid_rate"] == 1.0 and b["spend_from"] == "store"
    # every key --json promises
    for key in ("episodes", "event_recall", "boundary_precision", "duplicate_rate", "box_iou_mean",
                "box_iou50_rate", "object_recall", "hallucinated_per_episode"):  # fmt: skip
        assert key in b

    # the files: the default folder of a local output, and --out
    report = good / ".refine" / "audit"
    assert {"audit.md", "audit.json", "episodes.parquet"} <= {p.name for p in report.iterdir()}
    assert json.loads((report / "audit.json").read_text())["summary"]["event_recall"] == g["event_recall"]
    ranked = pl.read_parquet(tmp_path / "bad-report" / "episodes.parquet")
    assert ranked["rank"].to_list() == [1, 2, 3] and ranked["score"].is_sorted(descending=True)
    assert ranked["box_iou_mean"].max() <= 0.2 and set(ranked["hallucinated"].to_list()) == {1}
    markdown = (tmp_path / "bad-report" / "audit.md").read_text()
    assert "## Histograms" in markdown and "### box IoU (mean over named task objects)" in markdown
    assert (tmp_path / "bad-report" / "histograms" / "box_iou_mean.png").read_bytes()[:4] == b"\x89PNG"


def test_without_truth_the_audit_scores_the_episodes_own_motion(two_teachers: tuple[Path, Path, Path]) -> None:
    good, bad, _ = two_teachers
    g = last_json(refine_data("audit", str(good), "--json").stdout)
    b = last_json(refine_data("audit", str(bad), "--json", "--frame-size", "64x64").stdout)
    assert g["event_recall"] == 1.0 and b["event_recall"] == 0.0
    assert "box_iou_mean" not in g and g["keyframe_size_assumed"] is True
    assert b["large_box_rate"] == 1.0 and b["keyframe_size"] == [64, 64]
    # the fake's one observation for every episode is a duplicate; its nouns name neither spoon nor towel, but its
    # objects do ("spoons", "cloth")
    assert b["duplicate_observation_rate"] == 1.0 and b["grounding"] == 1.0
    # a wider tolerance forgives the shift
    assert last_json(refine_data("audit", str(bad), "--json", "--tolerance", str(SHIFT)).stdout)["event_recall"] == 1.0


def one_line_error(r: Any) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    return str(lines[0])


def test_an_output_that_is_not_annotated_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a refine-data dataset" in one_line_error(refine_data("audit", str(empty)))
    write_manifest(empty, {"counts": {"episodes": 0}})
    assert (empty / MANIFEST).is_file()
    assert "no episode rows" in one_line_error(refine_data("audit", str(empty)))
    assert "no such folder" in one_line_error(refine_data("audit", str(tmp_path / "nowhere" / "at" / "all")))


def test_a_truth_that_is_not_the_outputs_demos_is_one_line(
    two_teachers: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    good, _, demos = two_teachers
    not_demos = tmp_path / "not-demos"
    not_demos.mkdir()
    assert "not a refine-eval demos folder" in one_line_error(
        refine_data("audit", str(good), "--truth", str(not_demos))
    )

    from refinevla.schemas.truth import read_truth

    truth = read_truth(demos)
    assert truth is not None
    others = tmp_path / "other-demos"
    others.mkdir()
    write_truth(others, [_renamed(t, "other:" + t.episode_id) for t in truth.values()])
    assert "holds none of the output's 3 episodes" in one_line_error(
        refine_data("audit", str(good), "--truth", str(others))
    )
    fewer = tmp_path / "fewer-demos"
    fewer.mkdir()
    write_truth(fewer, list(truth.values())[:2])
    assert "lacks 1 of the output's 3 episodes" in one_line_error(
        refine_data("audit", str(good), "--truth", str(fewer))
    )
    longer = tmp_path / "longer-demos"
    longer.mkdir()
    first = next(iter(truth.values()))
    stretched = replace(first, num_steps=first.num_steps + 1, legs=(*first.legs[:-1], _longer(first.legs[-1])))
    write_truth(longer, [stretched, *list(truth.values())[1:]])
    assert f"episode {first.episode_id!r} has {first.num_steps + 1} steps there" in one_line_error(
        refine_data("audit", str(good), "--truth", str(longer))
    )
    broken = tmp_path / "broken-demos"
    broken.mkdir()
    (broken / "refinevla_truth.json").write_text('{"format": "something-else/9", "episodes": []}')
    assert "format 'something-else/9'" in one_line_error(refine_data("audit", str(good), "--truth", str(broken)))


def _renamed(truth: EpisodeTruth, episode_id: str) -> EpisodeTruth:
    return replace(truth, episode_id=episode_id)


def _longer(leg: Leg) -> Leg:
    return replace(leg, end_step=leg.end_step + 1)
