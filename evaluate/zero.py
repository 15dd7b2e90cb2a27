"""`--policy zero:`: the trivial policy — no motion, gripper open, every step, on any robot.

A floor for a suite (what doing nothing scores: 0% on LIBERO and SimplerEnv, unless a scene starts solved)
and a way to check a simulator, its conventions and the results folder without a checkpoint. It speaks the
robot's own training-space action, so its command goes through the same `robots.env_actions` as a trained
policy's: WidowX / Google Robot open the gripper with +1 (Bridge's absolute open-gripper), LIBERO's Panda
with -1 (robosuite's sign, as LeRobot's LIBERO datasets store it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import EvalError
from .robots import ROBOTS
from .scripted import ScriptedPolicy

PREFIX = "zero:"
OPEN = {"widowx": 1.0, "google_robot": 1.0, "libero_panda": -1.0}  # the raw gripper value that means open


def is_zero(policy: object) -> bool:
    return str(policy).startswith(PREFIX)


class ZeroPolicy(ScriptedPolicy):
    """Holds still with the gripper open; the robot is the suite's (or --robot)."""

    def __init__(self, spec: object, robot: str | None) -> None:
        if str(spec) != PREFIX:
            raise EvalError(f"--policy {spec}: the trivial policy is spelled {PREFIX} (nothing after the colon)")
        if robot not in ROBOTS:
            raise EvalError(f"--policy {PREFIX}: give the robot with --robot {'|'.join(ROBOTS)} (the suite names none)")
        super().__init__(robot)

    def step(self, image: np.ndarray, instructions: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        images = np.asarray(image)
        raw = np.zeros((len(images) if images.ndim == 4 else 1, 7))
        raw[:, 6] = OPEN[self.robot]
        return self.act(raw)

    def describe(self) -> dict[str, Any]:
        return {"path": PREFIX, "name": PREFIX, "robot": self.robot, "reasoning_trained": False}

    def digest(self) -> str:
        return f"{PREFIX}{self.robot}"
