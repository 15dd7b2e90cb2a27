"""A correct rationale for any refinevla prompt, read from the prompt's own text: what the emulators
(and the tests' live fake teacher) answer when a run should succeed.

Correct means it passes the schema and the semantic checks (`schemas/semantic.py`) for the episode the
prompt describes: two subtasks that tile the episode's steps, one reason per motion segment, one box
inside a 64-pixel frame. Its words are fixed (a spoon and a towel): it measures the machinery, never
a teacher.
"""

from __future__ import annotations

import re
from typing import Any

_STEPS = re.compile(r"The episode has (\d+) steps")
_SEGMENT = re.compile(r"^\d+\. steps \d+\.\.\d+:", flags=re.M)


def rationale_for_prompt(user_text: str) -> dict[str, Any]:
    """A correct answer for the prompt's episode (steps and segments read from the prompt text)."""
    found = _STEPS.search(user_text)
    if found is None:
        raise ValueError("not a refinevla rationale prompt: no 'The episode has N steps' line")
    return rationale(int(found.group(1)), len(_SEGMENT.findall(user_text)))


def rationale(steps: int, segments: int) -> dict[str, Any]:
    """A correct answer for an episode of `steps` steps and `segments` motion segments."""
    half = steps // 2
    return {
        "observation": "A spoon lies on the table next to a blue towel.",
        "situation_analysis": "The spoon must be grasped and moved onto the towel.",
        "spatial_reasoning": "The towel is to the left of the spoon; the gripper moves forward then up.",
        "task_plan": [
            {"subtask": "grasp the spoon", "reason": "it must be held first", "start_step": 0, "end_step": half - 1},
            {"subtask": "place it on the towel", "reason": "the goal", "start_step": half, "end_step": steps - 1},
        ],
        "objects": [{"name": "spoon", "box": [4, 4, 20, 20]}],
        "move_reasons": [{"segment": i, "reason": f"reason for segment {i}"} for i in range(segments)],
    }
