"""Each robot's action conventions against SimplerEnv's own wrappers (OpenVLA / Octo), restated here.

The Google Robot sticky gripper is compared step by step with a literal, per-env re-statement of
the wrapper's `step` (one Python object per env, scalars only), so a batched implementation that
leaks state across envs or resets at the wrong step fails. Euler -> axis-angle is checked against
rotation matrices built by hand (static xyz: R = Rz(yaw) Ry(pitch) Rx(roll)) and, where installed,
`transforms3d.euler.euler2axangle`, which is what SimplerEnv calls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refinevla.evaluate.errors import EvalError
from refinevla.evaluate.robots import (
    STICKY_REPEAT,
    GripperState,
    env_actions,
    euler_to_axis_angle,
    flat_env_action,
    raw_action_dict,
)


# ---------------------------------------------------------------- references written for the tests
class SimplerStickyGripper:
    """SimplerEnv's google_robot gripper post-processing for ONE env, as its wrappers write it."""

    def __init__(self, sticky_gripper_num_repeat: int = 15) -> None:
        self.sticky_gripper_num_repeat = sticky_gripper_num_repeat
        self.sticky_action_is_on = False
        self.gripper_action_repeat = 0
        self.sticky_gripper_action = 0.0
        self.previous_gripper_action: float | None = None

    def step(self, current_gripper_action: float) -> float:
        if self.previous_gripper_action is None:
            relative_gripper_action = 0.0
        else:
            relative_gripper_action = self.previous_gripper_action - current_gripper_action
        self.previous_gripper_action = current_gripper_action

        if abs(relative_gripper_action) > 0.5 and not self.sticky_action_is_on:
            self.sticky_action_is_on = True
            self.sticky_gripper_action = relative_gripper_action

        if self.sticky_action_is_on:
            self.gripper_action_repeat += 1
            relative_gripper_action = self.sticky_gripper_action

        if self.gripper_action_repeat == self.sticky_gripper_num_repeat:
            self.sticky_action_is_on = False
            self.gripper_action_repeat = 0
            self.sticky_gripper_action = 0.0
        return relative_gripper_action


def rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def sxyz_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """transforms3d's default 'sxyz' convention: static axes, roll about x first."""
    return rz(yaw) @ ry(pitch) @ rx(roll)


def matrix_to_rotvec(r: np.ndarray) -> np.ndarray:
    """Axis * angle from a rotation matrix whose angle is well inside (0, pi)."""
    angle = math.acos((np.trace(r) - 1.0) / 2.0)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2.0 * math.sin(angle))
    return axis * angle


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues' formula."""
    angle = float(np.linalg.norm(v))
    if angle == 0.0:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)


# ---------------------------------------------------------------- WidowX gripper
def test_widowx_gripper_is_plus_one_above_half_minus_one_at_or_below() -> None:
    opens = np.array([1.0, 0.9, 0.5000001, 0.5, 0.4999999, 0.0, -0.3, 1.7])
    out = GripperState("widowx", len(opens)).command(opens)
    assert out.shape == (len(opens), 1)
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]


def test_widowx_gripper_has_no_memory_across_steps() -> None:
    state = GripperState("widowx", 2)
    seq = [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (1.0, 0.0)]  # what would trigger Google Robot's sticky logic
    for a, b in seq:
        out = state.command(np.array([a, b]))
        assert out[:, 0].tolist() == [2.0 * (a > 0.5) - 1.0, 2.0 * (b > 0.5) - 1.0]


def test_unknown_robot_is_an_eval_error() -> None:
    with pytest.raises(EvalError, match="franka"):
        GripperState("franka", 1)


# ---------------------------------------------------------------- Google Robot sticky gripper
def _steps(*runs: tuple[float, int]) -> list[float]:
    """[(value, n), ...] -> the value repeated n times, run after run."""
    return [v for v, n in runs for _ in range(n)]


