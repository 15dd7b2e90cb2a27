"""The one in-memory shape every episode source yields.

Why a single shape: primitives, statistics, prompts, the annotation engine and the
dataset writers must not care whether an episode came from RLDS TFRecords, a LeRobot
parquet file or the embedded sample. Sources convert once, at the edge.

Frames are held *encoded* (JPEG/PNG bytes) or behind a loader and decoded only when
asked for, so iterating a 2M-step dataset costs one episode's compressed bytes at a
time, and tasks that never look at pixels (statistics, inspect) never pay for decoding.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATE_DIM = 7  # [x, y, z, roll, pitch, yaw, gripper]
ACTION_DIM = 7  # [dx, dy, dz, droll, dpitch, dyaw, gripper]


class FrameSequence(Sequence[np.ndarray]):
    """One camera's frames for one episode, decoded lazily frame by frame.

    Holds either encoded image bytes (one per step) or a callable that produces a
    decoded frame for a step index (video-backed sources). Indexing decodes.
    """

    def __init__(
        self,
        encoded: Sequence[bytes] | None = None,
        *,
        loader: Callable[[int], np.ndarray] | None = None,
        length: int | None = None,
    ) -> None:
        if (encoded is None) == (loader is None):
            raise ValueError("FrameSequence needs exactly one of `encoded` or `loader`")
        self._encoded = encoded
        self._loader = loader
        self._length = len(encoded) if encoded is not None else int(length or 0)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError("FrameSequence indices must be integers")
        i = int(index)
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"frame {index} out of range for {self._length} frames")
        if self._encoded is not None:
            return decode_image(self._encoded[i])
        assert self._loader is not None
        return self._loader(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._length):
            yield self[i]

    def decode_all(self, threads: int | None = None) -> np.ndarray:
        """All frames as one (T, H, W, 3) uint8 array, decoded on `threads` threads.

        JPEG decoding releases the GIL, so a training or export loop that needs every frame gets
        all cores (TensorFlow's reader decodes in parallel too). Default: one thread per core.
        """
        if self._length == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        workers = threads or os.cpu_count() or 1
        if workers <= 1 or self._length == 1:
            return np.stack([self[i] for i in range(self._length)])
        return np.stack(list(_decode_pool(workers).map(self.__getitem__, range(self._length))))

    def encoded(self, index: int) -> bytes | None:
        """The stored encoded bytes of a frame, when the source keeps them (no re-encode)."""
        if self._encoded is None:
            return None
        return self._encoded[index]


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes into an HxWx3 uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _decode_pool(workers: int) -> ThreadPoolExecutor:
    """One shared decode pool per size (threads are reused across episodes)."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refinevla-decode")
    return pool


@dataclass
class Step:
    """A view of one time step; built on demand from the episode's arrays."""

    index: int
    action: np.ndarray
    state: np.ndarray
    is_first: bool
    is_last: bool
    is_terminal: bool
    reward: float
    instruction: str


@dataclass
class Episode:
    """A robot episode, in the shape every refinevla stage consumes.

    `episode_id` is stable across runs and machines: it is built from the source's own
    keys (for RLDS the `episode_metadata/file_path` and `episode_id`, for LeRobot the
    repo and episode index), never from the read order, so cache keys and joins with
    other annotation sets (Embodied-CoT) survive re-sharding.
    """

    episode_id: str  # stable id, "<dataset>:<source key>"
    dataset: str  # dataset name, e.g. "bridge_orig"
    instruction: str  # the natural-language task
    actions: np.ndarray  # (T, 7) float32, the dataset's own action convention
    states: np.ndarray  # (T, 7) float32, [x, y, z, roll, pitch, yaw, gripper]
    frames: dict[str, FrameSequence]  # camera name -> lazily decoded frames
    is_first: np.ndarray  # (T,) bool
    is_last: np.ndarray  # (T,) bool
    is_terminal: np.ndarray  # (T,) bool
    rewards: np.ndarray  # (T,) float32
    metadata: dict[str, Any] = field(default_factory=dict)  # source keys (file_path, episode index...)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_steps(self) -> int:
        return len(self)

    @property
    def cameras(self) -> list[str]:
        return list(self.frames)

    def step(self, index: int) -> Step:
        return Step(
            index=index,
            action=self.actions[index],
            state=self.states[index],
            is_first=bool(self.is_first[index]),
            is_last=bool(self.is_last[index]),
            is_terminal=bool(self.is_terminal[index]),
            reward=float(self.rewards[index]),
            instruction=self.instruction,
        )

    def steps(self) -> Iterator[Step]:
        for i in range(len(self)):
            yield self.step(i)

    def content_digest(self, frame_steps: Mapping[str, Sequence[int]] | None = None) -> str:
        """A hash of what the episode *is* (id, instruction, numbers, frame bytes).

        Used in annotation request keys: if the source data changes, answers are not
        reused. Frame bytes are hashed as stored (no decode). With `frame_steps`
        (camera -> step indices) only those frames are hashed: the ones a teacher is
        shown, which is all of the pixels an answer can depend on, at a fraction of the
        cost of hashing every frame of every camera.
        """
        import hashlib

        h = hashlib.sha256()
        h.update(self.episode_id.encode())
        h.update(self.instruction.encode())
        h.update(np.ascontiguousarray(self.actions, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.states, dtype=np.float32).tobytes())
        cameras = sorted(self.frames) if frame_steps is None else sorted(frame_steps)
        for cam in cameras:
            seq = self.frames[cam]
            steps = range(len(seq)) if frame_steps is None else frame_steps[cam]
            h.update(cam.encode())
            for i in steps:
                h.update(str(i).encode())
                raw = seq.encoded(i)
                h.update(raw if raw is not None else np.ascontiguousarray(seq[i]).tobytes())
        return h.hexdigest()
