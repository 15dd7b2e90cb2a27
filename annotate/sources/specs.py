"""The exact RLDS feature layouts of BridgeData V2 and Fractal, as TFDS feature specs.

The project's own writer uses these to produce fixtures and the embedded sample in
the real layouts, so the real reader is exercised end to end without downloads.
Layouts follow `bridge_orig` / `bridge_dataset` and `fractal20220817_data/0.1.0`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def bridge_features(cameras: int = 4, image_size: tuple[int, int] = (256, 256)) -> Any:
    """BridgeData V2 (`bridge_orig`): 4 cameras image_0..3 (256x256 JPEG), 7-d state/action."""
    import tensorflow_datasets as tfds

    f = tfds.features
    h, w = image_size
    obs: dict[str, Any] = {
        f"image_{i}": f.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format="jpeg") for i in range(cameras)
    }
    obs["state"] = f.Tensor(shape=(7,), dtype=np.float32)
    return f.FeaturesDict(
        {
            "steps": f.Dataset(
                {
                    "observation": f.FeaturesDict(obs),
                    "action": f.Tensor(shape=(7,), dtype=np.float32),
                    "discount": f.Scalar(dtype=np.float32),
                    "reward": f.Scalar(dtype=np.float32),
                    "is_first": f.Scalar(dtype=np.bool_),
                    "is_last": f.Scalar(dtype=np.bool_),
                    "is_terminal": f.Scalar(dtype=np.bool_),
                    "language_instruction": f.Text(),
                    "language_embedding": f.Tensor(shape=(512,), dtype=np.float32),
                }
            ),
            "episode_metadata": f.FeaturesDict(
                {
                    "file_path": f.Text(),
                    "episode_id": f.Scalar(dtype=np.int32),
                    **{f"has_image_{i}": f.Scalar(dtype=np.bool_) for i in range(4)},
                    "has_language": f.Scalar(dtype=np.bool_),
                }
            ),
        }
    )


def bridge_example(
    episode_id: int,
    states: Any,
    actions: Any,
    images: Mapping[str, Sequence[Any]],
    *,
    instruction: str,
    file_path: str,
) -> dict[str, Any]:
    """One episode as a TFDS example in Bridge's layout (what `bridge_features` serialises).

    `images` maps cameras `image_0`..`image_3` to per-step uint8 arrays or JPEG bytes. The
    language embedding is zeros: a placeholder with Bridge's shape, not a real embedding. The
    embedded sample, the benchmarks and the tests all write Bridge-layout data through this.
    """
    n = len(states)
    zeros = np.zeros(512, np.float32)
    steps = [
        {
            "observation": {**{cam: frames[t] for cam, frames in images.items()}, "state": states[t]},
            "action": actions[t],
            "discount": np.float32(1.0),
            "reward": np.float32(1.0 if t == n - 1 else 0.0),
            "is_first": t == 0,
            "is_last": t == n - 1,
            "is_terminal": t == n - 1,
            "language_instruction": instruction,
            "language_embedding": zeros,
        }
        for t in range(n)
    ]
    return {
        "steps": steps,
        "episode_metadata": {
            "file_path": file_path,
            "episode_id": np.int32(episode_id),
            **{f"has_image_{c}": f"image_{c}" in images for c in range(4)},
            "has_language": True,
        },
    }


def fractal_features() -> Any:
    """Fractal (`fractal20220817_data` 0.1.0, RT-1): one 256x320 camera, dict actions."""
    import tensorflow_datasets as tfds

    f = tfds.features
    t = f.Tensor
    observation = {
        "image": f.Image(shape=(256, 320, 3), dtype=np.uint8, encoding_format="jpeg"),
        "natural_language_instruction": f.Text(),
        "natural_language_embedding": t(shape=(512,), dtype=np.float32),
        "base_pose_tool_reached": t(shape=(7,), dtype=np.float32),
        "gripper_closed": t(shape=(1,), dtype=np.float32),
        "gripper_closedness_commanded": t(shape=(1,), dtype=np.float32),
        "height_to_bottom": t(shape=(1,), dtype=np.float32),
        "orientation_box": t(shape=(2, 3), dtype=np.float32),
        "orientation_start": t(shape=(4,), dtype=np.float32),
        "robot_orientation_positions_box": t(shape=(3, 3), dtype=np.float32),
        "rotation_delta_to_go": t(shape=(3,), dtype=np.float32),
        "src_rotation": t(shape=(4,), dtype=np.float32),
        "vector_to_go": t(shape=(3,), dtype=np.float32),
        "workspace_bounds": t(shape=(3, 3), dtype=np.float32),
    }
    action = {
        "world_vector": t(shape=(3,), dtype=np.float32),
        "rotation_delta": t(shape=(3,), dtype=np.float32),
        "gripper_closedness_action": t(shape=(1,), dtype=np.float32),
        "terminate_episode": t(shape=(3,), dtype=np.int32),
        "base_displacement_vector": t(shape=(2,), dtype=np.float32),
        "base_displacement_vertical_rotation": t(shape=(1,), dtype=np.float32),
    }
    return f.FeaturesDict(
        {
            "steps": f.Dataset(
                {
                    "observation": f.FeaturesDict(observation),
                    "action": f.FeaturesDict(action),
                    "reward": f.Scalar(dtype=np.float32),
                    "is_first": f.Scalar(dtype=np.bool_),
                    "is_last": f.Scalar(dtype=np.bool_),
                    "is_terminal": f.Scalar(dtype=np.bool_),
                }
            ),
        }
    )


def tiny_bridge_episode(seed: int, steps: int, size: int = 64) -> dict[str, Any]:
    """A one-camera Bridge-layout example: reach forward, close the gripper, lift, open it (two events)."""
    state = np.zeros((steps, 7), np.float32)
    state[:, 0] = np.linspace(0.2, 0.35, steps)
    state[:, 2] = np.where(np.arange(steps) < steps // 2, 0.05, np.linspace(0.05, 0.2, steps))
    state[:, 6] = np.where((np.arange(steps) >= steps // 3) & (np.arange(steps) < steps - 2), 0.0, 1.0)
    action = np.zeros((steps, 7), np.float32)
    action[:-1, :6] = state[1:, :6] - state[:-1, :6]
    action[:, 6] = state[:, 6]
    side, lo = size // 4, size // 8
    frames = np.zeros((steps, size, size, 3), np.uint8)
    for t in range(steps):
        x = (t * 3 + seed) % (size - side)
        frames[t, lo : lo + side, x : x + side] = (250, 200, 30)
    return bridge_example(
        seed,
        state,
        action,
        {"image_0": list(frames)},
        file_path=f"/data/raw/traj{seed}.pkl",
        instruction=f"put the spoon {seed} on the towel",
    )
