"""The Google Robot backend (original SimplerEnv, SAPIEN 2) against a stand-in `simpler_env`.

SAPIEN 2 and ManiSkill2_real2sim's scanned scenes cannot run here, so `standin/` provides
`simpler_env` and `mani_skill2_real2sim` with the interface the backend uses; its envs record
every make / reset / step. The grids are checked against values transcribed by hand from
SimplerEnv's `scripts/*_visual_matching.sh` and `*_variant_agg.sh`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from refinevla.evaluate.backends import simpler
from refinevla.evaluate.backends.processes import ProcessSims
from refinevla.evaluate.errors import EvalError
from refinevla.evaluate.suites import Task, suite_tasks

STANDIN = Path(__file__).parent / "standin"
STANDIN_MODULES = ("simpler_env", "mani_skill2_real2sim")


def google_task(suite: str, name: str) -> Task:
    (task,) = suite_tasks(suite, [name])
    return task


def _forget_simpler(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in list(sys.modules):
        if mod.split(".")[0] in STANDIN_MODULES:
            monkeypatch.delitem(sys.modules, mod)


def write_assets(root: Path) -> Path:
    """ManiSkill2_real2sim's data/ layout: the files every Google grid loads (a few bytes each)."""
    data = root / "data"
    (data / "custom").mkdir(parents=True)
    (data / "custom" / "info_pick_custom_v0.json").write_text("{}")
    for (suite, name), _ in simpler.SCRIPTS.items():
        for rel in simpler.needed_assets(simpler.episode_grid(suite, name))[1:]:
            path = data / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rel.encode())
    return data


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Path, ModuleType]]:
    """(asset dir, the stand-in envs module with CALLS) with the stand-in SimplerEnv importable; afterwards
    the stand-in's modules are forgotten again, or a later test would find `simpler_env` installed."""
    data = write_assets(tmp_path)
    monkeypatch.setenv("MS2_REAL2SIM_ASSET_DIR", str(data))
    monkeypatch.syspath_prepend(str(STANDIN))
    _forget_simpler(monkeypatch)
    import mani_skill2_real2sim.envs as envs

    envs.CALLS.clear()
    yield data, envs
    for mod in [m for m in sys.modules if m.split(".")[0] in STANDIN_MODULES]:
        del sys.modules[mod]


def made(envs: ModuleType) -> list[tuple[str, dict[str, Any]]]:
    return [(c[1], c[2]) for c in envs.CALLS if c[0] == "make"]


def resets(envs: ModuleType) -> list[tuple[str, int, dict[str, Any]]]:
    return [(c[1], c[2], c[3]) for c in envs.CALLS if c[0] == "reset"]


# --------------------------------------------------------------------------------------------
# The grids
# --------------------------------------------------------------------------------------------

# (configs per task) = SimplerEnv's script loops, multiplied out by hand
GRID_SIZES = {
    ("google-vm", "pick_coke_can"): 4 * 3 * 5 * 5,  # URDFs x can poses x obj x x obj y
    ("google-va", "pick_coke_can"): (1 + 2 + 2 + 2 + 2 + 2) * 3 * 25,  # base + 5 variant pairs, x 3 poses
    ("google-vm", "move_near"): 4 * 60,  # URDFs x episodes 0..59
    ("google-va", "move_near"): 10 * 60,  # base, no distractor, 2 backgrounds, 2 lightings, 2 tables, 2 cameras
    ("google-vm", "open_drawer"): 4 * 3 * 9,  # URDFs x top/middle/bottom x overlays A0..C2
    ("google-vm", "close_drawer"): 4 * 3 * 9,
    ("google-va", "open_drawer"): 3 * 7 * 9,  # drawers x (base, 2 backgrounds, 2 lightings, 2 cabinets) x 3x3 robot
    ("google-va", "close_drawer"): 3 * 7 * 9,
    ("google-vm", "place_apple_in_closed_top_drawer"): 4 * 3 * 9,  # URDFs x A0/B0/C0 x 3x3 apple xy
    ("google-va", "place_apple_in_closed_top_drawer"): 7 * 3 * 9,  # 7 setups x 3 robot y x 3x3 apple xy
}


