"""OpenVLA-format statistics and the bridge_orig / fractal transforms."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla.annotate.episode import Episode
from refinevla.annotate.stats import binarize_gripper, compute_statistics, rel2abs_gripper, transform_episode


def make_episode(actions: np.ndarray, states: np.ndarray) -> Episode:
    n = len(actions)
    idx = np.arange(n)
    return Episode(
        episode_id="t:0",
        dataset="t",
        instruction="x",
        actions=np.asarray(actions, np.float32),
        states=np.asarray(states, np.float32),
        frames={},
        is_first=idx == 0,
        is_last=idx == n - 1,
        is_terminal=idx == n - 1,
        rewards=np.zeros(n, np.float32),
    )


def test_binarize_takes_the_next_settled_value() -> None:
    out = binarize_gripper(np.array([1.0, 0.5, 0.02, 0.3, 0.97, 0.6, 0.99]))
    assert out.tolist() == [1, 0, 0, 1, 1, 1, 1]
    # OpenVLA's scan starts from the raw last value: a trailing in-between value is kept as is.
    np.testing.assert_allclose(binarize_gripper(np.array([0.5, 0.6])), [0.6, 0.6])


def test_rel2abs_makes_relative_commands_sticky() -> None:
    # first command is "close" (+1) -> open before it; -1 opens again
    assert rel2abs_gripper(np.array([0, 0, 1, 0, 0, -1, 0])).tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert rel2abs_gripper(np.zeros(3)).tolist() == [1, 1, 1]  # no command: open throughout


def test_bridge_orig_drops_step_zero_relabels_from_state_and_drops_the_last() -> None:
    states = np.zeros((5, 7))
    states[:, 0] = [0.0, 0.1, 0.3, 0.6, 1.0]
    actions = np.zeros((5, 7))
    actions[:, 6] = [1.0, 1.0, 0.5, 0.0, 0.0]
    a, p = transform_episode(make_episode(actions, states), "bridge_orig")
    # after dropping step 0: states x = 0.1, 0.3, 0.6, 1.0 -> deltas 0.2, 0.3, 0.4
    np.testing.assert_allclose(a[:, 0], [0.2, 0.3, 0.4], atol=1e-6)
    assert a[:, 6].tolist() == [1.0, 0.0, 0.0]  # 0.5 takes the next settled value (0)
    np.testing.assert_allclose(p[:, 0], [0.1, 0.3, 0.6], atol=1e-6)


def test_statistics_have_openvla_shape_and_values() -> None:
    rng = np.random.default_rng(0)
    eps = [make_episode(rng.normal(size=(50, 7)), rng.normal(size=(50, 7))) for _ in range(4)]
    st = compute_statistics(eps, "none")
    assert st["num_trajectories"] == 4 and st["num_transitions"] == 200
    assert st["action"]["mask"] == [True] * 6 + [False]
    allact = np.concatenate([e.actions for e in eps])
    np.testing.assert_allclose(st["action"]["q01"], np.quantile(allact, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(st["action"]["q99"], np.quantile(allact, 0.99, axis=0), rtol=1e-5)
    np.testing.assert_allclose(st["proprio"]["mean"], np.concatenate([e.states for e in eps]).mean(0), rtol=1e-5)
    assert set(st["proprio"]) == {"mean", "std", "max", "min", "q01", "q99"}


def test_unknown_transform_is_rejected() -> None:
    with pytest.raises(ValueError, match="bridge_orig"):
        compute_statistics([], "nope")
