"""Original SimplerEnv backend: the Google Robot tasks, visual matching and variant aggregation.

SimplerEnv's Google Robot scenes exist only in the original SimplerEnv: `simpler_env` plus its
submodule ManiSkill2_real2sim (SAPIEN 2, Python <= 3.11, numpy < 2), both installed from their
repository, with the scanned scenes, object meshes and real overlay photos in
ManiSkill2_real2sim's `data/` folder (`mani_skill2_real2sim.ASSET_DIR`, or `MS2_REAL2SIM_ASSET_DIR`).

Episode grids
-------------
A task's configurations are the episodes SimplerEnv's own evaluation scripts run, in their order
(github.com/simpler-env/SimplerEnv, `scripts/`, read at the commits named):

============================  =======================================  =====  =================================  =====
task                          google-vm (visual matching)              VM     google-va (variant aggregation)    VA
============================  =======================================  =====  =================================  =====
pick_coke_can                 pick_coke_can_visual_matching.sh e4545d2  300    pick_coke_can_variant_agg.sh 982db4b 825
move_near                     move_near_visual_matching.sh 982db4b     240    move_near_variant_agg.sh 982db4b   600
open_drawer                   drawer_visual_matching.sh 982db4b        108    drawer_variant_agg.sh e4545d2      189
close_drawer                  drawer_visual_matching.sh 982db4b        108    drawer_variant_agg.sh e4545d2      189
place_apple_in_closed_top..   put_in_drawer_visual_matching.sh 982db4b 108    put_in_drawer_variant_agg.sh 8a08029 189
============================  =======================================  =====  =================================  =====

Each `python simpler_env/main_inference.py ...` line of a script is one `ScriptRun` below, its
flags transcribed as data (the drawer scripts' `Open*`/`Close*` env names are split between
open_drawer and close_drawer). A run expands into episodes exactly as SimplerEnv's
`evaluation/argparse.py` and `evaluation/maniskill2_evaluator.py` do: every `--*-range MIN MAX N`
is `np.linspace(MIN, MAX, N)`; the loops are robot x, robot y, robot rotation (roll, pitch, yaw
applied to `--robot-init-rot-quat-center 0 0 0 1`), then object x, object y (or object episode
id); `--enable-raytracing` puts `shader_dir="rt"` first among the extra env kwargs; `None` and
`True` are parsed as Python values (SimplerEnv's DictAction). Config i of a task is therefore the
same (env name, env kwargs, overlay photo, robot pose, object pose) as the i-th episode SimplerEnv
runs for it.

Each episode builds its env through SimplerEnv's `build_maniskill2_env` with the evaluator's
kwargs (`obs_mode="rgbd"`, `robot="google_robot_static"`, the scripts' `--control-freq 3
--sim-freq 513 --max-episode-steps` (80 / 113 / 200), SimplerEnv's control mode for the robot,
segmentation for the overlay, the overlay photo) and resets it with the evaluator's
`robot_init_options` / `obj_init_options`. The env is re-made only when a config needs another env
name or kwargs. The image is `get_image_from_maniskill2_obs_dict` (the overhead camera), the
instruction `get_language_instruction()`, re-read after every step (the drawer-apple task moves
from "open top drawer" to "place apple into top drawer"), success the env's own `info["success"]`
at the last step, and an episode lasts the env's `max_episode_steps` (`truncated`).

Differences from SimplerEnv's loop, on purpose: the env is reused between configs that share
its kwargs (SimplerEnv makes a fresh one per episode), and it is reset with the runner's seed
(`seed + repeat * n_configs + config`) instead of no seed, so config i is the same episode on every
machine and in any batch; only random parts of a scene (the distractor placement of the coke-can
"distractors" variants, random model scales) follow that seed. A policy never ends an episode
early: an action row may carry an 8th value, `terminate_episode`, which - as in SimplerEnv's
evaluator - advances a multi-stage task to its next subtask when the current one is not the last;
the drawer-apple env also advances by itself after 100 steps, which is what happens for every
policy that never predicts termination (OpenVLA-style policies, refine-train ones).

Parallel envs: SAPIEN 2 holds one scene per env and one env per process here, so `n_envs > 1`
runs n worker processes (each with its own renderer on the GPU) stepped in lock step, so the
policy still answers all of them in one forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..assets import asset_digest
from ..errors import EvalError
from .base import StepOutput, step_limit
from .processes import ProcessSims

if TYPE_CHECKING:
    from ..suites import Task

SIMPLER_REPO = "https://github.com/simpler-env/SimplerEnv"
SIMPLER_INSTALL = (
    f"git clone --recurse-submodules {SIMPLER_REPO} && pip install 'numpy<2' && "
    "pip install -e SimplerEnv/ManiSkill2_real2sim && pip install -e SimplerEnv"
)
ASSET_HELP = (
    "they ship in ManiSkill2_real2sim's data/ folder (SimplerEnv cloned with --recurse-submodules); "
    "point MS2_REAL2SIM_ASSET_DIR at it: `export MS2_REAL2SIM_ASSET_DIR=$PWD/SimplerEnv/ManiSkill2_real2sim/data`"
)
ROBOT = "google_robot_static"  # every Google Robot script passes --robot google_robot_static
CONTROL_FREQ = 3  # every Google Robot script passes --control-freq 3
SIM_FREQ = 513  # ... and --sim-freq 513
QUAT_CENTER = (0.0, 0.0, 0.0, 1.0)  # ... and --robot-init-rot-quat-center 0 0 0 1 (w, x, y, z)
Range = tuple[float, float, int]  # a script's `MIN MAX N`: np.linspace(MIN, MAX, N)
FIXED: Range = (0.0, 0.0, 1)


@dataclass(frozen=True)
class ScriptRun:
    """One `simpler_env/main_inference.py` line of a SimplerEnv script, flag by flag."""

    env_name: str  # --env-name
    scene_name: str  # --scene-name
    robot: tuple[Range, Range, Range]  # --robot-init-x, --robot-init-y, yaw of --robot-init-rot-rpy-range
    max_episode_steps: int  # --max-episode-steps
    kwargs: Mapping[str, Any]  # --additional-env-build-kwargs, after --enable-raytracing's shader_dir=rt
    obj_xy: tuple[Range, Range] | None = None  # --obj-init-x(-range), --obj-init-y(-range)
    obj_episodes: tuple[int, int] | None = None  # --obj-episode-range START END
    overlay: str | None = None  # --rgb-overlay-path, relative to ManiSkill2_real2sim/data
    variant: str = "base"  # the script's block this line belongs to (visual matching, lighting, ...)


@dataclass(frozen=True)
class GoogleEpisode:
    """One configuration: what SimplerEnv's evaluator builds and resets for one episode."""

    env_name: str  # ManiSkill2_real2sim env id
    scene_name: str
    extra_kwargs: Mapping[str, Any]  # the script's additional env kwargs (urdf_version, lr_switch, shader_dir, ...)
    overlay: str | None  # real photo under ASSET_DIR (visual matching), else None
    max_episode_steps: int
    robot_xy: tuple[float, float]
    robot_quat: tuple[float, float, float, float]  # w, x, y, z
    obj_xy: tuple[float, float] | None  # obj_init_options init_xy, or
    obj_episode: int | None  # obj_init_options episode_id (move near)
    variant: str
    control_freq: int = CONTROL_FREQ
    sim_freq: int = SIM_FREQ

    def env_kwargs(self, asset_dir: Path, control_mode: str) -> dict[str, Any]:
        """`build_maniskill2_env(env_name, **these)`, as `run_maniskill2_eval_single_episode` passes them."""
        return {
            **self.extra_kwargs,
            "obs_mode": "rgbd",
            "robot": ROBOT,
            "sim_freq": self.sim_freq,
            "control_mode": control_mode,
            "control_freq": self.control_freq,
            "max_episode_steps": self.max_episode_steps,
            "scene_name": self.scene_name,
            "camera_cfgs": {"add_segmentation": True},
            "rgb_overlay_path": str(asset_dir / self.overlay) if self.overlay else None,
        }

    def reset_options(self) -> dict[str, Any]:
        """`env.reset(options=...)` of SimplerEnv's evaluator."""
        options: dict[str, Any] = {
            "robot_init_options": {"init_xy": np.array(self.robot_xy), "init_rot_quat": np.array(self.robot_quat)}
        }
        if self.obj_xy is not None:
            options["obj_init_options"] = {"init_xy": np.array(self.obj_xy)}
        else:
            options["obj_init_options"] = {"episode_id": self.obj_episode}
        return options