@pytest.mark.parametrize(("suite", "name"), list(GRID_SIZES))
def test_each_task_has_as_many_configs_as_simplerenv_runs_episodes(suite: str, name: str) -> None:
    grid = simpler.episode_grid(suite, name)
    assert len(grid) == GRID_SIZES[(suite, name)]
    assert len({ep.max_episode_steps for ep in grid}) == 1  # one step limit per task
    # every Google task of both suites has a grid
    assert (suite, name) in {(t.suite, t.name) for s in ("google-vm", "google-va") for t in suite_tasks(s, [name])}


def test_pick_coke_can_visual_matching_follows_the_script_loops() -> None:
    grid = simpler.episode_grid("google-vm", "pick_coke_can")
    first = grid[0]
    assert first.env_name == "GraspSingleOpenedCokeCanInScene-v0"
    assert first.scene_name == "google_pick_coke_can_1_v4"
    assert first.overlay == "real_inpainting/google_coke_can_real_eval_1.png"
    assert dict(first.extra_kwargs) == {"lr_switch": True, "urdf_version": None}
    assert first.robot_xy == (0.35, 0.20) and first.robot_quat == (0.0, 0.0, 0.0, 1.0)
    assert first.obj_xy == (-0.35, -0.02) and first.max_episode_steps == 80
    assert grid[1].obj_xy == pytest.approx((-0.35, 0.09))  # obj y is the inner loop: linspace(-0.02, 0.42, 5)
    assert grid[5].obj_xy == pytest.approx((-0.2925, -0.02))
    assert grid[24].obj_xy == pytest.approx((-0.12, 0.42))
    assert dict(grid[25].extra_kwargs) == {"upright": True, "urdf_version": None}
    assert dict(grid[50].extra_kwargs) == {"laid_vertically": True, "urdf_version": None}
    assert dict(grid[75].extra_kwargs) == {"lr_switch": True, "urdf_version": "recolor_tabletop_visual_matching_1"}
    assert dict(grid[299].extra_kwargs) == {
        "laid_vertically": True,
        "urdf_version": "recolor_cabinet_visual_matching_1",
    }


def test_pick_coke_can_variant_aggregation_blocks() -> None:
    grid = simpler.episode_grid("google-va", "pick_coke_can")
    counts: dict[str, int] = {}
    for ep in grid:
        counts[ep.variant] = counts.get(ep.variant, 0) + 1
    assert counts == {
        "base": 75,
        "table textures": 150,
        "distractors": 150,
        "backgrounds": 150,
        "lighting": 150,
        "camera orientations": 150,
    }
    assert all(ep.overlay is None for ep in grid)
    table = grid[75]
    assert (table.scene_name, dict(table.extra_kwargs)) == (
        "Baked_sc1_staging_objaverse_cabinet1_h870",
        {"lr_switch": True},
    )
    distractor = grid[75 + 150 + 25]
    assert distractor.env_name == "GraspSingleOpenedCokeCanDistractorInScene-v0"
    assert dict(distractor.extra_kwargs) == {"lr_switch": True, "distractor_config": "more"}
    camera = grid[-1]
    assert camera.env_name == "GraspSingleOpenedCokeCanAltGoogleCamera2InScene-v0"
    assert dict(camera.extra_kwargs) == {"laid_vertically": True}


def test_move_near_uses_episode_ids_and_the_scripts_robot_yaw() -> None:
    grid = simpler.episode_grid("google-vm", "move_near")
    assert [ep.obj_episode for ep in grid[:60]] == list(range(60)) and grid[60].obj_episode == 0
    assert grid[0].env_name == "MoveNearGoogleBakedTexInScene-v0"
    assert grid[0].overlay == "real_inpainting/google_move_near_real_eval_1.png"
    assert dict(grid[60].extra_kwargs) == {"urdf_version": "recolor_tabletop_visual_matching_1"}
    assert grid[0].robot_xy == (0.35, 0.21)
    # (Pose(q=euler2quat(0, 0, -0.09)) * Pose(q=[0, 0, 0, 1])).q
    assert grid[0].robot_quat == pytest.approx((math.sin(0.045), 0.0, 0.0, math.cos(0.045)))
    va = simpler.episode_grid("google-va", "move_near")
    assert va[0].env_name == "MoveNearGoogleInScene-v0" and dict(va[60].extra_kwargs) == {"no_distractor": True}
    assert va[-1].env_name == "MoveNearAltGoogleCamera2InScene-v0"


