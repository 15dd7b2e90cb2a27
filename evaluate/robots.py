"""Each robot's action conventions, as SimplerEnv's own policy wrappers apply them.

A refine-train policy outputs the 7 values of its training data after the transform:
world vector (3), roll/pitch/yaw deltas (3), and an absolute open-gripper value (1 = open).
The simulators want `[world_vector, axis-angle rotation, gripper]`:

- **WidowX** (`bridge_orig`): gripper `2 * (open > 0.5) - 1` (+1 open, -1 close).
- **LIBERO's Panda** (`libero_panda`, LeRobot's LIBERO datasets): the dataset's action *is* the env's —
  robosuite OSC_POSE delta position (3) and delta axis-angle (3) in [-1, 1], gripper -1 open / +1 close —
  so it goes through as is (no Euler conversion: the rotation is already the controller's axis-angle),
  the gripper binarised at 0 (`backends/libero.py` gives the sources).
- **Google Robot** (`fractal`): the gripper is *relative* — previous open value minus the
  current one — and once |Δ| > 0.5 that command is held ("sticky") for `STICKY_REPEAT` steps,
  as SimplerEnv's RT-1 / Octo / OpenVLA wrappers do, because the real robot's controller
  needs a sustained command to close.

Everything is batched over parallel environments: arrays are (B, ...), one state per env.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import EvalError

ROBOTS = ("widowx", "google_robot", "libero_panda")
STICKY_REPEAT = {"widowx": 1, "google_robot": 15, "libero_panda": 1}  # SimplerEnv's sticky_gripper_num_repeat


def euler_to_axis_angle(rpy: np.ndarray) -> np.ndarray:
    """(B, 3) roll/pitch/yaw (static xyz, as `transforms3d.euler.euler2axangle`) -> (B, 3) axis * angle.

    Through the quaternion q = qz(yaw) qy(pitch) qx(roll), taken with w >= 0 so the angle is in
    [0, pi]: no branch near 0 or pi, unlike the rotation-matrix route.
    """
    rpy = np.asarray(rpy, dtype=np.float64).reshape(-1, 3)
    cr, sr = np.cos(rpy[:, 0] / 2), np.sin(rpy[:, 0] / 2)
    cp, sp = np.cos(rpy[:, 1] / 2), np.sin(rpy[:, 1] / 2)
    cy, sy = np.cos(rpy[:, 2] / 2), np.sin(rpy[:, 2] / 2)
    w = cy * cp * cr + sy * sp * sr
    v = np.stack([cy * cp * sr - sy * sp * cr, cy * sp * cr + sy * cp * sr, sy * cp * cr - cy * sp * sr], axis=1)
    sign = np.where(w < 0, -1.0, 1.0)
    w, v = w * sign, v * sign[:, None]
    norm = np.linalg.norm(v, axis=1)
    angle = 2.0 * np.arctan2(norm, w)
    scale = np.where(norm > 1e-12, angle / np.maximum(norm, 1e-12), 2.0)  # small angles: 2 * v
    out: np.ndarray = v * scale[:, None]
    return out


@dataclass
class GripperState:
    """Per-env sticky-gripper state for robots whose gripper command is relative (Google Robot)."""

    robot: str
    n_envs: int
    previous: np.ndarray | None = None
    sticky_on: np.ndarray = field(init=False)
    sticky_action: np.ndarray = field(init=False)
    repeat: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.robot not in ROBOTS:
            raise EvalError(f"unknown robot {self.robot!r} (known: {', '.join(ROBOTS)})")
        self.sticky_on = np.zeros(self.n_envs, dtype=bool)
        self.sticky_action = np.zeros(self.n_envs)
        self.repeat = np.zeros(self.n_envs, dtype=np.int64)

    def command(self, open_gripper: np.ndarray) -> np.ndarray:
        """(B,) open-gripper outputs -> (B, 1) env gripper commands."""
        current = np.asarray(open_gripper, dtype=np.float64).reshape(self.n_envs)
        if self.robot == "widowx":
            return (2.0 * (current > 0.5) - 1.0)[:, None]
        if self.robot == "libero_panda":  # already robosuite's sign: +1 close, -1 open
            return np.where(current > 0.0, 1.0, -1.0)[:, None]
        relative = np.zeros(self.n_envs) if self.previous is None else self.previous - current
        self.previous = current
        start = (np.abs(relative) > 0.5) & ~self.sticky_on
        self.sticky_on |= start
        self.sticky_action = np.where(start, relative, self.sticky_action)
        self.repeat += self.sticky_on
        relative = np.where(self.sticky_on, self.sticky_action, relative)
        done = self.sticky_on & (self.repeat == STICKY_REPEAT[self.robot])
        self.sticky_on &= ~done
        self.repeat[done] = 0
        self.sticky_action[done] = 0.0
        return relative[:, None]


def env_actions(raw: np.ndarray, gripper: GripperState) -> dict[str, np.ndarray]:
    """(B, 7) unnormalised model outputs -> SimplerEnv's action dict (B, ...) for this robot."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, 7)
    rotation = raw[:, 3:6].copy() if gripper.robot == "libero_panda" else euler_to_axis_angle(raw[:, 3:6])
    return {
        "world_vector": raw[:, :3].copy(),
        "rot_axangle": rotation,
        "gripper": gripper.command(raw[:, 6]),
        "terminate_episode": np.zeros((len(raw), 1)),
    }


def raw_action_dict(raw: np.ndarray) -> dict[str, np.ndarray]:
    """SimplerEnv's raw_action: world_vector, rotation_delta, open_gripper (B, ...)."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, 7)
    return {"world_vector": raw[:, :3], "rotation_delta": raw[:, 3:6], "open_gripper": raw[:, 6:7]}


def flat_env_action(action: dict[str, np.ndarray]) -> np.ndarray:
    """(B, 7) = [world_vector, rot_axangle, gripper], what ManiSkill's `step` takes."""
    return np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]], axis=1)