def _linspace(r: Range) -> list[float]:
    return [float(v) for v in np.linspace(r[0], r[1], int(r[2]))]


def _yaw_quat(yaw: float) -> tuple[float, float, float, float]:
    """(Pose(q=euler2quat(0, 0, yaw)) * Pose(q=QUAT_CENTER)).q, the evaluator's robot rotation."""
    a = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
    b = QUAT_CENTER
    w = a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3]
    x = a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2]
    y = a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1]
    z = a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0]
    return (float(w), float(x), float(y), float(z))


def expand(run: ScriptRun) -> Iterator[GoogleEpisode]:
    """The episodes of one script line, in the evaluator's loop order."""
    # roll and pitch are `0 0 1` in every script: only the yaw varies
    for rx in _linspace(run.robot[0]):
        for ry in _linspace(run.robot[1]):
            for yaw in _linspace(run.robot[2]):
                base = GoogleEpisode(
                    run.env_name,
                    run.scene_name,
                    dict(run.kwargs),
                    run.overlay,
                    run.max_episode_steps,
                    (rx, ry),
                    _yaw_quat(yaw),
                    None,
                    None,
                    run.variant,
                )
                if run.obj_episodes is not None:
                    for ep in range(*run.obj_episodes):
                        yield replace(base, obj_episode=ep)
                else:
                    assert run.obj_xy is not None
                    for ox in _linspace(run.obj_xy[0]):
                        for oy in _linspace(run.obj_xy[1]):
                            yield replace(base, obj_xy=(ox, oy))