SEQUENCES = {
    "close_then_reopen": _steps((1.0, 4), (0.0, 25), (1.0, 25)),
    "reopen_inside_sticky_window": _steps((1.0, 3), (0.0, 5), (1.0, 30)),
    "toggle_every_step": [float(t % 2) for t in range(50)],
    "small_drift_never_sticks": [1.0 - 0.1 * t for t in range(11)] + [0.1 * t for t in range(11)],
    "exactly_half_is_not_enough": _steps((1.0, 2), (0.5, 3), (1.0, 3), (0.5, 20)),
    "starts_closed_opens_late": _steps((0.0, 20), (1.0, 1), (0.0, 20)),
    "noisy": np.random.default_rng(0).uniform(0.0, 1.0, 60).round(3).tolist(),
}


def reference(seq: list[float]) -> list[float]:
    ref = SimplerStickyGripper(STICKY_REPEAT["google_robot"])
    return [ref.step(v) for v in seq]


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_google_robot_gripper_matches_simplerenv_step_by_step(name: str) -> None:
    seq = SEQUENCES[name]
    state = GripperState("google_robot", 1)
    got = [float(state.command(np.array([v]))[0, 0]) for v in seq]
    assert got == pytest.approx(reference(seq), abs=1e-12)


def test_google_robot_sticky_repeat_is_simplerenvs_fifteen() -> None:
    assert STICKY_REPEAT["google_robot"] == 15
    assert STICKY_REPEAT["widowx"] == 1


def test_google_robot_close_is_held_for_fifteen_steps_by_hand() -> None:
    # open, open, then close: previous - current = 1 - 0 = +1 at t=2, held for t=2..16, then 0 - 0 = 0
    seq = _steps((1.0, 2), (0.0, 20))
    state = GripperState("google_robot", 1)
    got = [float(state.command(np.array([v]))[0, 0]) for v in seq]
    assert got[:2] == [0.0, 0.0]  # first step: no previous -> 0; second: 1 - 1
    assert got[2:17] == [1.0] * 15
    assert got[17:] == [0.0] * (len(seq) - 17)


def test_google_robot_reopen_during_sticky_close_is_ignored_until_it_ends() -> None:
    # close at t=2 (+1 held t=2..16); the re-open at t=5 (0 - 1 = -1) arrives while sticky: ignored.
    # After the hold, previous == current == 1, so the command is 0: the re-open is never sent.
    seq = _steps((1.0, 2), (0.0, 3), (1.0, 20))
    state = GripperState("google_robot", 1)
    got = [float(state.command(np.array([v]))[0, 0]) for v in seq]
    assert got[2:17] == [1.0] * 15
    assert got[17:] == [0.0] * (len(seq) - 17)


def test_google_robot_sticky_value_is_the_relative_action_that_triggered_it() -> None:
    # 0.9 -> 0.2: relative +0.7 (> 0.5) is held, not a saturated +1; later 0.2 -> 0.95: -0.75 held
    seq = _steps((0.9, 1), (0.2, 20), (0.95, 16))
    state = GripperState("google_robot", 1)
    got = [float(state.command(np.array([v]))[0, 0]) for v in seq]
    assert got[1:16] == pytest.approx([0.7] * 15)
    assert got[16:21] == [0.0] * 5
    assert got[21:36] == pytest.approx([-0.75] * 15)
    assert got[36] == 0.0


def test_google_robot_gripper_keeps_one_state_per_env() -> None:
    names = ["close_then_reopen", "toggle_every_step", "reopen_inside_sticky_window"]
    n = min(len(SEQUENCES[k]) for k in names)
    seqs = [SEQUENCES[k][:n] for k in names]
    state = GripperState("google_robot", len(seqs))
    got = np.stack([state.command(np.array([s[t] for s in seqs]))[:, 0] for t in range(n)], axis=1)
    for env, seq in enumerate(seqs):
        assert got[env].tolist() == pytest.approx(reference(seq), abs=1e-12), names[env]


