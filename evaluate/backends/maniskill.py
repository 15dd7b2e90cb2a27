"""ManiSkill3 backend: SimplerEnv's WidowX digital twins (and any ManiSkill3 task).

`ManiSkillSim` is one ManiSkill3 env with `n_envs` sub-scenes: GPU-parallel on a GPU
(`sim_backend="gpu"`), or one scene on the CPU. On the CPU, several envs are several processes
(`processes.ProcessSims`), each with its own scene, driven in lock step so the policy still answers all of
them in one forward pass.

The Bridge tasks reset by configuration: `options={"episode_id": i}` picks object positions
and orientations from the task's own grid (24 for carrot/spoon/stack, 24 for eggplant), so
config i is the same scene on every machine. Step limits and success/grasp are the task's own
(`evaluate()`): success at the last step, and grasp = the source object held for >= 5
consecutive steps at some point (SimplerEnv's "grasp").
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..assets import asset_digest
from ..errors import EvalError
from .base import StepOutput, scalar_infos, step_limit
from .processes import ProcessSims

MANISKILL_INSTALL = "pip install 'refinevla[sim]'  (ManiSkill3)"
VULKAN_HELP = (
    "rendering needs Vulkan: on the CPU, Mesa >= 24.3 lavapipe (Debian bookworm: add bookworm-backports, then "
    "`apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1`); on a GPU, the NVIDIA driver's Vulkan ICD"
)
BRIDGE_ROBOT_ASSETS = ("widowx250s",)


def import_maniskill() -> Any:
    try:
        import mani_skill.envs
    except ImportError as exc:
        raise EvalError(f"ManiSkill3 is not installed ({exc}); install it with: {MANISKILL_INSTALL}") from None
    import mani_skill

    return mani_skill


def registered(env_id: str) -> Any:
    import_maniskill()
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        known = ", ".join(sorted(REGISTERED_ENVS)[:12])
        raise EvalError(f"ManiSkill3 has no task {env_id!r} (e.g. {known}, ...)")
    return REGISTERED_ENVS[env_id]


def asset_sources(env_id: str) -> list[str]:
    """The ManiSkill data sources a task needs: its own, plus the WidowX robot for the Bridge twins."""
    from mani_skill.utils import assets

    spec = registered(env_id)
    ids: list[str] = []
    for asset_id in spec.asset_download_ids or []:
        if asset_id in assets.DATA_GROUPS:
            ids += assets.expand_data_group_into_individual_data_source_ids(asset_id)
        else:
            ids.append(asset_id)
    if "bridge_v2_real2sim" in ids:
        ids += [a for a in BRIDGE_ROBOT_ASSETS if a not in ids]
    return ids


def check_assets(env_id: str) -> tuple[Path, list[str]]:
    """(asset root, the task's folders under it); fails with the download command when they are missing
    (ManiSkill itself would stop and ask on stdin)."""
    import mani_skill
    from mani_skill.utils import assets

    sources = asset_sources(env_id)
    missing = [s for s in sources if not assets.is_data_source_downloaded(s)]
    root = Path(mani_skill.ASSET_DIR)
    if missing:
        cmds = " && ".join(f"python -m mani_skill.utils.download_asset {s}" for s in missing)
        raise EvalError(
            f"{env_id}: assets {', '.join(missing)} are not in {root} "
            f"(MS_ASSET_DIR={os.environ.get('MS_ASSET_DIR')!r}); download them with `{cmds}`, "
            "or point MS_ASSET_DIR at a folder that has them"
        )
    return root, [str(assets.DATA_SOURCES[s].target_path) for s in sources]


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("mani_skill", "sapien", "torch", "transformers", "refinevla"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


class ManiSkillSim:
    """One ManiSkill3 env with n_envs parallel scenes."""

    def __init__(
        self,
        env_id: str,
        n_envs: int = 1,
        sim_backend: str = "cpu",
        camera: str | None = None,
        control_mode: str | None = None,
        render_backend: str | None = None,
        max_steps: int | None = None,
    ) -> None:
        import_maniskill()
        import gymnasium as gym

        spec = registered(env_id)
        self.assets = asset_digest(*check_assets(env_id))
        self.env_id = env_id
        self.bridge = "bridge_v2_real2sim" in (spec.asset_download_ids or [])
        kwargs: dict[str, Any] = {
            "obs_mode": "rgb+segmentation" if self.bridge else "rgb",
            "num_envs": n_envs,
            "sim_backend": sim_backend,
            "render_backend": render_backend or ("gpu" if sim_backend == "gpu" else "cpu"),
        }
        if control_mode or not self.bridge:
            kwargs["control_mode"] = control_mode or "pd_ee_delta_pose"  # 7-d: xyz, axis-angle, gripper
        try:
            self.env = gym.make(env_id, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if "vulkan" in text.lower() or "physical device" in text.lower():
                raise EvalError(f"{env_id}: {text.strip()}; {VULKAN_HELP}") from None
            raise EvalError(f"{env_id}: ManiSkill3 could not make the env ({text.strip()})") from None
        shape = self.env.action_space.shape
        if shape is None or shape[-1] != 7:
            self.env.close()
            raise EvalError(
                f"{env_id} with control mode {kwargs.get('control_mode', 'default')!r} takes {shape} actions, "
                "not 7 (world vector, axis-angle, gripper): pass --control-mode pd_ee_delta_pose or another 7-d mode"
            )
        u: Any = self.env.unwrapped  # the task class (gymnasium types it as a bare Env)
        self.n_envs = n_envs
        limit = int(spec.max_episode_steps or getattr(u, "max_episode_steps", 0) or 100)
        self.max_steps = step_limit(limit, max_steps)
        self.control_freq = float(u.control_freq)
        sensors = list(u._sensor_configs.keys()) if hasattr(u, "_sensor_configs") else []
        self.camera = camera or ("3rd_view_camera" if self.bridge else None)
        self._sensors = sensors
        self._segmentation: Any = None  # the last observation's actor ids per pixel ([n, H, W, 1]), if rendered
        self.n_configs = int(len(u.xyz_configs) * len(u.quat_configs)) if self.bridge else 1
        self.description = {
            "backend": "maniskill3",
            "env_id": env_id,
            "sim_backend": sim_backend,
            "render_backend": kwargs["render_backend"],
            "obs_mode": kwargs["obs_mode"],
            "control_mode": getattr(u, "control_mode", None),
            "camera": self.camera,
            "n_envs": n_envs,
            "n_configs": self.n_configs,
            "max_steps": self.max_steps,
            "reference_max_steps": limit,
            "control_freq": self.control_freq,
            "assets": self.assets,
            "versions": versions(),
        }

    def _images(self, obs: dict[str, Any]) -> np.ndarray:
        data = obs["sensor_data"]
        name = self.camera or next(iter(data))
        if name not in data:
            raise EvalError(f"{self.env_id}: no camera {name!r} (cameras: {', '.join(data)})")
        self.camera = name
        self._segmentation = data[name].get("segmentation")  # a reference: masks are cut only when asked for
        rgb = data[name]["rgb"]
        return np.asarray(rgb.cpu() if hasattr(rgb, "cpu") else rgb, dtype=np.uint8)

    def actor_masks(self) -> dict[str, np.ndarray]:
        """The pixels each scene actor covers in env 0's last observation (the camera's view, occlusion
        included), by the actor's simulator name: a boolean (H, W) mask, empty for an actor the camera does
        not see. Every actor is there (the objects and the static `arena` stage; the robot's links are links,
        not actors, and are left out). From the renderer's segmentation, which the Bridge twins render anyway
        (obs_mode rgb+segmentation, for their green screen): what `refine-eval demos` boxes the task objects
        with at reset."""
        from mani_skill.utils.structs import Actor

        if self._segmentation is None:
            raise EvalError(f"{self.env_id}: camera {self.camera!r} renders no segmentation (obs_mode rgb)")
        seg = self._segmentation[0, ..., 0]
        ids = np.asarray(seg.cpu() if hasattr(seg, "cpu") else seg)
        u: Any = self.env.unwrapped  # the task class (gymnasium types it as a bare Env)
        return {a.name: ids == i for i, a in sorted(u.segmentation_id_map.items()) if isinstance(a, Actor)}

    def _instructions(self) -> list[str]:
        u: Any = self.env.unwrapped  # the task class (gymnasium types it as a bare Env)
        if hasattr(u, "get_language_instruction"):
            got = u.get_language_instruction()
            return [str(x) for x in (got if isinstance(got, list | tuple) else [got] * self.n_envs)]
        return []

    def reset(self, seeds: Sequence[int], configs: Sequence[int]) -> StepOutput:
        import torch

        seed: int | list[int] = int(seeds[0]) if self.n_envs == 1 else [int(s) for s in seeds]
        options = {"episode_id": torch.tensor([int(c) for c in configs])} if self.bridge else {}
        obs, info = self.env.reset(seed=seed, options=options)  # type: ignore[arg-type]  # batched seeds
        return StepOutput(self._images(obs), scalar_infos(info, self.n_envs), False, self._instructions())

    def step(self, actions: np.ndarray) -> StepOutput:
        import torch

        act = torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(self.n_envs, 7))
        obs, _reward, terminated, truncated, info = self.env.step(act)
        done = bool(np.asarray(truncated.cpu() if hasattr(truncated, "cpu") else truncated).all())
        done = done or int(np.max(np.asarray(info["elapsed_steps"]))) >= self.max_steps
        _ = terminated  # the Bridge twins never terminate early; episodes run to the step limit
        return StepOutput(self._images(obs), scalar_infos(info, self.n_envs), done, self._instructions())

    def close(self) -> None:
        self.env.close()


def make_maniskill(
    env_id: str,
    n_envs: int,
    sim_backend: str | None = None,
    camera: str | None = None,
    control_mode: str | None = None,
    max_steps: int | None = None,
) -> ManiSkillSim | ProcessSims:
    """GPU-parallel when a GPU is there (or asked for), else one process per env on the CPU."""
    import_maniskill()
    if sim_backend is None:
        import torch

        sim_backend = "gpu" if torch.cuda.is_available() else "cpu"
    if sim_backend == "gpu" or n_envs == 1:
        return ManiSkillSim(env_id, n_envs, sim_backend, camera, control_mode, max_steps=max_steps)
    factory = functools.partial(ManiSkillSim, env_id, 1, "cpu", camera, control_mode, max_steps=max_steps)
    return ProcessSims(n_envs, factory)
