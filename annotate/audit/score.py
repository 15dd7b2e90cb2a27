"""One episode's audit, and the output's summary of them.

Without truth an episode is held against its own motion (the gripper events and motion segments the
prompt gave the teacher, recomputed from the stored states by `annotate.primitives`), its instruction,
and the other episodes; with a `refine-eval demos` truth, also against the simulator (object boxes on
the first frame, the expert's legs, grasp and release steps, the scene's objects). Every number is a
count and a ratio of counts, so the summary pools counts over episodes (not a mean of ratios: an
episode with one gripper event weighs one event, not as much as an episode with ten).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ...schemas.truth import EpisodeTruth, scale_box
from ..primitives import gripper_events, motion_primitives, motion_segments
from ..prompts.keyframes import keyframe_size
from . import metrics, names
from .read import Spend

LARGE_BOX = 0.5  # a box covering more than this part of the first keyframe is "large"
IOU_HIT = 0.5  # the IoU at which a box counts as on its object


@dataclass
class EpisodeAudit:
    """One episode's metrics (None: not measurable for this episode, e.g. no gripper event to recall)."""

    episode_id: str
    instruction: str
    num_steps: int
    # answers and cost (the episodes table's `attempts`; tokens and cost from the output's store)
    attempts: int
    first_answer_valid: bool  # the teacher's first answer passed every check
    reasks: int  # answers re-asked with their errors: attempts - 1
    tokens: int | None  # prompt + completion over every attempt; None without the store
    cost_usd: float | None
    # the episode's own motion
    gripper_events: int
    events_matched: int  # events with a teacher boundary within ±K
    event_recall: float | None
    teacher_boundaries: int
    boundaries_matched: int  # teacher boundaries within ±K of an event or a motion-segment change
    boundary_precision: float | None
    # the instruction and the other episodes
    instruction_nouns: int
    nouns_grounded: int  # found in the observation or the objects' names
    grounding: float | None
    duplicate_observation: bool
    duplicate_plan: bool
    duplicate: bool
    boxes: int
    large_boxes: int  # boxes over LARGE_BOX of the first keyframe's area
    large_box_rate: float | None
    # against the simulator's truth (None without --truth)
    task_objects: int | None = None
    objects_named: int | None = None  # task objects the teacher named (name matching: `names`)
    object_recall: float | None = None
    boxes_scored: int | None = None  # named task objects whose truth box is known
    box_iou_mean: float | None = None
    boxes_iou50: int | None = None
    hallucinated: int | None = None  # teacher objects matching no object of the scene
    truth_events: int | None = None  # grasp and release steps the expert has
    truth_events_matched: int | None = None
    truth_event_recall: float | None = None
    grasp_error: int | None = None  # steps from the grasp to the nearest teacher boundary
    release_error: int | None = None
    leg_boundaries_matched: int | None = None  # teacher boundaries within ±K of a leg boundary
    truth_boundary_precision: float | None = None
    # the rank
    score: float = 0.0  # `metrics.combined_score` of `penalties()`: 0 best, 1 worst
    rank: int = 0  # 1 = the worst episode

    def penalties(self) -> list[float | None]:
        """Each measured quality as a penalty in [0, 1] (1 worst), None where not measured: the rank's inputs."""
        hallucinated = None if self.hallucinated is None or not self.boxes else self.hallucinated / self.boxes
        return [
            _miss(self.event_recall),
            _miss(self.boundary_precision),
            _miss(self.grounding),
            float(self.duplicate),
            self.large_box_rate,
            _miss(self.box_iou_mean),
            _miss(self.object_recall),
            hallucinated,
            _miss(self.truth_event_recall),
            _miss(self.truth_boundary_precision),
        ]

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _miss(value: float | None) -> float | None:
    return None if value is None else 1.0 - value


def episode_columns() -> list[str]:
    """The per-episode table's columns, in order."""
    return [f.name for f in fields(EpisodeAudit)]


@dataclass(frozen=True)
class DuplicateFlags:
    observation: list[bool]
    plan: list[bool]


def plan_text(task_plan: Sequence[Mapping[str, Any]]) -> str:
    """The plan as one text (subtasks and reasons, in order) for duplicate detection."""
    return " | ".join(f"{s['subtask']} {s['reason']}" for s in task_plan)


