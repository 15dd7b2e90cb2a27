"""Semantic checks on a teacher's answer: what JSON Schema cannot say.

A schema-valid answer can still tell a story the data contradicts: a plan that skips
steps, subtasks that overlap, a box outside the image, reasons for motion segments that
do not exist. These checks hold the answer against the facts of the episode, and their
messages are sent back to the teacher in a re-ask, so they say what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SemanticContext:
    """The facts of an episode an answer must agree with."""

    num_steps: int  # steps in the episode; plan ranges must cover 0 .. num_steps-1
    num_segments: int  # motion segments numbered in the prompt; one move reason each
    # (width, height) of the first keyframe sent, which boxes are in; None: no keyframe was sent (a text-only
    # prompt, `annotate --frames 0`), so there is nothing to put a box on and `objects` must be null or empty
    image_size: tuple[int, int] | None = None


def _blank(value: Any) -> bool:
    return not isinstance(value, str) or not value.strip()


def semantic_errors(answer: dict[str, Any], ctx: SemanticContext) -> list[str]:
    """Problems with a (schema-valid) teacher answer, as 'path: message' lines; empty when sound."""
    errors: list[str] = []
    last = ctx.num_steps - 1
    for key in ("observation", "situation_analysis", "spatial_reasoning"):
        if _blank(answer.get(key)):
            errors.append(f"{key}: must be a non-empty text")

    plan = answer.get("task_plan") or []
    if not plan:
        errors.append("task_plan: must list at least one subtask")
    expected_start = 0
    for i, sub in enumerate(plan):
        where = f"task_plan/{i}"
        for key in ("subtask", "reason"):
            if _blank(sub.get(key)):
                errors.append(f"{where}/{key}: must be a non-empty text")
        start, end = sub.get("start_step"), sub.get("end_step")
        if not isinstance(start, int) or not isinstance(end, int):
            errors.append(f"{where}: start_step and end_step must be integers")
            continue
        if start < 0 or end > last:
            errors.append(f"{where}: steps {start}..{end} are outside the episode (steps 0..{last})")
        if start > end:
            errors.append(f"{where}: start_step {start} is after end_step {end}")
        if start < expected_start:
            errors.append(
                f"{where}: starts at step {start}, overlapping the previous subtask (expected {expected_start})"
            )
        elif start > expected_start:
            errors.append(f"{where}: starts at step {start}, leaving steps {expected_start}..{start - 1} uncovered")
        expected_start = max(expected_start, end + 1)
    if plan and expected_start <= last:
        errors.append(f"task_plan: the last subtask ends before the last step {last}; every step must be covered")

    reasons = answer.get("move_reasons") or []
    segments = [r.get("segment") for r in reasons]
    if segments != list(range(ctx.num_segments)):
        errors.append(
            f"move_reasons: need exactly one entry per motion segment, segments 0..{ctx.num_segments - 1} in order; "
            f"got {segments}"
        )
    for i, r in enumerate(reasons):
        if _blank(r.get("reason")):
            errors.append(f"move_reasons/{i}/reason: must be a non-empty text")

    objects = answer.get("objects") or []
    if ctx.image_size is None:
        if objects:
            errors.append("objects: no image was sent, so there is nothing to put a box on; answer null")
        return errors
    w, h = ctx.image_size
    for i, obj in enumerate(objects):
        where = f"objects/{i}"
        if _blank(obj.get("name")):
            errors.append(f"{where}/name: must be a non-empty text")
        box = obj.get("box")
        if not isinstance(box, list) or len(box) != 4:
            errors.append(f"{where}/box: must be [x_min, y_min, x_max, y_max]")
            continue
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            errors.append(f"{where}/box: {box} is empty or inverted (need x_min < x_max and y_min < y_max)")
        if min(x0, y0) < 0 or x1 > w or y1 > h:
            errors.append(f"{where}/box: {box} is outside the {w}x{h} image")
    return errors
