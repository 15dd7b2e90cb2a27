"""Dataset statistics in OpenVLA's `dataset_statistics.json` format.

VLAs normalise actions with these bounds (q01/q99) and un-normalise predictions with
them at evaluation time, so they must be computed on exactly the transformed actions
the model is trained on. The transforms reproduce OpenVLA's:

* ``bridge_orig``: drop step 0 (its action is all zeros), binarise the gripper
  (> 0.95 open, < 0.05 closed, values in between take the next settled value), then
  relabel ``action[:6] = state[t+1, :6] - state[t, :6]`` (which drops the last step);
* ``fractal``: ``gripper_closedness_action`` (+1 close / -1 open, relative) made
  absolute and sticky (1 = open), as OpenVLA's ``rel2abs_gripper_actions``;
* ``none``: the episode's actions and states as read.

`RunningStats` accumulates the min/max/mean/std of LeRobot's `stats.json` over a stream of episodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .episode import Episode
from .errors import SourceError

if TYPE_CHECKING:
    from .sources.base import EpisodeSource

TRANSFORMS = ("bridge_orig", "fractal", "none")
ACTION_MASK = [True] * 6 + [False]  # the gripper is not normalised


def binarize_gripper(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's `binarize_gripper_actions`: in-between values take the next settled value."""
    a = np.asarray(actions, dtype=np.float64)
    out = np.empty_like(a, dtype=np.float32)
    carry = float(a[-1]) if a.size else 0.0
    for i in range(a.size - 1, -1, -1):
        if a[i] > 0.95:
            carry = 1.0
        elif a[i] < 0.05:
            carry = 0.0
        out[i] = carry
    return out


def rel2abs_gripper(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's `rel2abs_gripper_actions` (Fractal): relative ±1 -> absolute, 1 = open."""
    a = np.asarray(actions, dtype=np.float64)
    thresholded = np.where(a < -0.1, 1, np.where(a > 0.1, -1, 0))
    nonzero = np.flatnonzero(thresholded)
    # Before the first command the gripper is in the opposite state; none at all: open.
    carry = -int(thresholded[nonzero[0]]) if nonzero.size else 1
    out = np.empty(a.shape, dtype=np.float32)
    for i, t in enumerate(thresholded):
        if t != 0:
            carry = int(t)
        out[i] = carry / 2 + 0.5
    return out


def auto_transform(source: EpisodeSource) -> str:
    """The transform `--transform auto` means for `source`: what the dataset declares, else Fractal by name,
    Bridge by layout, else `none`.

    One rule for `refine-data stats` and `refine-train`: statistics and the training table must agree
    on the transform, or the model is normalised with bounds of actions it never saw.
    """
    declared = getattr(source, "declared", {}).get("transform")
    if declared is not None:  # the dataset says what its actions need (e.g. `refine-eval demos`: none)
        if declared not in TRANSFORMS:
            raise SourceError(f"{source.name} declares transform {declared!r}; known: {', '.join(TRANSFORMS)}")
        return str(declared)
    if source.name == "fractal20220817_data":
        return "fractal"
    # Bridge's layout: an RLDS source reading `observation/state` and `action` (bridge_orig, the sample, ...)
    mapping = getattr(source, "mapping", None)
    bridge_like = mapping is not None and mapping.state == ("observation/state",) and mapping.action == ("action",)
    return "bridge_orig" if bridge_like else "none"


def transform_episode(episode: Episode, transform: str) -> tuple[np.ndarray, np.ndarray]:
    """(actions, proprio) of one episode after an OpenVLA dataset transform."""
    actions = np.asarray(episode.actions, dtype=np.float32)
    states = np.asarray(episode.states, dtype=np.float32)
    if transform == "none":
        return actions, states
    if transform == "bridge_orig":
        actions, states = actions[1:], states[1:]
        if len(actions) < 2:
            return actions[:0], states[:0]
        gripper = binarize_gripper(actions[:, 6])
        movement = states[1:, :6] - states[:-1, :6]
        return np.concatenate([movement, gripper[:-1, None]], axis=1).astype(np.float32), states[:-1]
    if transform == "fractal":
        gripper = rel2abs_gripper(actions[:, 6])
        return np.concatenate([actions[:, :6], gripper[:, None]], axis=1).astype(np.float32), states
    raise ValueError(f"unknown transform {transform!r} (choose from {', '.join(TRANSFORMS)})")


def _summary(values: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "max": values.max(0).tolist(),
        "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def compute_statistics(episodes: Iterable[Episode], transform: str = "none") -> dict[str, Any]:
    """Statistics over all transitions, in OpenVLA's per-dataset entry shape.

    Streams: only the (T, 7) action/state arrays are kept (56 MB for Bridge's 1.9M
    steps), because exact quantiles need every value.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r} (choose from {', '.join(TRANSFORMS)})")
    acts: list[np.ndarray] = []
    props: list[np.ndarray] = []
    n_traj = 0
    for ep in episodes:
        a, p = transform_episode(ep, transform)
        n_traj += 1
        if len(a):
            acts.append(a)
            props.append(p)
    if not acts:
        raise ValueError("no transitions to compute statistics over")
    actions = np.concatenate(acts)
    proprio = np.concatenate(props)
    action_stats: dict[str, Any] = _summary(actions)
    mask = ACTION_MASK if actions.shape[1] == 7 else [True] * actions.shape[1]
    action_stats["mask"] = mask
    return {
        "action": action_stats,
        "proprio": _summary(proprio),
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": n_traj,
    }


@dataclass
class RunningStats:
    """Running min/max/mean/std over samples of a feature (rows of an (N, D) array), in LeRobot's stats format.

    Unlike `compute_statistics` (exact quantiles, so every value is kept), only sums are kept: the
    LeRobot writer adds episodes as they stream and merges per-episode stats into global ones.
    """

    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, values: np.ndarray, count: int | None = None) -> None:
        """Add rows; `count` overrides the sample count (camera stats count frames, not pixels)."""
        v = np.asarray(values, dtype=np.float64)
        n = count if count is not None else v.shape[0]
        s, q = v.sum(0) * (n / max(v.shape[0], 1)), (v**2).sum(0) * (n / max(v.shape[0], 1))
        lo, hi = v.min(0), v.max(0)
        if self.total is None:
            self.total, self.squares, self.low, self.high = s, q, lo, hi
        else:
            assert self.squares is not None and self.low is not None and self.high is not None
            self.total, self.squares = self.total + s, self.squares + q
            self.low, self.high = np.minimum(self.low, lo), np.maximum(self.high, hi)
        self.count += n

    def merge(self, other: RunningStats) -> None:
        if other.total is None:
            return
        if self.total is None:
            self.count, self.total, self.squares, self.low, self.high = (
                other.count,
                other.total,
                other.squares,
                other.low,
                other.high,
            )
            return
        assert self.squares is not None and other.squares is not None
        assert self.low is not None and self.high is not None and other.low is not None and other.high is not None
        self.count += other.count
        self.total, self.squares = self.total + other.total, self.squares + other.squares
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)

    def as_json(self, image: bool = False) -> dict[str, list[Any]]:
        assert self.total is not None and self.squares is not None and self.low is not None and self.high is not None
        mean = self.total / max(self.count, 1)
        std = np.sqrt(np.maximum(self.squares / max(self.count, 1) - mean**2, 0.0))

        def fmt(a: np.ndarray) -> list[Any]:
            return a.reshape(-1, 1, 1).tolist() if image else a.tolist()

        return {"min": fmt(self.low), "max": fmt(self.high), "mean": fmt(mean), "std": fmt(std), "count": [self.count]}