def test_google_robot_env_that_never_moves_stays_zero_beside_one_that_sticks() -> None:
    state = GripperState("google_robot", 3)
    seqs = [_steps((1.0, 2), (0.0, 18)), [1.0] * 20, _steps((0.0, 7), (1.0, 13))]
    out = np.stack([state.command(np.array([s[t] for s in seqs]))[:, 0] for t in range(20)], axis=1)
    assert out[1].tolist() == [0.0] * 20
    assert out[0].tolist() == [0.0, 0.0] + [1.0] * 15 + [0.0] * 3
    assert out[2].tolist() == [0.0] * 7 + [-1.0] * 13  # still inside its 15-step hold at the end


# ---------------------------------------------------------------- Euler -> axis-angle
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("angle", [0.3, -0.3, 1.2, -2.5, math.pi - 1e-6])
def test_single_axis_rotation_is_that_axis_times_the_angle(axis: int, angle: float) -> None:
    rpy = np.zeros(3)
    rpy[axis] = angle
    expected = np.zeros(3)
    expected[axis] = angle
    np.testing.assert_allclose(euler_to_axis_angle(rpy)[0], expected, atol=1e-9)


def test_zero_rotation_is_the_zero_vector() -> None:
    out = euler_to_axis_angle(np.zeros(3))
    assert out.shape == (1, 3)
    assert np.all(out == 0.0)


def test_tiny_rotation_is_the_euler_vector_to_first_order() -> None:
    rpy = np.array([1e-9, -2e-9, 3e-9])
    np.testing.assert_allclose(euler_to_axis_angle(rpy)[0], rpy, rtol=1e-6, atol=1e-18)


@pytest.mark.parametrize(
    "rpy", [(0.1, -0.2, 0.3), (-0.4, 0.25, -0.15), (0.02, 0.03, -0.05), (1.0, 0.5, -0.7), (-0.9, -1.1, 0.4)]
)
def test_combined_rotation_matches_the_sxyz_rotation_matrix(rpy: tuple[float, float, float]) -> None:
    expected = matrix_to_rotvec(sxyz_matrix(*rpy))
    np.testing.assert_allclose(euler_to_axis_angle(np.array(rpy))[0], expected, atol=1e-9)


def test_order_matters_roll_is_applied_first() -> None:
    # Rz Ry Rx differs from Rx Ry Rz: a swapped convention fails here
    rpy = (0.6, 0.4, -0.5)
    wrong = rx(rpy[0]) @ ry(rpy[1]) @ rz(rpy[2])
    got = euler_to_axis_angle(np.array(rpy))[0]
    np.testing.assert_allclose(rotvec_to_matrix(got), sxyz_matrix(*rpy), atol=1e-9)
    assert not np.allclose(rotvec_to_matrix(got), wrong, atol=1e-3)


@pytest.mark.parametrize(
    "rpy",
    [
        (math.pi, 0.0, 0.0),
        (0.0, 0.0, -math.pi),
        (math.pi - 1e-7, 1e-8, 0.0),
        (math.pi / 2, math.pi / 2, math.pi / 2),
        (2.0, -2.0, 2.5),
        (3.0, 0.1, -3.0),
    ],
)
def test_rotations_near_and_beyond_pi_give_the_same_rotation_with_angle_at_most_pi(
    rpy: tuple[float, float, float],
) -> None:
    got = euler_to_axis_angle(np.array(rpy))[0]
    assert np.linalg.norm(got) <= math.pi + 1e-9
    np.testing.assert_allclose(rotvec_to_matrix(got), sxyz_matrix(*rpy), atol=1e-7)


def test_batched_rows_are_converted_independently() -> None:
    rng = np.random.default_rng(1)
    rpy = rng.uniform(-0.8, 0.8, (9, 3))
    rpy[3] = 0.0
    out = euler_to_axis_angle(rpy)
    assert out.shape == (9, 3)
    for row, r in zip(out, rpy, strict=True):
        np.testing.assert_allclose(row, euler_to_axis_angle(r)[0], atol=1e-12)
        np.testing.assert_allclose(rotvec_to_matrix(row), sxyz_matrix(*r), atol=1e-9)