def test_drawer_visual_matching_pairs_each_overlay_with_its_robot_pose() -> None:
    grid = simpler.episode_grid("google-vm", "open_drawer")
    a0 = grid[0]
    assert (a0.env_name, a0.scene_name, a0.overlay) == (
        "OpenTopDrawerCustomInScene-v0",
        "dummy_drawer",
        "real_inpainting/open_drawer_a0.png",
    )
    assert list(a0.extra_kwargs) == ["shader_dir", "station_name", "light_mode", "disable_bad_material", "urdf_version"]
    assert dict(a0.extra_kwargs) == {
        "shader_dir": "rt",
        "station_name": "mk_station_recolor",
        "light_mode": "simple",
        "disable_bad_material": True,
        "urdf_version": "recolor_cabinet_visual_matching_1",
    }
    assert a0.robot_xy == (0.644, -0.179) and a0.obj_xy == (0.0, 0.0) and a0.max_episode_steps == 113
    assert a0.robot_quat == pytest.approx((math.sin(0.015), 0.0, 0.0, math.cos(0.015)))
    c2 = grid[8]
    assert c2.overlay == "real_inpainting/open_drawer_c2.png" and c2.robot_xy == (0.865, 0.222)
    assert grid[9].env_name == "OpenMiddleDrawerCustomInScene-v0" and grid[9].overlay.endswith("_a0.png")
    assert grid[27].extra_kwargs["urdf_version"] == "recolor_tabletop_visual_matching_1"
    assert grid[-1].extra_kwargs["urdf_version"] is None
    close = simpler.episode_grid("google-vm", "close_drawer")
    assert [ep.env_name for ep in close[::9][:3]] == [
        "CloseTopDrawerCustomInScene-v0",
        "CloseMiddleDrawerCustomInScene-v0",
        "CloseBottomDrawerCustomInScene-v0",
    ]


def test_drawer_variant_aggregation_grid() -> None:
    grid = simpler.episode_grid("google-va", "open_drawer")
    assert [ep.robot_xy for ep in grid[:4]] == [(0.65, -0.2), (0.65, 0.0), (0.65, 0.2), (0.75, -0.2)]
    assert grid[0].scene_name == "frl_apartment_stage_simple" and dict(grid[0].extra_kwargs) == {"shader_dir": "rt"}
    assert grid[27].scene_name == "modern_bedroom_no_roof" and grid[27].env_name == "OpenTopDrawerCustomInScene-v0"
    assert dict(grid[81].extra_kwargs) == {"shader_dir": "rt", "light_mode": "brighter"}
    assert dict(grid[90].extra_kwargs) == {"shader_dir": "rt", "light_mode": "darker"}
    assert dict(grid[-1].extra_kwargs) == {"shader_dir": "rt", "station_name": "mk_station3"}
    assert grid[-1].env_name == "OpenBottomDrawerCustomInScene-v0"


def test_apple_in_drawer_grids() -> None:
    vm = simpler.episode_grid("google-vm", "place_apple_in_closed_top_drawer")
    assert vm[0].env_name == "PlaceIntoClosedTopDrawerCustomInScene-v0" and vm[0].max_episode_steps == 200
    assert vm[0].extra_kwargs["model_ids"] == "baked_apple_v2" and vm[0].obj_xy == (-0.08, -0.02)
    assert vm[1].obj_xy == pytest.approx((-0.08, 0.03)) and vm[9].overlay == "real_inpainting/open_drawer_b0.png"
    assert vm[9].robot_xy == (0.652, 0.009)
    va = simpler.episode_grid("google-va", "place_apple_in_closed_top_drawer")
    assert dict(va[0].extra_kwargs) == {"shader_dir": "rt", "model_ids": "apple"}
    assert va[0].robot_xy == (0.65, -0.2) and va[9].robot_xy == (0.65, 0.0)
    assert dict(va[-1].extra_kwargs) == {"shader_dir": "rt", "station_name": "mk_station3", "model_ids": "apple"}


def test_unknown_google_task_names_the_known_ones() -> None:
    with pytest.raises(EvalError, match="pick_coke_can"):
        simpler.episode_grid("google-vm", "stack_cube")


# --------------------------------------------------------------------------------------------
# Through the stand-in SimplerEnv
# --------------------------------------------------------------------------------------------


