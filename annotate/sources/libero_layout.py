"""LeRobot's LIBERO layout: how the `lerobot:` reader recognises it, and the 7-D state it reads from it.

LeRobot's (and openpi's) LIBERO datasets store one 8-D `observation.state`: end-effector position (3), its
orientation as axis-angle (3, robosuite's `quat2axisangle` of `robot0_eef_quat`) and the two finger joint
positions (`robot0_gripper_qpos`, 2) — the state `evaluate/backends/libero.py` gives a policy. refinevla's
motion primitives read a 7-D end-effector state [x, y, z, roll, pitch, yaw, gripper opening in 0..1], so a
dataset in that layout is converted on read (`libero_state`), and its actions are LIBERO's own (robosuite's
OSC deltas in [-1, 1], gripper -1 open / +1 close): the robot `libero_panda`, no transform
(`LIBERO_DECLARATION`, what `refine-eval demos --suite libero` declares in its `refinevla_source.json`).

Recognised (`is_libero_layout`) only when every sign agrees, so another robot's 8-D state is never converted
silently: `robot_type` "panda" (LeRobot's LIBERO conversions write it), both LIBERO cameras
(`observation.images.image` and `.wrist_image`), an 8-D `observation.state` and a 7-D `action`. A dataset that
passes and still is not LIBERO's is caught on read: its state's last two columns must be the Panda's finger
joint positions, else one line names the file and the feature (and `--state-key` maps another state).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SourceError

LIBERO_ROBOT_TYPE = "panda"  # info.json `robot_type` of LeRobot's LIBERO datasets
LIBERO_CAMERAS = ("observation.images.image", "observation.images.wrist_image")  # agentview, wrist
LIBERO_STATE_KEY = "observation.state"
LIBERO_STATE_DIM = 8  # eef xyz (3) + eef axis-angle (3) + finger qpos (2)
LIBERO_ACTION_DIM = 7
# what a LIBERO dataset's actions need and drive (refine-eval demos --suite libero declares the same)
LIBERO_DECLARATION: dict[str, str] = {"transform": "none", "robot": "libero_panda"}
LIBERO_STATE_TRANSFORM = "libero_axis_angle_qpos"  # the conversion's name, as the published layout records it
# The Panda gripper's finger joints (robosuite 1.4 `models/assets/grippers/panda_gripper.xml`): finger_joint1
# slides over range "0.0 0.04", finger_joint2 over "-0.04 0.0" (metres); `robot0_gripper_qpos` is the pair, so
# q1 - q2 runs from 0 (closed) to 0.08 (open).
FINGER_TRAVEL = 0.04
FINGER_GAP = 2 * FINGER_TRAVEL
FINGER_SLACK = 0.005  # m beyond the joint range a simulated finger may read (contact penetration), still Panda


def is_libero_layout(info: dict[str, Any]) -> bool:
    """Whether a LeRobot `meta/info.json` is in LeRobot's LIBERO layout (see the module's docstring)."""
    features = info.get("features") or {}
    robot = str(info.get("robot_type") or "").lower()
    return (
        robot == LIBERO_ROBOT_TYPE
        and all(key in features for key in LIBERO_CAMERAS)
        and _dim(features.get(LIBERO_STATE_KEY)) == LIBERO_STATE_DIM
        and _dim(features.get("action")) == LIBERO_ACTION_DIM
    )


def _dim(feature: Any) -> int | None:
    """A vector feature's length (shape [D]); None for anything else."""
    shape = feature.get("shape") if isinstance(feature, dict) else None
    return int(shape[0]) if isinstance(shape, list | tuple) and len(shape) == 1 else None


def gripper_opening(qpos: np.ndarray) -> np.ndarray:
    """The Panda's finger joint pair (..., 2) -> the opening in 0..1 (0 closed, 1 fully open)."""
    q = np.asarray(qpos, dtype=np.float64)
    return np.clip((q[..., 0] - q[..., 1]) / FINGER_GAP, 0.0, 1.0)


def _panda_fingers(qpos: np.ndarray) -> bool:
    """Whether (T, 2) values lie in the Panda's finger joint ranges (finger 1 opens to +, finger 2 to -)."""
    lo, hi = -FINGER_SLACK, FINGER_TRAVEL + FINGER_SLACK
    return bool(np.all((qpos[:, 0] >= lo) & (qpos[:, 0] <= hi) & (-qpos[:, 1] >= lo) & (-qpos[:, 1] <= hi)))


def axis_angle_to_euler(rotvec: np.ndarray) -> np.ndarray:
    """(T, 3) axis * angle -> (T, 3) roll/pitch/yaw, extrinsic xyz (R = Rz(yaw) Ry(pitch) Rx(roll)), as
    scipy's `as_euler("xyz")`. numpy alone: the core install (annotate) has no scipy."""
    v = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    angle = np.linalg.norm(v, axis=1)
    axis = v / np.where(angle > 1e-12, angle, 1.0)[:, None]
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    c, s, t = np.cos(angle), np.sin(angle), 1.0 - np.cos(angle)
    # Rodrigues' rotation matrix: only the entries the angles need
    r00, r10 = t * x * x + c, t * x * y + s * z
    r20, r21, r22 = t * x * z - s * y, t * y * z + s * x, t * z * z + c
    roll = np.arctan2(r21, r22)
    pitch = np.arctan2(-r20, np.hypot(r21, r22))
    yaw = np.arctan2(r10, r00)
    return np.stack([roll, pitch, yaw], axis=1)


def libero_state(state: np.ndarray, where: str) -> np.ndarray:
    """LIBERO's 8-D states (T, 8) -> the 7-D states (T, 7) motion primitives read: xyz, roll/pitch/yaw (extrinsic
    xyz Euler angles of the axis-angle's rotation, as `refine-eval demos` computes them from the quaternion),
    gripper opening. `where` names the file and feature in the one-line error for a state that is not LIBERO's."""
    s = np.asarray(state, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != LIBERO_STATE_DIM:
        raise SourceError(f"{where}: LIBERO's state is 8-D (eef xyz, axis-angle, finger qpos); got {s.shape}")
    fingers = s[:, 6:8]
    if not _panda_fingers(fingers):
        raise SourceError(
            f"{where}: columns 6-7 are not the Panda's finger joint positions (0..{FINGER_TRAVEL}, "
            f"-{FINGER_TRAVEL}..0 m; found {fingers.min():.3f}..{fingers.max():.3f}), so this is not LIBERO's "
            "8-D state; map a 7-D [x, y, z, roll, pitch, yaw, gripper] state with --state-key"
        )
    rpy = axis_angle_to_euler(s[:, 3:6])
    out = np.concatenate([s[:, :3], rpy, gripper_opening(fingers)[:, None]], axis=1)
    return out.astype(np.float32)