# ---------------------------------------------------------------------------------------------
# SimplerEnv's scripts, transcribed
# ---------------------------------------------------------------------------------------------

# the robot URDF recolorings of visual matching, in each script's order
URDF_COKE_MOVE_NEAR = (
    None,
    "recolor_tabletop_visual_matching_1",
    "recolor_tabletop_visual_matching_2",
    "recolor_cabinet_visual_matching_1",
)
URDF_DRAWERS = (
    "recolor_cabinet_visual_matching_1",
    "recolor_tabletop_visual_matching_1",
    "recolor_tabletop_visual_matching_2",
    None,
)
# coke_can_options_arr: laid horizontally (flipped left-right), standing, laid vertically
COKE_CAN_POSES: tuple[dict[str, Any], ...] = ({"lr_switch": True}, {"upright": True}, {"laid_vertically": True})
COKE_ENV = "GraspSingleOpenedCokeCanInScene-v0"
COKE_SCENE = "google_pick_coke_can_1_v4"
COKE_ROBOT: tuple[Range, Range, Range] = ((0.35, 0.35, 1), (0.20, 0.20, 1), FIXED)
COKE_OBJ: tuple[Range, Range] = ((-0.35, -0.12, 5), (-0.02, 0.42, 5))
MOVE_NEAR_ROBOT: tuple[Range, Range, Range] = ((0.35, 0.35, 1), (0.21, 0.21, 1), (-0.09, -0.09, 1))
MOVE_NEAR_EPISODES = (0, 60)  # --obj-variation-mode episode --obj-episode-range 0 60
MOVE_NEAR_ENV_VA = "MoveNearGoogleInScene-v0"
TABLE_TEXTURE_SCENES = ("Baked_sc1_staging_objaverse_cabinet1_h870", "Baked_sc1_staging_objaverse_cabinet2_h870")
BACKGROUND_SCENES = ("google_pick_coke_can_1_v4_alt_background", "google_pick_coke_can_1_v4_alt_background_2")
LIGHTINGS = ("slightly_darker_lighting", "slightly_brighter_lighting")
OPEN_DRAWER_ENVS = (
    "OpenTopDrawerCustomInScene-v0",
    "OpenMiddleDrawerCustomInScene-v0",
    "OpenBottomDrawerCustomInScene-v0",
)
CLOSE_DRAWER_ENVS = (
    "CloseTopDrawerCustomInScene-v0",
    "CloseMiddleDrawerCustomInScene-v0",
    "CloseBottomDrawerCustomInScene-v0",
)
APPLE_ENV = "PlaceIntoClosedTopDrawerCustomInScene-v0"
# drawer_visual_matching.sh's EvalOverlay: overlay photo -> robot x, y, yaw (A0 ... C2)
DRAWER_OVERLAYS: dict[str, tuple[float, float, float]] = {
    "a0": (0.644, -0.179, -0.03),
    "a1": (0.765, -0.182, -0.02),
    "a2": (0.889, -0.203, -0.06),
    "b0": (0.652, 0.009, 0.0),
    "b1": (0.752, 0.009, 0.0),
    "b2": (0.851, 0.035, 0.0),
    "c0": (0.665, 0.224, 0.0),
    "c1": (0.765, 0.222, -0.025),
    "c2": (0.865, 0.222, -0.025),
}
APPLE_OVERLAYS = ("a0", "b0", "c0")  # put_in_drawer_visual_matching.sh runs A0, B0, C0 only
DRAWER_OBJ: tuple[Range, Range] = (FIXED, FIXED)  # --obj-init-x-range 0 0 1 --obj-init-y-range 0 0 1
APPLE_OBJ: tuple[Range, Range] = ((-0.08, -0.02, 3), (-0.02, 0.08, 3))
DRAWER_VA_ROBOT: tuple[Range, Range, Range] = ((0.65, 0.85, 3), (-0.2, 0.2, 3), FIXED)
APPLE_VA_ROBOT: tuple[Range, Range, Range] = ((0.65, 0.65, 1), (-0.2, 0.2, 3), FIXED)
DRAWER_VA_SCENE = "frl_apartment_stage_simple"
DRAWER_VA_BACKGROUNDS = ("modern_bedroom_no_roof", "modern_office_no_roof")
TABLETOP_STEPS, DRAWER_STEPS, APPLE_STEPS = 80, 113, 200  # --max-episode-steps of each script


