"""The batched simulator interface the runner drives.

`B = n_envs` episodes advance in lock step: `reset` starts them (one seed and one task
configuration each) and `step` takes a (B, 7) env action. All B episodes end together after
the task's own step limit, as in SimplerEnv's ManiSkill3 evaluation, so metrics are those of
the final step (success) and of the whole episode (grasp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class StepOutput:
    images: np.ndarray  # (B, H, W, 3) uint8, the policy's camera
    infos: list[dict[str, Any]]  # per env: the env's info as plain Python scalars
    done: bool  # every env reached the end of its episode
    instructions: list[str] = field(default_factory=list)  # per env (may change for multi-stage tasks)
    # more of the observation, (B, ...) per name, for policies that take it (LIBERO: "wrist" frames, 8-D "state")
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class Simulator(Protocol):
    n_envs: int
    n_configs: int  # the task's built-in episode configurations (reset by config index)
    max_steps: int
    control_freq: float
    description: dict[str, Any]  # backend, versions, asset directory, ... for run.json

    def reset(self, seeds: Sequence[int], configs: Sequence[int]) -> StepOutput: ...

    def step(self, actions: np.ndarray) -> StepOutput: ...

    def close(self) -> None: ...


def step_limit(own: int, cap: int | None) -> int:
    """An episode's step limit: the task's own, or `--max-steps` when that is lower (a quick check, not the
    benchmark's numbers; run.json records both)."""
    return min(own, cap) if cap else own


def scalar_infos(info: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Batched env info (tensors / arrays of length n) -> n dicts of bool/int/float."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in info.items():
        if isinstance(value, dict):
            continue
        arr = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
        if arr.ndim == 0:
            arr = np.repeat(arr, n)
        if arr.ndim != 1 or len(arr) != n:
            continue
        for i in range(n):
            v = arr[i].item()
            out[i][key] = v
    return out
