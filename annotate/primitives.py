"""Motion primitives and gripper events, computed from proprio (Embodied-CoT's rule).

These are facts about the trajectory, not teacher output: the teacher is *given*
them, and semantic checks hold its story against them. The rule reproduces ECoT's
published `move_primitive` features so rationales can be joined with theirs:

* window: ``diff = state[min(t+3, T-1)] - state[t]`` for ``t < T-1`` (ECoT slices
  ``states[t:t+4]``, so the last windows are shorter); the final step copies the one
  before it;
* if ``sum(|diff[:3]|) > 0.09`` the xyz part is rescaled so the sum equals 0.09;
* rotation deltas are divided by 10;
* each axis is the sign of its delta with a dead zone of ±0.03;
* labels: x forward/backward, y left/right, z up/down, roll (else pitch) tilt
  up/down, yaw rotate counterclockwise/clockwise, gripper open/close; "stop" when
  all axes are zero.

States are ``[x, y, z, roll, pitch, yaw, gripper]`` with gripper 1 = open.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

DEAD_ZONE = 0.03  # per-axis threshold on the (scaled) 4-step state difference
WINDOW = 4  # states t .. t+3
XYZ_CAP = 3 * DEAD_ZONE  # 0.09: the L1 norm the xyz delta is capped to
ROTATION_SCALE = 10.0  # rotation deltas are divided by this

_AXIS_NAMES: tuple[dict[int, str], ...] = (
    {-1: "backward", 1: "forward"},
    {-1: "right", 1: "left"},
    {-1: "down", 1: "up"},
    {-1: "tilt down", 1: "tilt up"},
    {},  # pitch shares roll's labels
    {-1: "rotate clockwise", 1: "rotate counterclockwise"},
    {-1: "close gripper", 1: "open gripper"},
)


def move_vector(window_diff: np.ndarray) -> np.ndarray:
    """Per-axis direction in {-1, 0, 1} (7,) for one window's state difference."""
    diff = np.array(window_diff, dtype=np.float64, copy=True)
    l1 = float(np.abs(diff[:3]).sum())
    if l1 > XYZ_CAP:
        diff[:3] *= XYZ_CAP / l1
    diff[3:6] /= ROTATION_SCALE
    return (diff > DEAD_ZONE).astype(np.int64) - (diff < -DEAD_ZONE).astype(np.int64)


def describe_move(vec: np.ndarray) -> str:
    """ECoT's label for a move vector, e.g. "move forward left, tilt up, close gripper"."""
    parts: list[str] = []
    xyz = [_AXIS_NAMES[i][int(vec[i])] for i in range(3) if vec[i] != 0]
    if xyz:
        parts.append("move " + " ".join(xyz))
    tilt = int(vec[3]) if vec[3] != 0 else int(vec[4])  # roll, else pitch
    if tilt != 0:
        parts.append(_AXIS_NAMES[3][tilt])
    if vec[5] != 0:
        parts.append(_AXIS_NAMES[5][int(vec[5])])
    if vec[6] != 0:
        parts.append(_AXIS_NAMES[6][int(vec[6])])
    return ", ".join(parts) if parts else "stop"


def _check_states(states: np.ndarray) -> np.ndarray:
    arr = np.asarray(states, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 7:
        raise ValueError(f"states must be (T, 7) [x,y,z,roll,pitch,yaw,gripper], got shape {arr.shape}")
    return arr


def motion_vectors(states: np.ndarray) -> np.ndarray:
    """(T, 7) move vectors, one per step (see module docstring for the rule).

    Vectorised over steps: the same arithmetic as `move_vector`, applied to all windows at once
    (the annotation engine computes this for every episode it prepares).
    """
    arr = _check_states(states)
    n = arr.shape[0]
    if n <= 1:
        return np.zeros((n, 7), dtype=np.int64)
    ends = np.minimum(np.arange(n - 1) + WINDOW - 1, n - 1)
    diff = arr[ends] - arr[: n - 1]
    l1 = np.abs(diff[:, :3]).sum(axis=1)
    scale = np.where(l1 > XYZ_CAP, XYZ_CAP / np.where(l1 > 0, l1, 1.0), 1.0)
    diff[:, :3] *= scale[:, None]
    diff[:, 3:6] /= ROTATION_SCALE
    vecs = (diff > DEAD_ZONE).astype(np.int64) - (diff < -DEAD_ZONE).astype(np.int64)
    return np.concatenate([vecs, vecs[-1:]], axis=0)


@cache
def _label(vec: tuple[int, ...]) -> str:
    return describe_move(np.asarray(vec))


def motion_primitives(states: np.ndarray) -> list[str]:
    """One ECoT motion-primitive label per step.

    There are at most 3^7 move vectors, so labels are memoised per vector: labelling a
    step is a dict lookup, not seven numpy element reads.
    """
    return [_label(tuple(v)) for v in motion_vectors(states).tolist()]


@dataclass(frozen=True)
class MotionSegment:
    """Consecutive steps sharing one motion primitive."""

    start: int
    end: int  # inclusive
    move: str


def motion_segments(moves: list[str]) -> list[MotionSegment]:
    """The motion segments of per-step primitive labels: the numbered segments the prompt lists (one
    `move_reasons` entry each) and the audit scores subtask boundaries against."""
    segments: list[MotionSegment] = []
    for t, move in enumerate(moves):
        if segments and segments[-1].move == move:
            segments[-1] = MotionSegment(segments[-1].start, t, move)
        else:
            segments.append(MotionSegment(t, t, move))
    return segments


GripperPosition = Literal["open", "closed"]


@dataclass(frozen=True)
class GripperEvent:
    """The gripper changed state at `step` (the first step in the new state)."""

    step: int
    kind: Literal["close", "open"]


def gripper_positions(states: np.ndarray, threshold: float = 0.5) -> list[GripperPosition]:
    """ "open"/"closed" per step from the state's gripper opening (1 = open)."""
    arr = _check_states(states)
    return ["open" if g > threshold else "closed" for g in arr[:, 6]]


def gripper_events(states: np.ndarray, threshold: float = 0.5) -> list[GripperEvent]:
    """Where the gripper closes (grasp) or opens (release): subtask boundaries."""
    pos = gripper_positions(states, threshold)
    return [
        GripperEvent(t, "close" if pos[t] == "closed" else "open") for t in range(1, len(pos)) if pos[t] != pos[t - 1]
    ]