def test_config_builds_and_resets_the_env_exactly_as_simplerenv_does(standin: tuple[Path, ModuleType]) -> None:
    data, envs = standin
    sim = simpler.make_simpler(google_task("google-vm", "pick_coke_can"), 1)
    try:
        out = sim.reset([7], [26])  # URDF None, standing can, obj (-0.35, 0.09)
        (env_name, kwargs), *_ = made(envs)
        assert env_name == "GraspSingleOpenedCokeCanInScene-v0"
        assert kwargs == {
            "lr_switch": True,  # config 0 was built first
            "urdf_version": None,
            "obs_mode": "rgbd",
            "robot": "google_robot_static",
            "sim_freq": 513,
            "control_mode": "arm_pd_ee_delta_pose_align_interpolate_by_planner"
            "_gripper_pd_joint_target_delta_pos_interpolate_by_planner",  # SimplerEnv's, for google_robot_static
            "control_freq": 3,
            "max_episode_steps": 80,
            "scene_name": "google_pick_coke_can_1_v4",
            "camera_cfgs": {"add_segmentation": True},
            "rgb_overlay_path": str(data / "real_inpainting/google_coke_can_real_eval_1.png"),
            "rgb_overlay_cameras": ["overhead_camera"],
        }
        env_name, kwargs = made(envs)[-1]
        assert kwargs["upright"] is True and "lr_switch" not in kwargs
        _, seed, options = resets(envs)[-1]
        assert seed == 7
        np.testing.assert_allclose(options["robot_init_options"]["init_xy"], [0.35, 0.20])
        np.testing.assert_allclose(options["robot_init_options"]["init_rot_quat"], [0, 0, 0, 1])
        np.testing.assert_allclose(options["obj_init_options"]["init_xy"], [-0.35, 0.09])
        assert out.images.shape == (1, 8, 10, 3) and out.images.dtype == np.uint8
        assert out.instructions == ["pick coke can"] and not out.done
        assert sim.max_steps == 80 and sim.control_freq == 3.0 and sim.n_configs == 300
    finally:
        sim.close()


def test_episode_runs_to_the_tasks_step_limit_and_reports_its_success(standin: tuple[Path, ModuleType]) -> None:
    _, envs = standin
    sim = simpler.make_simpler(google_task("google-vm", "move_near"), 1)
    try:
        out = sim.reset([0], [3])
        assert out.instructions == ["move 7up can near apple"]  # the env's own instruction for episode 3
        lift = np.array([[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0]])
        steps = 0
        while not out.done:
            out = sim.step(lift)
            steps += 1
            if steps == 1:
                assert out.infos[0]["success"] is False
        assert steps == 80
        assert out.infos[0]["success"] is True and out.infos[0]["elapsed_steps"] == 80
        assert set(out.infos[0]) == {"elapsed_steps", "success", "lift", "episode_stats.lift"}  # arrays dropped
        assert out.images.shape == (1, 8, 10, 3) and out.images[0, 0, 0, 0] == 80
        sent = [c[2] for c in envs.CALLS if c[0] == "step"]
        np.testing.assert_array_equal(sent[0], lift[0])
    finally:
        sim.close()


def test_env_is_remade_only_when_a_config_needs_other_kwargs(standin: tuple[Path, ModuleType]) -> None:
    _, envs = standin
    sim = simpler.make_simpler(google_task("google-vm", "pick_coke_can"), 1)
    try:
        for config in (0, 1, 24):  # same URDF and can pose
            sim.reset([0], [config])
        assert len(made(envs)) == 1
        sim.reset([0], [75])  # next URDF
        assert len(made(envs)) == 2 and ("close", "GraspSingleOpenedCokeCanInScene-v0") in envs.CALLS
        assert made(envs)[-1][1]["urdf_version"] == "recolor_tabletop_visual_matching_1"
        with pytest.raises(EvalError, match="outside SimplerEnv's grid"):
            sim.reset([0], [300])
    finally:
        sim.close()


