"""Stand-in for ManiSkill2_real2sim's registered Google Robot envs (`gym.make(name, **kwargs)`).

Same constructor kwargs, reset options, step tuple, attributes (`robot_uid`, `control_freq`,
`sim_freq`, `spec.max_episode_steps` through a time-limit wrapper) and task methods
(`get_language_instruction`, `is_final_subtask`, `advance_to_next_subtask`) as the real envs. The
scene is fake: an episode succeeds once the actions' z components add up to >= 1 (a "lift"), on
the final subtask. Every call is recorded in CALLS so tests can check what the backend passed.
"""

from __future__ import annotations

import os
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import ASSET_DIR

CALLS: list[tuple[Any, ...]] = []
IMAGE_SHAPE = (8, 10, 3)  # the real overhead camera is 512 x 640
SUCCESS_LIFT = 1.0

# registered env -> (max_episode_steps, instruction)
REGISTERED = {
    "GraspSingleOpenedCokeCanInScene-v0": (80, "pick coke can"),
    "GraspSingleOpenedCokeCanDistractorInScene-v0": (80, "pick coke can"),
    "GraspSingleOpenedCokeCanAltGoogleCameraInScene-v0": (80, "pick coke can"),
    "GraspSingleOpenedCokeCanAltGoogleCamera2InScene-v0": (80, "pick coke can"),
    "MoveNearGoogleInScene-v0": (80, "move {} near {}"),
    "MoveNearGoogleBakedTexInScene-v0": (80, "move {} near {}"),
    "MoveNearGoogleBakedTexInScene-v1": (80, "move {} near {}"),
    "MoveNearAltGoogleCameraInScene-v0": (80, "move {} near {}"),
    "MoveNearAltGoogleCamera2InScene-v0": (80, "move {} near {}"),
    **{f"Open{d}DrawerCustomInScene-v0": (113, f"open {d.lower()} drawer") for d in ("", "Top", "Middle", "Bottom")},
    **{f"Close{d}DrawerCustomInScene-v0": (113, f"close {d.lower()} drawer") for d in ("", "Top", "Middle", "Bottom")},
    "PlaceIntoClosedTopDrawerCustomInScene-v0": (200, "open top drawer"),
}
MOVE_NEAR_OBJECTS = ("blue plastic bottle", "pepsi can", "orange", "7up can", "apple", "sponge", "coke can")
# constructor kwargs the real envs take (CustomSceneEnv, BaseEnv and the task classes)
KNOWN_KWARGS = {
    "obs_mode",
    "robot",
    "sim_freq",
    "control_mode",
    "control_freq",
    "scene_name",
    "camera_cfgs",
    "rgb_overlay_path",
    "rgb_overlay_cameras",
    "shader_dir",
    "urdf_version",
    "disable_bad_material",
    "model_ids",
    "prepackaged_config",
    "lr_switch",
    "upright",
    "laid_vertically",
    "distractor_config",
    "slightly_darker_lighting",
    "slightly_brighter_lighting",
    "no_distractor",
    "station_name",
    "light_mode",
}


