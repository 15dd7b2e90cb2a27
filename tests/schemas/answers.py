"""A correct teacher answer for a 10-step episode, shared by the schema tests."""

from __future__ import annotations

from typing import Any


def good_answer(segments: int = 2) -> dict[str, Any]:
    return {
        "observation": "A spoon on a table.",
        "situation_analysis": "Grasp the spoon.",
        "spatial_reasoning": "The towel is left.",
        "task_plan": [
            {"subtask": "grasp", "reason": "first", "start_step": 0, "end_step": 4},
            {"subtask": "place", "reason": "then", "start_step": 5, "end_step": 9},
        ],
        "objects": [{"name": "spoon", "box": [1, 2, 30, 40]}],
        "move_reasons": [{"segment": i, "reason": "abcdefgh"[i % 8]} for i in range(segments)],
    }
