"""Stand-in for SimplerEnv's `simpler_env` package (the parts refine-eval uses; tests only)."""

from __future__ import annotations

from typing import Any

ENVIRONMENT_MAP = {
    "google_robot_pick_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {}),
    "google_robot_move_near": ("MoveNearGoogleBakedTexInScene-v1", {}),
    "google_robot_open_drawer": ("OpenDrawerCustomInScene-v0", {}),
    "google_robot_close_drawer": ("CloseDrawerCustomInScene-v0", {}),
    "google_robot_place_apple_in_closed_top_drawer": (
        "PlaceIntoClosedTopDrawerCustomInScene-v0",
        {"model_ids": "baked_apple_v2"},
    ),
}
ENVIRONMENTS = list(ENVIRONMENT_MAP)


def make(task_name: str) -> Any:
    """Prepackaged visual-matching env, as `simpler_env.make` (not used by refine-eval)."""
    from mani_skill2_real2sim.envs import make as gym_make

    env_name, kwargs = ENVIRONMENT_MAP[task_name]
    return gym_make(env_name, obs_mode="rgbd", prepackaged_config=True, **kwargs)