def test_description_names_backend_grid_and_asset_digest(standin: tuple[Path, ModuleType]) -> None:
    data, _ = standin
    sim = simpler.make_simpler(google_task("google-va", "open_drawer"), 1)
    try:
        d = sim.description
        assert d["backend"] == "simpler_env" and d["env_id"] == "google_robot_open_drawer"
        assert d["grid"]["configs"] == 189 and d["grid"]["source"].endswith("scripts/drawer_variant_agg.sh")
        assert d["grid"]["variants"] == {"base": 27, "backgrounds": 54, "lighting": 54, "cabinets": 54}
        assert (d["max_steps"], d["control_freq"], d["sim_freq"]) == (113, 3.0, 513.0)
        assert d["assets"]["dir"] == str(data) and d["assets"]["folders"] == ["custom", "hab2_bench_assets"]
        assert d["assets"]["digest"] and d["assets"]["files"] > 0
        assert "numpy" in d["versions"]
    finally:
        sim.close()
    # another overlay photo is another digest: results on other assets never mix
    before = simpler.check_assets("t", simpler.episode_grid("google-vm", "open_drawer"), data)
    (data / "real_inpainting/open_drawer_a0.png").write_bytes(b"other photo")
    after = simpler.check_assets("t", simpler.episode_grid("google-vm", "open_drawer"), data)
    assert before["digest"] != after["digest"]


def test_apple_in_drawer_moves_to_its_second_instruction(standin: tuple[Path, ModuleType]) -> None:
    sim = simpler.make_simpler(google_task("google-vm", "place_apple_in_closed_top_drawer"), 1)
    try:
        out = sim.reset([0], [0])
        assert out.instructions == ["open top drawer"]
        out = sim.step(np.zeros((1, 7)))
        assert out.instructions == ["open top drawer"]
        # a predicted stop (8th value, terminate_episode) ends the first subtask, as in SimplerEnv's evaluator
        out = sim.step(np.array([[0, 0, 0, 0, 0, 0, 0, 1.0]]))
        assert out.instructions == ["place apple into top drawer"]
        # without a stop, the env advances by itself after 100 steps
        out = sim.reset([0], [1])
        for _ in range(101):
            out = sim.step(np.zeros((1, 7)))
        assert out.instructions == ["place apple into top drawer"] and not out.done
        while not out.done:
            out = sim.step(np.array([[0, 0, 0.5, 0, 0, 0, 0]]))
        assert out.infos[0]["elapsed_steps"] == 200 and out.infos[0]["success"] is True
    finally:
        sim.close()


def test_the_runner_gets_this_backend_for_google_suites(standin: tuple[Path, ModuleType], tmp_path: Path) -> None:
    from refinevla.evaluate.runner import RunArgs, make_simulator

    task = google_task("google-vm", "close_drawer")
    sim = make_simulator(task, RunArgs(policy=tmp_path, suite="google-vm", out=tmp_path / "out"))
    try:
        assert isinstance(sim, simpler.SimplerSim) and sim.n_configs == 108
        assert sim.reset([0], [0]).instructions == ["close top drawer"]
    finally:
        sim.close()


