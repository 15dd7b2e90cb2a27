"""Stand-in for `simpler_env.utils.env.env_builder`: same functions and defaults as SimplerEnv's."""

from __future__ import annotations

from typing import Any

from mani_skill2_real2sim.envs import make


def build_maniskill2_env(env_name: str, **kwargs: Any) -> Any:
    # SimplerEnv overlays the real photo on the robot's default camera unless told otherwise
    if kwargs.get("rgb_overlay_path") is not None and kwargs.get("rgb_overlay_cameras") is None:
        if "google_robot_static" in kwargs["robot"]:
            kwargs["rgb_overlay_cameras"] = ["overhead_camera"]
        elif "widowx" in kwargs["robot"]:
            kwargs["rgb_overlay_cameras"] = ["3rd_view_camera"]
        else:
            raise NotImplementedError()
    return make(env_name, **kwargs)


def get_robot_control_mode(robot_name: str, policy_name: str) -> str:
    if "google_robot_static" in robot_name:
        return (
            "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos_interpolate_by_planner"
        )
    if "widowx" in robot_name:
        return "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
    raise NotImplementedError()