def coke_can_vm() -> list[ScriptRun]:
    return [
        ScriptRun(
            COKE_ENV,
            COKE_SCENE,
            COKE_ROBOT,
            TABLETOP_STEPS,
            {**pose, "urdf_version": urdf},
            obj_xy=COKE_OBJ,
            overlay="real_inpainting/google_coke_can_real_eval_1.png",
            variant="visual matching",
        )
        for urdf in URDF_COKE_MOVE_NEAR
        for pose in COKE_CAN_POSES
    ]


def coke_can_va() -> list[ScriptRun]:
    def run(env: str, scene: str, kwargs: dict[str, Any], variant: str) -> ScriptRun:
        return ScriptRun(env, scene, COKE_ROBOT, TABLETOP_STEPS, kwargs, obj_xy=COKE_OBJ, variant=variant)

    cameras = (
        "GraspSingleOpenedCokeCanAltGoogleCameraInScene-v0",
        "GraspSingleOpenedCokeCanAltGoogleCamera2InScene-v0",
    )
    distractors = "GraspSingleOpenedCokeCanDistractorInScene-v0"
    return (
        [run(COKE_ENV, COKE_SCENE, pose, "base") for pose in COKE_CAN_POSES]
        + [run(COKE_ENV, s, pose, "table textures") for pose in COKE_CAN_POSES for s in TABLE_TEXTURE_SCENES]
        + [
            run(distractors, COKE_SCENE, kw, "distractors")
            for pose in COKE_CAN_POSES
            for kw in (pose, {**pose, "distractor_config": "more"})
        ]
        + [run(COKE_ENV, s, pose, "backgrounds") for pose in COKE_CAN_POSES for s in BACKGROUND_SCENES]
        + [
            run(COKE_ENV, COKE_SCENE, {**pose, light: True}, "lighting")
            for pose in COKE_CAN_POSES
            for light in LIGHTINGS
        ]
        + [run(env, COKE_SCENE, pose, "camera orientations") for pose in COKE_CAN_POSES for env in cameras]
    )


def move_near_vm() -> list[ScriptRun]:
    # the script also passes --additional-env-save-tags baked_except_bpb_orange: a video folder name only
    return [
        ScriptRun(
            "MoveNearGoogleBakedTexInScene-v0",
            COKE_SCENE,
            MOVE_NEAR_ROBOT,
            TABLETOP_STEPS,
            {"urdf_version": urdf},
            obj_episodes=MOVE_NEAR_EPISODES,
            overlay="real_inpainting/google_move_near_real_eval_1.png",
            variant="visual matching",
        )
        for urdf in URDF_COKE_MOVE_NEAR
    ]