def duplicate_flags(episodes: Sequence[Mapping[str, Any]]) -> DuplicateFlags:
    """Near-duplicate observations and plans across episodes, in O(n) (hashing, no pairwise compare).

    Two texts are near-duplicates when they are equal after `metrics.normalise_text` (lowercase; digits
    and punctuation dropped; whitespace collapsed), or after `metrics.template_text` (the same, with the
    episode's own instruction words removed: one template filled with each instruction).
    """

    def flags(texts: list[str], instructions: list[str]) -> list[bool]:
        exact = metrics.shared([metrics.normalise_text(t) for t in texts])
        templated = metrics.shared([metrics.template_text(t, i) for t, i in zip(texts, instructions, strict=True)])
        return [a or b for a, b in zip(exact, templated, strict=True)]

    instructions = [str(e["instruction"]) for e in episodes]
    return DuplicateFlags(
        observation=flags([str(e["observation"] or "") for e in episodes], instructions),
        plan=flags([plan_text(e["task_plan"] or []) for e in episodes], instructions),
    )


def audit_episode(
    row: Mapping[str, Any],
    states: np.ndarray,
    tolerance: int,
    duplicate_observation: bool,
    duplicate_plan: bool,
    keyframe: tuple[int, int] | None,
    spend: Spend | None,
    truth: EpisodeTruth | None = None,
    max_side: int | None = None,
) -> EpisodeAudit:
    """The metrics of one episode row (`read.EPISODE_COLUMNS`) with its step states (T, 7).

    `keyframe` is the (width, height) of the first keyframe the teacher saw, for the large-box rate (None:
    unknown, not measured); with `truth` it is derived from the truth's frame size and `max_side` instead.
    """
    plan = list(row["task_plan"] or [])
    objects = [o for o in (row["objects"] or []) if o.get("box") is not None]
    bounds = metrics.teacher_boundaries(plan)
    events = [e.step for e in gripper_events(states)] if len(states) else []
    changes = (
        metrics.segment_changes(s.start for s in motion_segments(motion_primitives(states))) if len(states) else []
    )
    references = sorted(set(events) | set(changes))
    events_matched = metrics.count_within(events, bounds, tolerance)
    boundaries_matched = metrics.count_within(bounds, references, tolerance)

    wanted = names.nouns(str(row["instruction"]))
    seen = names.vocabulary(str(row["observation"] or ""))
    for o in objects:
        seen |= names.name_words(str(o["name"]))
    grounded = sum(1 for n in wanted if n in seen)

    if truth is not None and max_side is not None:
        keyframe = keyframe_size(*truth.image_size, max_side)
    large = (
        sum(1 for o in objects if metrics.area_fraction(o["box"], keyframe) > LARGE_BOX) if keyframe is not None else 0
    )
    attempts = int(row["attempts"] or 0)
    audit = EpisodeAudit(
        episode_id=str(row["episode_id"]),
        instruction=str(row["instruction"]),
        num_steps=int(row["num_steps"]),
        attempts=attempts,
        first_answer_valid=attempts == 1,
        reasks=max(0, attempts - 1),
        tokens=None if spend is None else spend.tokens,
        cost_usd=None if spend is None else spend.cost_usd,
        gripper_events=len(events),
        events_matched=events_matched,
        event_recall=metrics.ratio(events_matched, len(events)),
        teacher_boundaries=len(bounds),
        boundaries_matched=boundaries_matched,
        boundary_precision=metrics.ratio(boundaries_matched, len(bounds)),
        instruction_nouns=len(wanted),
        nouns_grounded=grounded,
        grounding=metrics.ratio(grounded, len(wanted)),
        duplicate_observation=duplicate_observation,
        duplicate_plan=duplicate_plan,
        duplicate=duplicate_observation or duplicate_plan,
        boxes=len(objects),
        large_boxes=large,
        large_box_rate=metrics.ratio(large, len(objects)) if keyframe is not None else None,
    )
    if truth is not None:
        _against_truth(audit, objects, bounds, truth, tolerance, keyframe)
    audit.score = metrics.combined_score(audit.penalties())
    return audit


