"""LeRobot dataset factories for source tests: synthetic episodes written by the project's own
LeRobot writer (v2.1 or v3.0, video- or image-stored cameras), no downloads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinevla.annotate.episode import Episode, FrameSequence
from refinevla.annotate.sources.lerobot_writer import write_lerobot

LEROBOT_IMAGE = (64, 64)
LEROBOT_FPS = 10


def lerobot_frame(seed: int, t: int, size: tuple[int, int] = LEROBOT_IMAGE) -> np.ndarray:
    """A frame that identifies its step: background brightness steps with t, a square moves with t.

    Neighbouring frames differ by far more than the lossy-codec error, so a decoded frame can be
    matched to the original it came from (catches off-by-one seeks in shared v3.0 videos).
    """
    h, w = size
    img = np.full((h, w, 3), (30 + 7 * t + 11 * seed) % 200, dtype=np.uint8)
    img[..., 2] = 60 + (seed * 37) % 120
    x = (t * 9 + seed * 5) % (w - 20)
    img[8:28, x : x + 20] = (250, 220, 30)
    return img


def lerobot_episode(seed: int, steps: int, cameras: Sequence[str] = ("image_0", "image_1")) -> Episode:
    """A synthetic episode: random-walk states, actions as state deltas, reward on the last step."""
    rng = np.random.default_rng(seed)
    states = np.cumsum(rng.normal(0, 0.01, (steps, 7)), axis=0).astype(np.float32)
    actions = np.zeros((steps, 7), np.float32)
    actions[:-1] = states[1:] - states[:-1]
    last = np.arange(steps) == steps - 1
    return Episode(
        episode_id=f"synthetic:{seed}",
        dataset="synthetic",
        instruction=f"put object {seed % 2} in the bowl",
        actions=actions,
        states=states,
        frames={
            cam: FrameSequence(loader=lambda t, s=seed * 10 + k: lerobot_frame(s, t), length=steps)
            for k, cam in enumerate(cameras)
        },
        is_first=np.arange(steps) == 0,
        is_last=last,
        is_terminal=last.copy(),
        rewards=last.astype(np.float32),
    )


@pytest.fixture
def lerobot_episodes() -> Callable[..., list[Episode]]:
    """Factory: `n` synthetic episodes of different lengths (6, 9, 12, ...)."""

    def make(n: int = 3, steps: Callable[[int], int] = lambda i: 6 + 3 * i) -> list[Episode]:
        return [lerobot_episode(i, steps(i)) for i in range(n)]

    return make


@pytest.fixture
def write_lerobot_dataset(tmp_path: Path, lerobot_episodes: Callable[..., list[Episode]]) -> Callable[..., Any]:
    """Factory: write a LeRobot dataset folder; returns (path, the episodes written).

    Defaults exercise the interesting v3.0 paths: two episodes per file (so a file is shared and
    a later episode starts mid-video) and small row groups (so a row range spans groups).
    """

    def make(
        version: str = "v3.0",
        *,
        camera_storage: str = "video",
        n: int = 3,
        name: str = "toy_robot",
        episodes: list[Episode] | None = None,
        **kwargs: Any,
    ) -> tuple[Path, list[Episode]]:
        eps = episodes if episodes is not None else lerobot_episodes(n)
        kwargs.setdefault("episodes_per_file", 2)
        kwargs.setdefault("row_group_size", 4)
        root = tmp_path / version.replace(".", "_") / camera_storage / name
        write_lerobot(root, eps, version=version, fps=LEROBOT_FPS, camera_storage=camera_storage, **kwargs)
        return root, eps

    return make