def move_near_va() -> list[ScriptRun]:
    def run(env: str, scene: str, kwargs: dict[str, Any], variant: str) -> ScriptRun:
        return ScriptRun(
            env, scene, MOVE_NEAR_ROBOT, TABLETOP_STEPS, kwargs, obj_episodes=MOVE_NEAR_EPISODES, variant=variant
        )

    cameras = ("MoveNearAltGoogleCameraInScene-v0", "MoveNearAltGoogleCamera2InScene-v0")
    return (
        [run(MOVE_NEAR_ENV_VA, COKE_SCENE, {}, "base")]
        + [run(MOVE_NEAR_ENV_VA, COKE_SCENE, {"no_distractor": True}, "distractors")]
        + [run(MOVE_NEAR_ENV_VA, s, {}, "backgrounds") for s in BACKGROUND_SCENES]
        + [run(MOVE_NEAR_ENV_VA, COKE_SCENE, {light: True}, "lighting") for light in LIGHTINGS]
        + [run(MOVE_NEAR_ENV_VA, s, {}, "table textures") for s in TABLE_TEXTURE_SCENES]
        + [run(env, COKE_SCENE, {}, "camera orientations") for env in cameras]
    )


def drawer_vm(
    envs: Sequence[str], overlays: Sequence[str], steps: int, obj: tuple[Range, Range], extra: Mapping[str, Any]
) -> list[ScriptRun]:
    """drawer / put_in_drawer visual matching: URDF outermost, then env, then overlay photo."""
    runs = []
    for urdf in URDF_DRAWERS:
        # EXTRA_ARGS: --enable-raytracing (shader_dir=rt first) --additional-env-build-kwargs ...
        kwargs = {
            "shader_dir": "rt",
            "station_name": "mk_station_recolor",
            "light_mode": "simple",
            "disable_bad_material": True,
            "urdf_version": urdf,
            **extra,
        }
        for env in envs:
            for o in overlays:
                x, y, yaw = DRAWER_OVERLAYS[o]
                robot = ((x, x, 1), (y, y, 1), (yaw, yaw, 1))
                overlay = f"real_inpainting/open_drawer_{o}.png"
                runs.append(
                    ScriptRun(
                        env,
                        "dummy_drawer",
                        robot,
                        steps,
                        kwargs,
                        obj_xy=obj,
                        overlay=overlay,
                        variant="visual matching",
                    )
                )
    return runs


def drawer_va(
    envs: Sequence[str],
    robot: tuple[Range, Range, Range],
    steps: int,
    obj: tuple[Range, Range],
    extra: Mapping[str, Any],
) -> list[ScriptRun]:
    """drawer / put_in_drawer variant aggregation: base, backgrounds, lightings, new cabinets."""

    def run(env: str, scene: str, kwargs: dict[str, Any], variant: str) -> ScriptRun:
        # base: --enable-raytracing; the others: --additional-env-build-kwargs shader_dir=rt ...
        return ScriptRun(env, scene, robot, steps, {"shader_dir": "rt", **kwargs, **extra}, obj_xy=obj, variant=variant)

    return (
        [run(env, DRAWER_VA_SCENE, {}, "base") for env in envs]
        + [run(env, scene, {}, "backgrounds") for scene in DRAWER_VA_BACKGROUNDS for env in envs]
        + [run(env, DRAWER_VA_SCENE, {"light_mode": m}, "lighting") for env in envs for m in ("brighter", "darker")]
        + [
            run(env, DRAWER_VA_SCENE, {"station_name": s}, "cabinets")
            for env in envs
            for s in ("mk_station2", "mk_station3")
        ]
    )


