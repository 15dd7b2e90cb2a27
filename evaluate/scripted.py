"""What the policies without a model share (`replay:`, `zero:`): they choose the robot's training-space
action themselves and send it through the same `robots.env_actions` as a trained policy, writing no rationale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..train.policy import Generated
from .robots import GripperState, env_actions, raw_action_dict


class ScriptedPolicy:
    """A policy whose (B, 7) raw actions are given (`act`); `reset`, `rationales` and `last` as RefinePolicy's."""

    reasoning = False

    def __init__(self, robot: str) -> None:
        self.robot = robot
        self.gripper = GripperState(robot, 1)
        self.last: list[Generated] = []

    def reset(self, instructions: str | Sequence[str]) -> None:
        n = 1 if isinstance(instructions, str) else len(instructions)
        self.gripper = GripperState(self.robot, n)
        self.last = []

    def act(self, raw: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(raw_action, env_action) of these raw rows, each env's gripper state carried on."""
        self.last = [Generated("", [], row, False, 0) for row in raw]
        return raw_action_dict(raw), env_actions(raw, self.gripper)

    @property
    def rationales(self) -> list[str]:
        return ["" for _ in self.last]
