"""Stand-in for `simpler_env.utils.env.observation_utils`."""

from __future__ import annotations

from typing import Any


def get_image_from_maniskill2_obs_dict(env: Any, obs: dict[str, Any], camera_name: str | None = None) -> Any:
    if camera_name is None:
        if "google_robot" in env.robot_uid:
            camera_name = "overhead_camera"
        elif "widowx" in env.robot_uid:
            camera_name = "3rd_view_camera"
        else:
            raise NotImplementedError()
    return obs["image"][camera_name]["rgb"]