SCRIPTS: dict[tuple[str, str], tuple[str, Callable[[], list[ScriptRun]]]] = {
    ("google-vm", "pick_coke_can"): ("scripts/pick_coke_can_visual_matching.sh", coke_can_vm),
    ("google-va", "pick_coke_can"): ("scripts/pick_coke_can_variant_agg.sh", coke_can_va),
    ("google-vm", "move_near"): ("scripts/move_near_visual_matching.sh", move_near_vm),
    ("google-va", "move_near"): ("scripts/move_near_variant_agg.sh", move_near_va),
    ("google-vm", "open_drawer"): (
        "scripts/drawer_visual_matching.sh",
        lambda: drawer_vm(OPEN_DRAWER_ENVS, list(DRAWER_OVERLAYS), DRAWER_STEPS, DRAWER_OBJ, {}),
    ),
    ("google-vm", "close_drawer"): (
        "scripts/drawer_visual_matching.sh",
        lambda: drawer_vm(CLOSE_DRAWER_ENVS, list(DRAWER_OVERLAYS), DRAWER_STEPS, DRAWER_OBJ, {}),
    ),
    ("google-va", "open_drawer"): (
        "scripts/drawer_variant_agg.sh",
        lambda: drawer_va(OPEN_DRAWER_ENVS, DRAWER_VA_ROBOT, DRAWER_STEPS, DRAWER_OBJ, {}),
    ),
    ("google-va", "close_drawer"): (
        "scripts/drawer_variant_agg.sh",
        lambda: drawer_va(CLOSE_DRAWER_ENVS, DRAWER_VA_ROBOT, DRAWER_STEPS, DRAWER_OBJ, {}),
    ),
    ("google-vm", "place_apple_in_closed_top_drawer"): (
        "scripts/put_in_drawer_visual_matching.sh",
        lambda: drawer_vm((APPLE_ENV,), APPLE_OVERLAYS, APPLE_STEPS, APPLE_OBJ, {"model_ids": "baked_apple_v2"}),
    ),
    ("google-va", "place_apple_in_closed_top_drawer"): (
        "scripts/put_in_drawer_variant_agg.sh",
        lambda: drawer_va((APPLE_ENV,), APPLE_VA_ROBOT, APPLE_STEPS, APPLE_OBJ, {"model_ids": "apple"}),
    ),
}


def script_runs(suite: str, task: str) -> tuple[str, list[ScriptRun]]:
    """(SimplerEnv script, its main_inference.py lines) behind a Google task of a suite."""
    if (suite, task) not in SCRIPTS:
        known = sorted({t for _, t in SCRIPTS})
        raise EvalError(f"SimplerEnv has no {suite} grid for {task!r} (Google Robot tasks: {', '.join(known)})")
    script, runs = SCRIPTS[(suite, task)]
    return script, runs()


def episode_grid(suite: str, task: str) -> list[GoogleEpisode]:
    """Config i -> the i-th episode SimplerEnv's script runs for this task and suite."""
    _, runs = script_runs(suite, task)
    return [ep for run in runs for ep in expand(run)]


# ---------------------------------------------------------------------------------------------
# Installation and assets
# ---------------------------------------------------------------------------------------------


@dataclass
class SimplerModules:
    """The parts of SimplerEnv this backend calls."""

    build_env: Callable[..., Any]  # simpler_env.utils.env.env_builder.build_maniskill2_env
    control_mode: str  # get_robot_control_mode("google_robot_static", ...)
    image: Callable[..., Any]  # simpler_env.utils.env.observation_utils.get_image_from_maniskill2_obs_dict
    asset_dir: Path  # mani_skill2_real2sim.ASSET_DIR


def _install_error(what: str) -> EvalError:
    notes = []
    if sys.version_info >= (3, 12):
        notes.append(f"this is Python {sys.version_info.major}.{sys.version_info.minor}, SAPIEN 2 needs <= 3.11")
    with contextlib.suppress(metadata.PackageNotFoundError, ValueError):
        sapien = metadata.version("sapien")
        if int(sapien.split(".")[0]) >= 3:
            # ManiSkill3 (the WidowX backend) pins SAPIEN 3; ManiSkill2_real2sim pins SAPIEN 2: one per environment
            notes.append(f"sapien {sapien} here is ManiSkill3's, so use a separate environment for SimplerEnv")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return EvalError(
        f"the Google Robot tasks need the original SimplerEnv (simpler_env + ManiSkill2_real2sim, SAPIEN 2, "
        f"Python <= 3.11, numpy < 2); {what}{extra}; install it with: {SIMPLER_INSTALL}"
    )