class GoogleRobotSceneEnv:
    """One fake SAPIEN 2 scene."""

    def __init__(self, env_name: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - KNOWN_KWARGS
        if unknown:
            raise TypeError(f"__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        overlay = kwargs.get("rgb_overlay_path")
        if overlay is not None and not os.path.exists(overlay):
            raise FileNotFoundError(f"rgb_overlay_path {overlay} is not found.")
        self.env_name = env_name
        self.kwargs = kwargs
        self.robot_uid = kwargs.get("robot", "google_robot_static")
        self._control_freq = kwargs.get("control_freq", 20)
        self._sim_freq = kwargs.get("sim_freq", 500)
        self._instruction = REGISTERED[env_name][1]
        self.multi_stage = env_name.startswith("PlaceInto")
        self.force_advance_subtask_time_steps = 100
        self._elapsed_steps = 0
        self.subtask = 0
        self.lift = 0.0
        self.episode_id: int | None = None
        self.closed = False

    @property
    def control_freq(self) -> int:
        return int(self._control_freq)

    @property
    def sim_freq(self) -> int:
        return int(self._sim_freq)

    @property
    def unwrapped(self) -> GoogleRobotSceneEnv:
        return self

    def _obs(self) -> dict[str, Any]:
        key = f"{self.env_name}|{self.kwargs.get('rgb_overlay_path')}|{self.kwargs.get('urdf_version')}"
        image = np.full(IMAGE_SHAPE, zlib.crc32(key.encode()) % 200, dtype=np.uint8)
        image[0, 0] = min(self._elapsed_steps, 255)
        return {"image": {"overhead_camera": {"rgb": image, "depth": np.zeros((*IMAGE_SHAPE[:2], 1), np.float32)}}}

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.closed:
            raise RuntimeError("reset on a closed env")
        options = options or {}
        CALLS.append(("reset", self.env_name, seed, options))
        self._elapsed_steps = 0
        self.subtask = 0
        self.lift = 0.0
        self.episode_id = options.get("obj_init_options", {}).get("episode_id")
        info = {"scene_name": self.kwargs.get("scene_name"), "urdf_version": self.kwargs.get("urdf_version") or ""}
        return self._obs(), info

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action)
        if action.shape != (7,):
            raise ValueError(f"action shape {action.shape}, expected (7,)")
        CALLS.append(("step", self.env_name, action.copy()))
        if self.multi_stage and self._elapsed_steps >= self.force_advance_subtask_time_steps:
            self.advance_to_next_subtask()
        self._elapsed_steps += 1
        self.lift += float(action[2])
        success = self.lift >= SUCCESS_LIFT and self.is_final_subtask()
        info = {
            "elapsed_steps": self._elapsed_steps,
            "success": np.bool_(success),
            "lift": np.float32(self.lift),
            "episode_stats": {"lift": self.lift},
            "obj_pose": np.zeros(7),
        }
        return self._obs(), float(success), bool(success), False, info

    def get_language_instruction(self) -> str:
        if self.env_name.startswith("MoveNear"):
            n = len(MOVE_NEAR_OBJECTS)
            i = self.episode_id or 0
            return self._instruction.format(MOVE_NEAR_OBJECTS[i % n], MOVE_NEAR_OBJECTS[(i + 1) % n])
        if self.multi_stage and self.subtask == 1:
            return "place apple into top drawer"
        return self._instruction

    def is_final_subtask(self) -> bool:
        return not self.multi_stage or self.subtask == 1

    def advance_to_next_subtask(self) -> None:
        self.subtask = 1

    def close(self) -> None:
        CALLS.append(("close", self.env_name))
        self.closed = True


class TimeLimit:
    """gymnasium's TimeLimit as `gym.make(..., max_episode_steps=N)` wraps the env."""

    def __init__(self, env: GoogleRobotSceneEnv, max_episode_steps: int) -> None:
        self.env = env
        self.spec = SimpleNamespace(id=env.env_name, max_episode_steps=max_episode_steps)
        self._max_episode_steps = max_episode_steps
        self._elapsed = 0

    @property
    def unwrapped(self) -> GoogleRobotSceneEnv:
        return self.env

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        self._elapsed = 0
        return self.env.reset(**kwargs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._elapsed += 1
        return obs, reward, terminated, truncated or self._elapsed >= self._max_episode_steps, info

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def make(env_name: str, max_episode_steps: int | None = None, **kwargs: Any) -> TimeLimit:
    """`gym.make` of a registered ManiSkill2_real2sim env."""
    if env_name not in REGISTERED:
        raise KeyError(f"Environment {env_name} doesn't exist.")
    if not (ASSET_DIR / "custom").is_dir():
        raise FileNotFoundError(f"{ASSET_DIR / 'custom'} is not found.")
    CALLS.append(("make", env_name, dict(kwargs, max_episode_steps=max_episode_steps)))
    env = GoogleRobotSceneEnv(env_name, **kwargs)
    return TimeLimit(env, max_episode_steps or REGISTERED[env_name][0])
