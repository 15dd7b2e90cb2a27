"""`refine-data audit --truth` on real `refine-eval demos` (the simulator's own truth file): the rule-based
teacher, which splits at the gripper events, scores near 1 on the expert's grasp and release; a teacher whose
boundaries are 8 steps late and whose boxes cover the whole frame scores near 0, and ranks below it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from refinevla.annotate.cli import app
from tests.annotate.audit_fixtures import SHIFT, teacher_answer
from tests.annotate.conftest import SECRET, FakeTeacherServer, Recorded, serving


def late_full_frame_carrot(rec: Recorded) -> dict[str, Any]:
    """Boundaries SHIFT steps after the events (before them, the first would start at step 0); the carrot and
    the plate named, both boxed as the whole frame."""
    answer = teacher_answer(rec, SHIFT, full_boxes=True)
    whole = answer["objects"][0]["box"]
    answer["objects"] = [{"name": "carrot", "box": whole}, {"name": "plate", "box": whole}]
    return answer


def audit_json(out: Path, truth: Path) -> dict[str, Any]:
    r = CliRunner().invoke(app, ["audit", str(out), "--truth", str(truth), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_audit_ranks_a_good_and_a_bad_teacher_against_the_simulators_truth(demos_dir: Path, tmp_path: Path):
    good, bad = tmp_path / "rule-based", tmp_path / "early"
    run = CliRunner().invoke(
        app, ["annotate", f"rlds:{demos_dir}", "--out", str(good), "--progress", "none", "--license", "mit"]
    )
    assert run.exit_code == 0, run.output
    with serving(FakeTeacherServer(answer=late_full_frame_carrot)) as server:
        args = [
            "annotate",
            f"rlds:{demos_dir}",
            "--out",
            str(bad),
            "--progress",
            "none",
            "--license",
            "mit",
            "--teacher",
        ]
        args += ["openai-compatible", "--base-url", server.url, "--model", "fake-model"]
        run = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
        assert run.exit_code == 0, run.output
        assert len(server.requests) == 2
    g, b = audit_json(good, demos_dir), audit_json(bad, demos_dir)
    assert g["episodes"] == b["episodes"] == 2
    assert g["truth_event_recall"] >= 0.9 and g["event_recall"] >= 0.9  # grasp and release, at the expert's steps
    assert g["grasp_error_mean"] <= 1 and g["release_error_mean"] <= 1
    assert g["object_recall"] == 0.0 and g["box_iou_mean"] is None  # it names no boxes
    assert b["truth_event_recall"] <= 0.2 and b["event_recall"] <= 0.2
    assert b["object_recall"] == 1.0 and b["box_iou_mean"] <= 0.2  # named right, boxed wrong
    assert b["score_mean"] > g["score_mean"]  # the rank: worse first