def import_simpler() -> SimplerModules:
    """SimplerEnv's functions, or one EvalError naming what is missing and the install command."""
    missing = [m for m in ("simpler_env", "mani_skill2_real2sim", "sapien") if importlib.util.find_spec(m) is None]
    if missing:
        raise _install_error(f"not installed here: {', '.join(missing)}")
    try:
        builder = importlib.import_module("simpler_env.utils.env.env_builder")
        observation = importlib.import_module("simpler_env.utils.env.observation_utils")
        real2sim = importlib.import_module("mani_skill2_real2sim")
    except ImportError as exc:
        raise _install_error(f"importing it fails ({type(exc).__name__}: {exc})") from None
    return SimplerModules(
        build_env=builder.build_maniskill2_env,
        control_mode=str(builder.get_robot_control_mode(ROBOT, "refinevla")),
        image=observation.get_image_from_maniskill2_obs_dict,
        asset_dir=Path(real2sim.ASSET_DIR),
    )


def needed_assets(episodes: Sequence[GoogleEpisode]) -> list[str]:
    """Paths under ASSET_DIR the episodes load: object/cabinet models, scanned stages, overlay photos."""
    paths = ["custom"]
    for ep in episodes:
        scene = f"hab2_bench_assets/stages/{ep.scene_name}.glb"
        if "dummy" not in ep.scene_name and scene not in paths:
            paths.append(scene)
        if ep.overlay and ep.overlay not in paths:
            paths.append(ep.overlay)
    return paths