def test_several_envs_run_in_lock_step_in_separate_processes(standin: tuple[Path, ModuleType]) -> None:
    sim = simpler.make_simpler(google_task("google-vm", "pick_coke_can"), 2)
    try:
        assert isinstance(sim, ProcessSims) and sim.description["processes"] == 2
        out = sim.reset([0, 1], [0, 299])
        assert out.images.shape == (2, 8, 10, 3) and out.instructions == ["pick coke can"] * 2
        assert not np.array_equal(out.images[0], out.images[1])  # different URDF: different env
        actions = np.array([[0, 0, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=np.float64)
        steps = 0
        while not out.done:
            out = sim.step(actions)
            steps += 1
        assert steps == 80 and [i["success"] for i in out.infos] == [True, False]
    finally:
        sim.close()


# --------------------------------------------------------------------------------------------
# What is missing, and how to get it
# --------------------------------------------------------------------------------------------


def test_missing_simplerenv_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_simpler(monkeypatch)
    with pytest.raises(EvalError) as err:
        simpler.make_simpler(google_task("google-vm", "pick_coke_can"), 1)
    text = str(err.value)
    assert "\n" not in text
    assert "not installed here: simpler_env, mani_skill2_real2sim" in text
    assert simpler.SIMPLER_INSTALL in text
    assert "git clone --recurse-submodules https://github.com/simpler-env/SimplerEnv" in text
    assert "pip install -e SimplerEnv/ManiSkill2_real2sim && pip install -e SimplerEnv" in text


def test_simplerenv_next_to_maniskill3_is_told_to_use_its_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_simpler(monkeypatch)
    versions = {"sapien": "3.0.3"}
    monkeypatch.setattr(simpler.metadata, "version", lambda pkg: versions[pkg])
    with pytest.raises(EvalError, match=r"sapien 3\.0\.3 here is ManiSkill3's, so use a separate environment"):
        simpler.import_simpler()


def test_missing_scene_files_name_the_folder_and_how_to_get_them(standin: tuple[Path, ModuleType]) -> None:
    data, envs = standin
    (data / "real_inpainting/google_move_near_real_eval_1.png").unlink()
    with pytest.raises(EvalError) as err:
        simpler.make_simpler(google_task("google-vm", "move_near"), 1)
    text = str(err.value)
    assert "\n" not in text and str(data) in text
    assert "real_inpainting/google_move_near_real_eval_1.png" in text
    assert "MS2_REAL2SIM_ASSET_DIR" in text and "--recurse-submodules" in text
    assert made(envs) == []  # nothing is built before the assets are there


def test_env_build_failures_name_the_env_and_its_kwargs(
    standin: tuple[Path, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, envs = standin

    def no_vulkan(self: Any, env_name: str, **kwargs: Any) -> None:
        raise RuntimeError("vk::Instance::enumeratePhysicalDevices: ErrorInitializationFailed\nmore")

    monkeypatch.setattr(envs.GoogleRobotSceneEnv, "__init__", no_vulkan)
    with pytest.raises(EvalError) as err:
        simpler.make_simpler(google_task("google-vm", "open_drawer"), 1)
    text = str(err.value)
    assert "OpenTopDrawerCustomInScene-v0" in text and "'shader_dir': 'rt'" in text
    assert "Vulkan" in text and "\n" not in text


def test_a_google_robot_run_end_to_end_through_the_standin(
    standin: tuple[Path, ModuleType], tmp_path: Path, paligemma_policy: Path
) -> None:
    """`run_eval` on google-vm with a refine-train checkpoint: the grid's first configs, the task's
    step limit, success from the env, and the env gripper = SimplerEnv's sticky relative command."""
    from refinevla.evaluate.results import read_episodes, read_run
    from refinevla.evaluate.robots import GripperState
    from refinevla.evaluate.runner import RunArgs, run_eval

    _, envs = standin
    out = tmp_path / "google"
    args = RunArgs(
        policy=paligemma_policy,
        suite="google-vm",
        out=out,
        tasks=["pick_coke_can"],
        max_episodes=2,
        log_actions=True,
        robot="google_robot",  # the fixture is a WidowX policy; take Google Robot's conventions
        max_rationale_tokens=2,
        device="cpu",
    )
    summary = run_eval(args, progress=lambda _: None)
    assert summary.done == 2
    eps = read_episodes(out)
    assert [(e["task"], e["config"]) for e in eps] == [("pick_coke_can", 0), ("pick_coke_can", 1)]
    limit = made(envs)[0][1]["max_episode_steps"]
    for ep in eps:
        assert ep["env_id"] == "google_robot_pick_coke_can" and ep["grasp"] is None
        assert ep["steps"] == limit == len(ep["actions"])
        lift = sum(a["env_action"][2] for a in ep["actions"])
        assert ep["success"] is (lift >= 1.0)  # the stand-in's success rule, as the env reported it
        raw = np.array([a["raw_action"] for a in ep["actions"]])
        sent = np.array([a["env_action"] for a in ep["actions"]])
        gripper = GripperState("google_robot", 1)
        expected = np.concatenate([gripper.command(raw[t : t + 1, 6]) for t in range(len(raw))])[:, 0]
        np.testing.assert_array_equal(sent[:, 6], expected)
        assert sent[0, 6] == 0.0  # relative: nothing to compare the first step with
    sent_options = [c[3] for c in envs.CALLS if c[0] == "reset"][:2]
    grid = simpler.episode_grid("google-vm", "pick_coke_can")
    for options, config in zip(sent_options, grid[:2], strict=True):  # the script's own poses, in its order
        for key, want in config.reset_options().items():
            for name, value in want.items():
                np.testing.assert_array_equal(options[key][name], value)
    run = read_run(out)
    assert run["backend"] == "simpler_env" and run["policy"]["robot"] == "google_robot"
