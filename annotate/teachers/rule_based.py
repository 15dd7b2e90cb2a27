"""The offline teacher: fills only what the data determines, and says so.

Subtasks are split at gripper events (a grasp or a release is where a manipulation task
changes phase), moves and gripper states come from proprio, and the episode texts are
composed from the instruction, the trajectory's extent and the events. No model looks at
the images, so the texts never describe the scene: they say that they are rule-based.
It answers through the same path as a model (JSON text -> validation -> store), so the
rest of the pipeline cannot tell it apart and is exercised by it.
"""

from __future__ import annotations

import json
from typing import Any

from ..prompts import EpisodeFacts
from .base import TeacherRequest, TeacherResponse

_AXES = (("forward", "backward"), ("left", "right"), ("up", "down"))


def _phases(facts: EpisodeFacts) -> list[tuple[int, int, str, str]]:
    """(start, end, subtask, reason) parts of the episode, split at gripper events."""
    bounds = [0, *[e.step for e in facts.events], facts.num_steps]
    task = facts.instruction
    parts = []
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1] - 1
        if end < start:
            continue
        state = facts.gripper[start]
        nxt = facts.events[i].kind if i < len(facts.events) else None
        if nxt == "close":
            sub, why = (
                "reach the object and grasp it",
                f"the gripper is open and must take hold of the object to {task}",
            )
        elif nxt == "open":
            sub, why = "carry the object and release it", f"the object is held and must be put down to {task}"
        elif state == "closed":
            sub, why = _held_phase(facts.moves[start : end + 1], task)
        elif facts.events:
            sub, why = "move the gripper away", "the object has been released, so the gripper withdraws"
        else:
            sub, why = task, "the whole episode serves the instruction; the gripper does not change state"
        parts.append((start, end, sub, why))
    return parts


def _held_phase(moves: list[str], task: str) -> tuple[str, str]:
    """Name the phase after a grasp that lasts to the end, from the moves made in it."""
    made = [m.removeprefix("move ") for m in moves if m.startswith("move ")]
    if not made:
        return "hold the object in place", f"the gripper stays closed until the end to {task}"
    if any("up" in m.split() for m in made):
        return "lift the object", f"the object is held and is raised to {task}"
    main = max(set(made), key=made.count)
    return f"move the object {main}", f"the object is held and is carried {main} to {task}"


def _displacement(facts: EpisodeFacts) -> str:
    words = []
    for axis, (pos, neg) in enumerate(_AXES):
        d = facts.end_xyz[axis] - facts.start_xyz[axis]
        if abs(d) >= 0.005:
            words.append(f"{abs(d):.2f} m {pos if d > 0 else neg}")
    return ", ".join(words) if words else "almost nowhere"


def rule_based_answer(facts: EpisodeFacts) -> dict[str, Any]:
    """The teacher-written part of a rationale, from the facts alone."""
    phases = _phases(facts)
    events = (
        "; ".join(f"the gripper {'closes' if e.kind == 'close' else 'opens'} at step {e.step}" for e in facts.events)
        or "the gripper does not change state"
    )
    plan = [{"subtask": s, "reason": r, "start_step": a, "end_step": b} for a, b, s, r in phases]

    def subtask_at(step: int) -> str:
        return next(s for a, b, s, _ in phases if a <= step <= b)

    move_reasons = [
        {"segment": i, "reason": f"to {subtask_at(seg.start)}, the robot makes the move '{seg.move}'"}
        for i, seg in enumerate(facts.segments)
    ]
    return {
        "observation": (
            f"Rule-based annotation, no model looked at the images. The robot is asked to {facts.instruction!r}; "
            f"the gripper starts {facts.gripper[0]} at position {facts.start_xyz}."
        ),
        "situation_analysis": (
            f"The episode has {facts.num_steps} steps; {events}, so the task has {len(phases)} phase(s)."
        ),
        "spatial_reasoning": (
            f"From {facts.start_xyz} to {facts.end_xyz} the end effector moves {_displacement(facts)}."
        ),
        "task_plan": plan,
        "objects": None,
        "move_reasons": move_reasons,
    }


class RuleBasedTeacher:
    """No model: answers from the episode's facts. Free, deterministic, offline."""

    name = "rule-based"
    model = "rule-based/2"  # bump when the rules change: old answers then get new keys
    paid = False

    def sampling(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        return None

    async def complete(self, request: TeacherRequest, timeout: float) -> TeacherResponse:
        text = json.dumps(rule_based_answer(request.facts), ensure_ascii=False)
        return TeacherResponse(text=text, finish_reason="stop", model=self.model)

    async def close(self) -> None:
        return None