def check_assets(label: str, episodes: Sequence[GoogleEpisode], asset_dir: Path) -> dict[str, Any]:
    """Fail with what is missing and where it comes from; else the digest of the asset folders used."""
    needed = needed_assets(episodes)
    missing = [p for p in needed if not (asset_dir / p).exists()]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise EvalError(f"{label}: ManiSkill2_real2sim's scene files are not in {asset_dir} ({shown}); {ASSET_HELP}")
    folders = sorted({p.split("/")[0] for p in needed})
    return asset_digest(asset_dir, folders)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("simpler_env", "mani_skill2_real2sim", "sapien", "numpy", "torch", "transformers", "refinevla"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def plain_info(info: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The env's info as JSON-ready scalars (bool/int/float/str); `episode_stats` flattened to
    `episode_stats.KEY` (SimplerEnv names its videos by them); poses and arrays dropped."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | float | str):
            out[prefix + key] = value
        elif isinstance(value, Mapping) and key == "episode_stats" and not prefix:
            out.update(plain_info(value, "episode_stats."))
    return out


def _uint8(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:  # float colours in [0, 1]
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    out: np.ndarray = arr[..., :3]
    return out


# ---------------------------------------------------------------------------------------------
# Simulators
# ---------------------------------------------------------------------------------------------


def grid_summary(script: str, episodes: Sequence[GoogleEpisode]) -> dict[str, Any]:
    """What a task's grid is, for run.json: its script, size, variant blocks and env names."""
    variants: dict[str, int] = {}
    for ep in episodes:
        variants[ep.variant] = variants.get(ep.variant, 0) + 1
    return {
        "source": f"{SIMPLER_REPO}/blob/main/{script}",
        "configs": len(episodes),
        "variants": variants,
        "env_names": sorted({ep.env_name for ep in episodes}),
    }


class SimplerSim:
    """One SimplerEnv env in this process (SAPIEN 2: one scene), re-made when a config needs other kwargs."""

    def __init__(
        self,
        suite: str,
        name: str,
        env_id: str = "",
        assets: dict[str, Any] | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.modules = import_simpler()
        script, runs = script_runs(suite, name)
        self.episodes = [ep for run in runs for ep in expand(run)]
        self.label = f"{env_id or name} ({suite})"
        self.assets = assets if assets is not None else check_assets(self.label, self.episodes, self.modules.asset_dir)
        self.n_envs = 1
        self.n_configs = len(self.episodes)
        self.env: Any = None
        self._env_key: tuple[str, dict[str, Any]] | None = None
        self._done = False
        env = self._make(self.episodes[0])
        u = env.unwrapped
        spec = getattr(env, "spec", None)
        limit = int(getattr(spec, "max_episode_steps", None) or self.episodes[0].max_episode_steps)
        self.max_steps = step_limit(limit, max_steps)
        self.control_freq = float(u.control_freq)
        self.description = {
            "backend": "simpler_env",
            "env_id": env_id or name,
            "suite": suite,
            "grid": grid_summary(script, self.episodes),
            "robot": ROBOT,
            "control_mode": self.modules.control_mode,
            "control_freq": self.control_freq,
            "sim_freq": float(getattr(u, "sim_freq", self.episodes[0].sim_freq)),
            "max_steps": self.max_steps,
            "reference_max_steps": limit,
            "camera": "overhead_camera",
            "n_envs": 1,
            "n_configs": self.n_configs,
            "assets": self.assets,
            "versions": versions(),
        }

    def _make(self, ep: GoogleEpisode) -> Any:
        """The env for this episode: the current one if its name and kwargs match, else a new one."""
        kwargs = ep.env_kwargs(self.modules.asset_dir, self.modules.control_mode)
        key = (ep.env_name, kwargs)
        if self._env_key == key:
            return self.env
        if self.env is not None:
            self.env.close()
            self.env = None
        try:
            self.env = self.modules.build_env(ep.env_name, **kwargs)
        except Exception as exc:  # gym / SAPIEN raise many kinds; the message names env, kwargs and cause
            self._env_key = None
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            hint = ""
            if any(k in text.lower() for k in ("vulkan", "vk::", "physical device")):
                hint = "; SAPIEN 2 renders with Vulkan: it needs the NVIDIA driver's Vulkan ICD (libvulkan1)"
            cause = f"{type(exc).__name__}: {text}"
            raise EvalError(
                f"{self.label}: SimplerEnv could not make {ep.env_name} with {kwargs} ({cause}){hint}"
            ) from None
        self._env_key = key
        return self.env

    def _output(self, obs: Any, info: Mapping[str, Any]) -> StepOutput:
        u = self.env.unwrapped
        image = _uint8(self.modules.image(u, obs))
        return StepOutput(image[None], [plain_info(info)], self._done, [str(u.get_language_instruction())])

    def reset(self, seeds: Sequence[int], configs: Sequence[int]) -> StepOutput:
        if len(seeds) != 1 or len(configs) != 1:
            raise EvalError(f"{self.label}: one env per process; got {len(configs)} configs")
        config = int(configs[0])
        if not 0 <= config < self.n_configs:
            raise EvalError(f"{self.label}: config {config} is outside SimplerEnv's grid (0..{self.n_configs - 1})")
        ep = self.episodes[config]
        self._make(ep)
        self._done = False
        obs, info = self.env.reset(seed=int(seeds[0]), options=ep.reset_options())
        return self._output(obs, info)

    def step(self, actions: np.ndarray) -> StepOutput:
        """(1, 7) [world_vector, axis-angle, gripper]; an 8th value > 0 (terminate_episode) advances the subtask."""
        row = np.asarray(actions, dtype=np.float64).reshape(-1)
        if row.shape[0] not in (7, 8):
            raise EvalError(f"{self.label}: expected a (1, 7) action, got shape {np.shape(actions)}")
        u = self.env.unwrapped
        if row.shape[0] == 8 and row[7] > 0 and not u.is_final_subtask():
            u.advance_to_next_subtask()  # SimplerEnv's evaluator: a predicted stop ends the current subtask
        obs, _reward, _terminated, truncated, info = self.env.step(row[:7])
        # episodes run to the step limit, as in SimplerEnv (terminated = success, not the end)
        self._done = bool(truncated) or int(info.get("elapsed_steps", 0)) >= self.max_steps
        return self._output(obs, info)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
            self._env_key = None


def make_simpler(task: Task, n_envs: int = 1, max_steps: int | None = None) -> SimplerSim | ProcessSims:
    """The Google Robot task of a google-vm / google-va suite on SimplerEnv; n_envs > 1: n processes."""
    if n_envs < 1:
        raise EvalError(f"--num-envs {n_envs}: must be at least 1")
    if n_envs == 1:
        return SimplerSim(task.suite, task.name, task.env_id, max_steps=max_steps)
    modules = import_simpler()  # fail here, once, rather than in every worker
    label = f"{task.env_id or task.name} ({task.suite})"
    assets = check_assets(label, episode_grid(task.suite, task.name), modules.asset_dir)
    factory = functools.partial(SimplerSim, task.suite, task.name, task.env_id, assets, max_steps=max_steps)
    return ProcessSims(n_envs, factory)
