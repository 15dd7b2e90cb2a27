"""Embodied-CoT motion primitives, against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla.annotate.primitives import (
    GripperEvent,
    describe_move,
    gripper_events,
    gripper_positions,
    motion_primitives,
    move_vector,
)


def states(n: int, **cols: list[float] | np.ndarray) -> np.ndarray:
    s = np.zeros((n, 7))
    s[:, 6] = 1.0
    for i, name in enumerate(["x", "y", "z", "roll", "pitch", "yaw", "g"]):
        if name in cols:
            s[:, i] = cols[name]
    return s


def test_forward_motion_uses_a_four_step_window_and_the_dead_zone() -> None:
    # x grows 0.02/step: window diffs 0.06, 0.06, 0.06, then 0.04 (3..5), 0.02 (4..5) -> stop; last copies.
    s = states(6, x=np.arange(6) * 0.02)
    assert motion_primitives(s) == ["move forward"] * 4 + ["stop", "stop"]


def test_exactly_the_dead_zone_is_not_a_move() -> None:
    assert move_vector(np.array([0.03, -0.03, 0.0, 0, 0, 0, 0])).tolist() == [0] * 7
    assert move_vector(np.array([0.0301, -0.0301, 0.0, 0, 0, 0, 0])).tolist() == [1, -1, 0, 0, 0, 0, 0]


def test_large_xyz_is_capped_to_l1_0_09_before_thresholding() -> None:
    # (0.5, 0.05, 0): scaled by 0.09/0.55 -> (0.0818, 0.0082): y falls inside the dead zone.
    assert move_vector(np.array([0.5, 0.05, 0.0, 0, 0, 0, 0])).tolist() == [1, 0, 0, 0, 0, 0, 0]
    # unscaled, 0.05 in y alone is a move
    assert move_vector(np.array([0.0, 0.05, 0.0, 0, 0, 0, 0])).tolist() == [0, 1, 0, 0, 0, 0, 0]


def test_rotations_are_divided_by_ten() -> None:
    assert move_vector(np.array([0, 0, 0, 0.2, 0, 0, 0])).tolist() == [0] * 7  # 0.02 < 0.03
    assert move_vector(np.array([0, 0, 0, 0.4, 0, -0.5, 0])).tolist() == [0, 0, 0, 1, 0, -1, 0]


@pytest.mark.parametrize(
    ("vec", "label"),
    [
        ([1, 1, 0, 0, 0, 0, 0], "move forward left"),
        ([-1, -1, -1, 0, 0, 0, 0], "move backward right down"),
        ([0, 0, 1, -1, 0, 0, 0], "move up, tilt down"),
        ([0, 0, 0, 0, 1, 0, 0], "tilt up"),  # pitch used when roll is zero
        ([0, 0, 0, 1, -1, 0, 0], "tilt up"),  # roll wins over pitch
        ([0, 0, 0, 0, 0, 1, -1], "rotate counterclockwise, close gripper"),
        ([0, 0, 0, 0, 0, -1, 1], "rotate clockwise, open gripper"),
        ([0, 0, 0, 0, 0, 0, 0], "stop"),
    ],
)
def test_labels_follow_ecot(vec: list[int], label: str) -> None:
    assert describe_move(np.array(vec)) == label


def test_gripper_closing_appears_in_primitives_and_events() -> None:
    g = [1, 1, 1, 0, 0, 0, 1, 1]
    s = states(8, g=g)
    prims = motion_primitives(s)
    assert prims[0] == "close gripper"  # window 0..3 sees 1 -> 0
    assert prims[4] == "open gripper"  # window 4..7 sees 0 -> 1
    assert gripper_positions(s) == ["open"] * 3 + ["closed"] * 3 + ["open"] * 2
    assert gripper_events(s) == [GripperEvent(3, "close"), GripperEvent(6, "open")]


def test_degenerate_lengths_and_bad_shapes() -> None:
    assert motion_primitives(states(1)) == ["stop"]
    assert motion_primitives(np.zeros((0, 7))) == []
    with pytest.raises(ValueError, match=r"\(T, 7\)"):
        motion_primitives(np.zeros((4, 6)))


def test_vectorised_windows_match_the_per_window_rule() -> None:
    from refinevla.annotate.primitives import WINDOW, motion_vectors

    rng = np.random.default_rng(3)
    s = np.cumsum(rng.normal(0, 0.02, (40, 7)), axis=0)
    s[:, 3:6] *= 10
    got = motion_vectors(s)
    n = len(s)
    expected = [move_vector(s[min(t + WINDOW - 1, n - 1)] - s[t]) for t in range(n - 1)]
    expected.append(expected[-1])
    np.testing.assert_array_equal(got, np.stack(expected))