def _against_truth(
    audit: EpisodeAudit,
    objects: list[Mapping[str, Any]],
    bounds: list[int],
    truth: EpisodeTruth,
    tolerance: int,
    keyframe: tuple[int, int] | None,
) -> None:
    """Fill the truth metrics: boxes and names against the scene, boundaries against the expert's legs."""
    teacher_names = [str(o["name"]) for o in objects]
    matched = names.assign(teacher_names, [o.name for o in truth.objects])
    ious: list[float] = []
    for i, j in matched.items():
        box = truth.objects[i].box
        if box is None:
            continue
        on_keyframe = scale_box(box, truth.image_size, keyframe) if keyframe is not None else box
        ious.append(metrics.box_iou(objects[j]["box"], on_keyframe))
    scene = [*truth.scene_objects, *(o.name for o in truth.objects)]
    audit.task_objects = len(truth.objects)
    audit.objects_named = len(matched)
    audit.object_recall = metrics.ratio(len(matched), len(truth.objects))
    audit.boxes_scored = len(ious)
    audit.box_iou_mean = metrics.ratio(sum(ious), len(ious))
    audit.boxes_iou50 = sum(1 for v in ious if v >= IOU_HIT)
    audit.hallucinated = sum(1 for n in teacher_names if not names.in_scene(n, scene))

    steps = [s for s in (truth.grasp_step, truth.release_step) if s is not None]
    audit.truth_events = len(steps)
    audit.truth_events_matched = metrics.count_within(steps, bounds, tolerance)
    audit.truth_event_recall = metrics.ratio(audit.truth_events_matched, len(steps))
    audit.grasp_error = None if truth.grasp_step is None else metrics.nearest_distance(truth.grasp_step, bounds)
    audit.release_error = None if truth.release_step is None else metrics.nearest_distance(truth.release_step, bounds)
    legs = sorted(set(truth.boundaries()))
    audit.leg_boundaries_matched = metrics.count_within(bounds, legs, tolerance)
    audit.truth_boundary_precision = metrics.ratio(audit.leg_boundaries_matched, len(bounds))


def rank(audits: list[EpisodeAudit]) -> list[EpisodeAudit]:
    """Set each audit's rank (1 = the worst: the highest score; ties by episode id) and return them in rank order."""
    ordered = sorted(audits, key=lambda a: (-a.score, a.episode_id))
    for k, a in enumerate(ordered, start=1):
        a.rank = k
    return ordered


def _sum(audits: Sequence[EpisodeAudit], name: str) -> float:
    return float(sum(v for a in audits if (v := getattr(a, name)) is not None))


def _mean(values: Sequence[float | int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarise(audits: Sequence[EpisodeAudit], with_truth: bool) -> dict[str, Any]:
    """The output's numbers, pooled over episodes (sums of counts, then ratios; None where nothing was measured)."""
    n = len(audits)
    s = {name: _sum(audits, name) for name in episode_columns() if name not in ("episode_id", "instruction")}
    out: dict[str, Any] = {
        "episodes": n,
        "event_recall": metrics.ratio(s["events_matched"], s["gripper_events"]),
        "gripper_events": int(s["gripper_events"]),
        "boundary_precision": metrics.ratio(s["boundaries_matched"], s["teacher_boundaries"]),
        "teacher_boundaries": int(s["teacher_boundaries"]),
        "grounding": metrics.ratio(s["nouns_grounded"], s["instruction_nouns"]),
        "duplicate_rate": metrics.ratio(s["duplicate"], n),
        "duplicate_observation_rate": metrics.ratio(s["duplicate_observation"], n),
        "duplicate_plan_rate": metrics.ratio(s["duplicate_plan"], n),
        "boxes": int(s["boxes"]),
        "large_box_rate": metrics.ratio(s["large_boxes"], sum(a.boxes for a in audits if a.large_box_rate is not None)),
        "attempts": int(s["attempts"]),
        "first_answer_valid_rate": metrics.ratio(s["first_answer_valid"], n),
        "reasks": int(s["reasks"]),
        "score_mean": _mean([a.score for a in audits]),
    }
    if with_truth:
        out |= {
            "box_iou_mean": metrics.ratio(
                sum((a.box_iou_mean or 0.0) * (a.boxes_scored or 0) for a in audits), s["boxes_scored"]
            ),
            "box_iou50_rate": metrics.ratio(s["boxes_iou50"], s["boxes_scored"]),
            "boxes_scored": int(s["boxes_scored"]),
            "object_recall": metrics.ratio(s["objects_named"], s["task_objects"]),
            "hallucinated_per_episode": metrics.ratio(s["hallucinated"], n),
            "truth_event_recall": metrics.ratio(s["truth_events_matched"], s["truth_events"]),
            "grasp_error_mean": _mean([a.grasp_error for a in audits]),
            "release_error_mean": _mean([a.release_error for a in audits]),
            "truth_boundary_precision": metrics.ratio(s["leg_boundaries_matched"], s["teacher_boundaries"]),
        }
    return out
