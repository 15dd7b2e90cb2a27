"""The audit's metrics on hand-computed fixtures: boxes, tolerance edges, duplicates, names, hallucinations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from refinevla.annotate.audit import metrics, names
from refinevla.annotate.audit.score import audit_episode, duplicate_flags, rank, summarise
from refinevla.schemas.truth import EpisodeTruth, Leg, TruthObject


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges share no area
        ((0, 0, 10, 10), (2, 2, 7, 7), 25 / 100),  # nested: the inner box's area over the outer's
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),  # half of each overlaps
        ((1, 2, 3, 4), (1, 2, 3, 4), 1.0),
    ],
)
def test_box_iou_of_known_boxes(a: tuple[float, ...], b: tuple[float, ...], iou: float) -> None:
    assert metrics.box_iou(a, b) == pytest.approx(iou)
    assert metrics.box_iou(b, a) == pytest.approx(iou)


def test_a_box_over_half_the_image_is_large_and_half_is_not() -> None:
    assert metrics.area_fraction((0, 0, 64, 40), (64, 64)) == pytest.approx(0.625)
    assert metrics.area_fraction((0, 0, 64, 32), (64, 64)) == pytest.approx(0.5)
    assert metrics.area_fraction((-10, -10, 100, 100), (64, 64)) == pytest.approx(1.0)  # clipped to the image


def test_teacher_boundaries_are_the_later_subtasks_starts_sorted_once() -> None:
    plan = [{"start_step": 0}, {"start_step": 9}, {"start_step": 4}, {"start_step": 9}]
    assert metrics.teacher_boundaries(plan) == [4, 9]
    assert metrics.teacher_boundaries([{"start_step": 0}]) == []


@pytest.mark.parametrize(("boundary", "matched"), [(10, 1), (12, 1), (8, 1), (13, 0), (7, 0)])
def test_an_event_counts_within_plus_minus_k_and_not_at_k_plus_one(boundary: int, matched: int) -> None:
    assert metrics.count_within([10], [boundary], tolerance=2) == matched


def gripper_states(steps: int, closed: range) -> np.ndarray:
    """A still arm whose gripper is closed over `closed`: events at closed.start (close) and closed.stop (open)."""
    states = np.zeros((steps, 7), np.float32)
    states[:, 6] = 1.0
    states[closed.start : closed.stop, 6] = 0.0
    return states


def row(plan_starts: list[int], steps: int, **extra: Any) -> dict[str, Any]:
    """An episodes-table row with a plan whose subtasks start at plan_starts (0 first)."""
    plan = [
        {"subtask": f"part {k}", "reason": "r", "start_step": s, "end_step": e - 1}
        for k, (s, e) in enumerate(zip(plan_starts, [*plan_starts[1:], steps], strict=True))
    ]
    base = {
        "episode_id": "ds:ep",
        "instruction": "put the spoon on the towel",
        "num_steps": steps,
        "observation": "A spoon lies next to a towel.",
        "task_plan": plan,
        "objects": None,
        "attempts": 1,
        "request_key": "k",
    }
    return base | extra


def audit(r: dict[str, Any], states: np.ndarray, truth: EpisodeTruth | None = None, k: int = 2) -> Any:
    return audit_episode(r, states, k, False, False, (64, 64), None, truth=truth, max_side=64)


@pytest.mark.parametrize(("shift", "recall"), [(-2, 1.0), (2, 1.0), (3, 0.0), (-3, 0.0)])
def test_event_recall_of_an_episode_at_the_tolerance_edges(shift: int, recall: float) -> None:
    states = gripper_states(30, range(10, 30))  # one event: the gripper closes at step 10
    got = audit(row([0, 10 + shift], 30), states)
    assert got.gripper_events == 1 and got.event_recall == recall


def test_boundary_precision_counts_boundaries_near_an_event_or_a_segment_change() -> None:
    assert metrics.count_within([5, 20, 40], sorted({8, 22} | {38}), tolerance=2) == 2  # 20~22, 40~38; 5 is 3 off
    states = gripper_states(40, range(10, 40))
    moves_change = 10 - 3  # the 4-step window sees the close 3 steps early: "close gripper" from step 7
    got = audit(row([0, moves_change, 25], 40), states)
    assert got.teacher_boundaries == 2 and got.boundaries_matched == 1 and got.boundary_precision == 0.5


def test_an_episode_without_events_or_boundaries_has_no_recall_or_precision_not_zero() -> None:
    got = audit(row([0], 12), np.zeros((12, 7), np.float32))
    assert got.event_recall is None and got.boundary_precision is None


def test_near_duplicates_are_equal_after_normalising_or_after_removing_the_instruction() -> None:
    episodes = [
        {"instruction": "a", "observation": "The spoon is at 3 cm, LEFT!", "task_plan": []},
        {"instruction": "b", "observation": "the spoon is at 12 cm left", "task_plan": []},
        {"instruction": "c", "observation": "A carrot lies on a plate.", "task_plan": []},
    ]
    assert duplicate_flags(episodes).observation == [True, True, False]
    templated = [
        {"instruction": "put the carrot on the plate", "observation": "The robot must put the carrot on the plate."},
        {"instruction": "put the spoon on the towel", "observation": "The robot must put the spoon on the towel."},
        {"instruction": "put the spoon on the towel", "observation": "A spoon and a towel, the towel is blue."},
    ]
    plans = [{**e, "task_plan": [{"subtask": "grasp", "reason": e["observation"]}]} for e in templated]
    flags = duplicate_flags(plans)
    assert flags.observation == [True, True, False] and flags.plan == [True, True, False]


@pytest.mark.parametrize(
    ("teacher", "truth", "matches"),
    [
        ("spoons", "spoon", True),  # plural
        ("the blue cloth", "towel", True),  # synonym
        ("green block", "green cube", True),
        ("berries", "berry", True),
        ("banana", "towel", False),  # unrelated
        ("glass", "glas", False),
    ],
)
def test_names_match_by_singular_head_noun_and_synonyms(teacher: str, truth: str, matches: bool) -> None:
    assert (names.match_score(teacher, truth) > 0) is matches


def test_instruction_nouns_drop_verbs_stopwords_digits_and_colours_before_a_noun() -> None:
    assert names.nouns("put the spoons 3 on the blue towel") == ["spoon", "towel"]
    assert names.nouns("stack the green block on the yellow block") == ["cube"]
    assert names.nouns("put the green on the yellow") == ["green", "yellow"]  # no noun after: the colour is one
    assert names.nouns("put eggplant into yellow basket") == ["eggplant", "basket"]


def test_colours_tell_two_objects_of_one_kind_apart() -> None:
    assert names.assign(["yellow block", "green block"], ["green cube", "yellow cube"]) == {0: 1, 1: 0}


def spoon_truth(image: tuple[int, int] = (128, 128)) -> EpisodeTruth:
    legs = (Leg("approach", 0, 8), Leg("grasp", 9, 11), Leg("transport", 12, 25), Leg("release", 26, 29))
    return EpisodeTruth(
        episode_id="ds:ep",
        file_path="simpler/x/episode_0/seed_0",
        task="spoon_on_towel",
        instruction="put the spoon on the towel",
        num_steps=30,
        legs=legs,
        grasp_step=10,
        release_step=27,
        image_size=image,
        objects=(
            TruthObject("spoon", "source", (0.0, 0.0, 64.0, 64.0)),
            TruthObject("towel", "target", (64.0, 64.0, 128.0, 128.0)),
        ),
        scene_objects=("spoon", "towel", "sink"),
    )


def test_truth_boxes_are_scaled_to_the_keyframe_names_matched_and_hallucinations_counted() -> None:
    objects = [
        {"name": "spoons", "box": [0.0, 0.0, 32.0, 32.0]},  # the 128-px truth box on the 64-px keyframe: IoU 1
        {"name": "blue cloth", "box": [32.0, 32.0, 64.0, 48.0]},  # half the towel: IoU 0.5
        {"name": "banana", "box": [0.0, 0.0, 10.0, 10.0]},  # in no scene: a hallucination
        {"name": "robot gripper", "box": [0.0, 0.0, 10.0, 10.0]},  # always there
        {"name": "the sink", "box": [0.0, 0.0, 10.0, 10.0]},  # in the scene, not a task object
    ]
    got = audit(row([0, 10, 27], 30, objects=objects), gripper_states(30, range(10, 27)), spoon_truth())
    assert got.task_objects == 2 and got.objects_named == 2 and got.object_recall == 1.0
    assert got.boxes_scored == 2 and got.box_iou_mean == pytest.approx(0.75) and got.boxes_iou50 == 2
    assert got.hallucinated == 1
    assert got.truth_events == 2 and got.truth_event_recall == 1.0 and got.grasp_error == 0 and got.release_error == 0
    # leg boundaries 9, 12, 26: the teacher's 10 and 27 are each 1 step off one
    assert got.truth_boundary_precision == 1.0
    assert got.large_boxes == 0 and got.boxes == 5


def test_timing_error_is_the_distance_to_the_nearest_teacher_boundary() -> None:
    got = audit(row([0, 13, 20], 30), gripper_states(30, range(10, 27)), spoon_truth())
    assert got.grasp_error == 3 and got.release_error == 7 and got.truth_event_recall == 0.0
    assert got.objects_named == 0 and got.object_recall == 0.0 and got.box_iou_mean is None


def test_the_summary_pools_counts_and_the_rank_puts_the_worst_first() -> None:
    good = audit(row([0, 10], 30, episode_id="good"), gripper_states(30, range(10, 30)))
    bad = audit(
        row([0, 3], 30, episode_id="bad"),
        gripper_states(30, range(10, 20))
        + gripper_states(30, range(24, 27))
        - 1.0,  # closes at 10, 24; opens at 20, 27
    )
    assert (good.gripper_events, good.events_matched, bad.gripper_events, bad.events_matched) == (1, 1, 4, 0)
    summary = summarise([good, bad], with_truth=False)
    assert summary["event_recall"] == pytest.approx(1 / 5)  # pooled: 1 of 5 events, not the mean of 1.0 and 0.0
    assert [a.episode_id for a in rank([good, bad])] == ["bad", "good"]
    assert (bad.rank, good.rank) == (1, 2) and bad.score > good.score