def test_matches_transforms3d_euler2axangle_as_simplerenv_calls_it() -> None:
    euler = pytest.importorskip("transforms3d.euler")
    rng = np.random.default_rng(2)
    rpy = np.concatenate([rng.uniform(-0.5, 0.5, (50, 3)), rng.uniform(-1.5, 1.5, (50, 3))])
    got = euler_to_axis_angle(rpy)
    for row, (roll, pitch, yaw) in zip(got, rpy, strict=True):
        ax, angle = euler.euler2axangle(roll, pitch, yaw)
        if angle <= math.pi:  # transforms3d may return angles in (pi, 2pi]; that rotation is tested above
            np.testing.assert_allclose(row, ax * angle, atol=1e-9)
        else:
            np.testing.assert_allclose(rotvec_to_matrix(row), rotvec_to_matrix(ax * angle), atol=1e-9)


# ---------------------------------------------------------------- action dict layouts
RAW = np.array(
    [
        [0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 0.9],
        [-0.04, 0.05, -0.06, -0.05, 0.15, 0.0, 0.1],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
    ]
)


def test_raw_action_dict_has_simplerenv_keys_and_slices() -> None:
    raw = raw_action_dict(RAW)
    assert set(raw) == {"world_vector", "rotation_delta", "open_gripper"}
    np.testing.assert_array_equal(raw["world_vector"], RAW[:, :3])
    np.testing.assert_array_equal(raw["rotation_delta"], RAW[:, 3:6])
    np.testing.assert_array_equal(raw["open_gripper"], RAW[:, 6:7])
    assert raw["open_gripper"].shape == (3, 1)


def test_env_actions_widowx_layout() -> None:
    action = env_actions(RAW, GripperState("widowx", 3))
    assert set(action) == {"world_vector", "rot_axangle", "gripper", "terminate_episode"}
    assert {k: v.shape for k, v in action.items()} == {
        "world_vector": (3, 3),
        "rot_axangle": (3, 3),
        "gripper": (3, 1),
        "terminate_episode": (3, 1),
    }
    np.testing.assert_array_equal(action["world_vector"], RAW[:, :3])
    for row, rpy in zip(action["rot_axangle"], RAW[:, 3:6], strict=True):
        np.testing.assert_allclose(rotvec_to_matrix(row), sxyz_matrix(*rpy), atol=1e-9)
    assert action["gripper"][:, 0].tolist() == [1.0, -1.0, -1.0]
    assert np.all(action["terminate_episode"] == 0.0)


def test_env_actions_does_not_alias_the_models_output() -> None:
    raw = RAW.copy()
    action = env_actions(raw, GripperState("widowx", 3))
    action["world_vector"] *= 10.0  # SimplerEnv scales in place with action_scale
    np.testing.assert_array_equal(raw, RAW)


def test_env_actions_google_robot_uses_the_sticky_state() -> None:
    state = GripperState("google_robot", 3)
    first = env_actions(RAW, state)
    assert first["gripper"][:, 0].tolist() == [0.0, 0.0, 0.0]  # no previous action yet
    closed = RAW.copy()
    closed[:, 6] = [0.1, 0.1, 0.4]  # env 0 closes (0.9 -> 0.1): +0.8 sticks; others move < 0.5
    second = env_actions(closed, state)
    assert second["gripper"][:, 0] == pytest.approx([0.8, 0.0, 0.1])
    third = env_actions(closed, state)
    assert third["gripper"][:, 0] == pytest.approx([0.8, 0.0, 0.0])


def test_flat_env_action_order_is_world_vector_rotation_gripper() -> None:
    action = env_actions(RAW, GripperState("widowx", 3))
    flat = flat_env_action(action)
    assert flat.shape == (3, 7)
    np.testing.assert_array_equal(flat[:, :3], action["world_vector"])
    np.testing.assert_array_equal(flat[:, 3:6], action["rot_axangle"])
    np.testing.assert_array_equal(flat[:, 6:], action["gripper"])
    assert flat[0, 6] == 1.0 and flat[1, 6] == -1.0
