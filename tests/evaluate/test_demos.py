"""`refine-eval demos`: the scripted expert in SimplerEnv's own WidowX scene, written as BridgeData V2
RLDS that TFDS and refinevla read, whose stored actions replay to success through refine-eval's
WidowX conventions, whose declared transform and robot reach training, and whose truth file (legs,
gripper events, the objects' boxes) agrees with the stored episodes and the renderer's segmentation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

CARROT = "PutCarrotOnPlateInScene-v1"


def test_demos_are_bridge_rlds_that_tfds_and_refinevla_read(demos_dir: Path) -> None:
    import tensorflow_datasets as tfds

    from refinevla.annotate.sources import ReadOptions, open_source
    from refinevla.evaluate.demos import parse_episode_path

    assert (demos_dir / "features.json").is_file()  # the builder files are in DIR itself
    info = tfds.builder_from_directory(str(demos_dir)).info
    steps = info.features["steps"]
    assert steps["observation"]["image_0"].shape == (256, 256, 3)
    assert steps["observation"]["state"].shape == (7,) and steps["action"].shape == (7,)
    assert info.splits["train"].num_examples == 2

    episodes = list(open_source(f"rlds:{demos_dir}").iter_episodes(ReadOptions()))
    pairs = set()
    for ep in episodes:
        parsed = parse_episode_path(ep.metadata["file_path"])
        assert parsed is not None, ep.metadata
        pairs.add(parsed)
        assert ep.instruction == "put carrot on plate"
        assert ep.actions.shape == (60, 7) and ep.states.shape == (60, 7)
        assert set(np.unique(ep.actions[:, 6])) == {0.0, 1.0}  # absolute open gripper, closed then open
        assert np.asarray(ep.frames["image_0"][0]).shape == (256, 256, 3)
    assert pairs == {(CARROT, 0, 0), (CARROT, 1, 0)}


def test_video_shows_every_step_of_each_try(demos_dir: Path) -> None:
    """--video: one mp4 per try, named by its scene, holding the frame before each action and the outcome."""
    import av

    for config in (0, 1):
        path = demos_dir / "videos" / "carrot_on_plate" / f"config-{config:03d}_seed-0.mp4"
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 61 and frames[0].shape == (480, 640, 3)
        assert np.abs(frames[0].astype(int) - frames[30].astype(int)).mean() > 1.0  # the arm moved
    assert not list(demos_dir.glob("videos/**/*.partial.mp4"))
    assert not (demos_dir / "videos" / "carrot_on_plate" / "failed").exists()  # both tries were kept


REPLAY_STORED = """
import json, sys
import numpy as np
from refinevla.annotate.sources import ReadOptions, open_source
from refinevla.evaluate.backends.maniskill import ManiSkillSim
from refinevla.evaluate.demos import ScriptedExpert, Waypoints, parse_episode_path
from refinevla.evaluate.robots import GripperState, env_actions, flat_env_action

sim = ManiSkillSim(sys.argv[2], 1, "cpu")
report = []
for ep in open_source("rlds:" + sys.argv[1]).iter_episodes(ReadOptions()):
    _, config, seed = parse_episode_path(ep.metadata["file_path"])
    sim.reset([seed], [config])
    start = ScriptedExpert(sim.env, Waypoints(), np.random.default_rng(0), 0.0).state()
    gripper = GripperState("widowx", 1)
    for action in ep.actions:
        out = sim.step(flat_env_action(env_actions(action[None], gripper)))
    report.append({"config": config, "seed": seed, "success": bool(out.infos[0]["success"]),
                   "state_error": float(np.abs(ep.states[0][:6] - start[:6]).max())})
sim.close()
print(json.dumps(report))
"""


def test_stored_actions_replay_to_success_through_the_widowx_conventions(
    demos_dir: Path, sim_env: dict[str, str]
) -> None:
    """In a fresh process (ManiSkill reads MS_ASSET_DIR once, at import): each stored episode, replayed
    through refine-eval's WidowX post-processing, succeeds; its first state is the scene's end effector
    in the robot's base frame."""
    cmd = [sys.executable, "-c", REPLAY_STORED, str(demos_dir), CARROT]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sim_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted((e["config"], e["seed"]) for e in report) == [(0, 0), (1, 0)]
    assert all(e["success"] for e in report), report
    assert max(e["state_error"] for e in report) < 1e-5


def test_the_declared_transform_and_robot_reach_training(demos_dir: Path, tmp_path: Path) -> None:
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate
    from refinevla.annotate.sources import open_source
    from refinevla.annotate.stats import auto_transform
    from refinevla.train.trainer import train
    from tests.train.conftest import build_paligemma, config

    assert auto_transform(open_source(f"rlds:{demos_dir}")) == "none"  # Bridge's layout, but declared
    assert auto_transform(open_source("sample")) == "bridge_orig"  # undeclared Bridge layout: as before
    published = tmp_path / "published"
    assert run_annotate(AnnotateArgs(source=f"rlds:{demos_dir}", out=published, progress="none", license="mit")) == 0
    model = build_paligemma(tmp_path / "model")
    cfg = config(published, model, tmp_path / "ckpt", tmp_path / "cache", max_steps=1)
    train(cfg)
    policy = json.loads((tmp_path / "ckpt" / "refinevla_policy.json").read_text())
    assert (policy["transform"], policy["robot"]) == ("none", "widowx")  # refine-eval needs no --robot


# The phase of each leg as the stored actions must show it: the gripper command (1 open), and how the
# position moves (z down / up dominant, x-y dominant, any, or not at all). grasp and release also change the
# gripper command at their first step.
LEG_ACTIONS = {
    "approach": (1.0, "moves"),
    "descend": (1.0, "down"),
    "grasp": (0.0, "still"),
    "lift": (0.0, "up"),
    "transport": (0.0, "across"),
    "place": (0.0, "down"),
    "release": (1.0, "still"),
    "retreat": (1.0, "up"),
    "hold": (1.0, "still"),
}


def test_truth_legs_and_gripper_steps_agree_with_the_stored_episodes(demos_dir: Path) -> None:
    from refinevla.annotate.primitives import gripper_events
    from refinevla.annotate.sources import ReadOptions, open_source
    from refinevla.schemas.truth import PHASES, read_truth

    source = open_source(f"rlds:{demos_dir}")
    truth = source.truth()  # type: ignore[attr-defined]  # RldsSource's accessor
    assert truth is not None and truth == read_truth(demos_dir)
    episodes = list(source.iter_episodes(ReadOptions()))
    assert sorted(truth) == sorted(ep.episode_id for ep in episodes)  # keyed as the reader names episodes
    for ep in episodes:
        t = truth[ep.episode_id]
        assert (t.file_path, t.task, t.instruction) == (ep.metadata["file_path"], "carrot_on_plate", ep.instruction)
        assert t.num_steps == len(ep.actions) == 60
        assert [leg.phase for leg in t.legs] == list(PHASES)  # the whole plan fits in carrot's 60 steps
        assert [leg.start_step for leg in t.legs] == [0] + [leg.end_step + 1 for leg in t.legs[:-1]]
        assert t.legs[-1].end_step == t.num_steps - 1
        events = gripper_events(ep.states)
        assert [(e.kind, e.step) for e in events] == [("close", t.grasp_step), ("open", t.release_step)]
        by_phase = {leg.phase: leg for leg in t.legs}
        assert t.grasp_step == by_phase["grasp"].start_step + 1 and t.release_step == by_phase["release"].start_step + 1
        for leg in t.legs:
            actions = ep.actions[leg.start_step : leg.end_step + 1]
            assert (actions == actions[0]).all(), leg  # open loop: one command along a leg
            grip, motion = LEG_ACTIONS[leg.phase]
            move, turn = actions[0][:3], actions[0][3:6]
            assert actions[0][6] == grip, leg
            if leg.phase in ("grasp", "release"):
                assert ep.actions[leg.start_step - 1][6] == 1.0 - grip, leg  # the command changed here
            across, z = float(np.abs(move[:2]).max()), float(move[2])
            still = not move.any() and not turn.any()
            assert {
                "still": still,
                "moves": not still,
                "down": z < 0 and -z >= across,
                "up": z > 0 and z >= across,
                "across": across > abs(z),
            }[motion], (leg, actions[0])


RENDER_FIRST_FRAMES = """
import sys
import numpy as np
from refinevla.evaluate.backends.maniskill import ManiSkillSim

sim = ManiSkillSim(sys.argv[2], 1, "cpu")
out = {}
for pair in sys.argv[3:]:
    config, seed = (int(v) for v in pair.split(","))
    first = sim.reset([seed], [config])
    masks, u = sim.actor_masks(), sim.env.unwrapped
    out[f"{pair}/rgb"] = first.images[0]
    out[f"{pair}/source"] = masks[u.source_obj_name]
    out[f"{pair}/target"] = masks[u.target_obj_name]
sim.close()
np.savez_compressed(sys.argv[1], **out)
"""


def test_truth_boxes_are_the_objects_segmentation_on_the_stored_first_frame(
    demos_dir: Path, sim_env: dict[str, str], tmp_path: Path
) -> None:
    """In a fresh process: each demo's scene reset again, its camera frame and the task objects' masks. The
    stored box is the mask's extent in the stored frame (continuous edges, 640x480 -> 256x256), the stored
    frame is that camera frame, and the stored frame shows the object inside its box."""
    from refinevla.annotate.sources import ReadOptions, open_source
    from refinevla.evaluate.demos import parse_episode_path
    from refinevla.schemas.truth import read_truth
    from refinevla.train.policy import resize_image

    truth = read_truth(demos_dir)
    assert truth is not None
    episodes = list(open_source(f"rlds:{demos_dir}").iter_episodes(ReadOptions()))
    scenes = {ep.episode_id: parse_episode_path(ep.metadata["file_path"]) for ep in episodes}
    pairs = [f"{scene[1]},{scene[2]}" for scene in scenes.values() if scene is not None]
    rendered = tmp_path / "first.npz"
    cmd = [sys.executable, "-c", RENDER_FIRST_FRAMES, str(rendered), CARROT, *pairs]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sim_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sim = np.load(rendered)
    for ep in episodes:
        t, scene = truth[ep.episode_id], scenes[ep.episode_id]
        assert scene is not None
        pair = f"{scene[1]},{scene[2]}"
        assert [(o.name, o.role) for o in t.objects] == [("carrot", "source"), ("plate", "target")]
        assert t.scene_objects == ("carrot", "plate") and t.image_size == (256, 256)
        frame = np.asarray(ep.frames["image_0"][0]).astype(int)
        camera = sim[f"{pair}/rgb"]
        assert camera.shape == (480, 640, 3)
        assert np.abs(resize_image(camera, (256, 256)).astype(int) - frame).mean() < 3  # the same frame (JPEG)
        for obj, role in zip(t.objects, ("source", "target"), strict=True):
            mask = sim[f"{pair}/{role}"]
            ys, xs = np.nonzero(mask)
            sx, sy = 256 / 640, 256 / 480
            extent = (xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy)
            assert obj.box == pytest.approx(extent, abs=0.006), obj
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            assert 0.003 < (x1 - x0) * (y1 - y0) / 256**2 < 0.1, obj  # an object on a table, not the scene
            cx, cy = (xs + 0.5) * sx, (ys + 0.5) * sy  # every mask pixel's centre lies in the box
            assert ((x0 <= cx) & (cx <= x1) & (y0 <= cy) & (cy <= y1)).all()
            # the stored frame shows the object there: the mask's pixels (nearest, at 256x256) have its colour
            rows = ((np.arange(256) + 0.5) / sy).astype(int)
            cols = ((np.arange(256) + 0.5) / sx).astype(int)
            small = mask[rows][:, cols]
            assert small.any()
            r_, g_, b_ = frame[small].mean(axis=0)
            if obj.name == "carrot":  # orange against the brown table and grey wall
                assert r_ - b_ > 100 and b_ < 70, (r_, g_, b_)
            else:  # the plate: pale green-yellow
                assert g_ > 200 and min(r_, g_, b_) > 130, (r_, g_, b_)


def test_the_rlds_reader_gives_the_truth_none_without_it_and_one_line_when_broken(
    demos_dir: Path, tmp_path: Path
) -> None:
    """The truth through the RLDS source; an older demos folder (no truth file) reads as before."""
    import shutil

    from refinevla.annotate.errors import SourceError
    from refinevla.annotate.sources import ReadOptions, open_source
    from refinevla.annotate.stats import auto_transform
    from refinevla.evaluate.demos import read_demo_pairs
    from refinevla.evaluate.replay import ReplayPolicy
    from refinevla.schemas.truth import TRUTH_FILE, read_truth

    old = tmp_path / "old"
    shutil.copytree(demos_dir, old, ignore=shutil.ignore_patterns("videos"))
    truth = open_source(f"rlds:{old}").truth()  # type: ignore[attr-defined]
    assert truth is not None and len(truth) == 2 and truth == read_truth(demos_dir)
    for body, needle in (
        ("{", "not readable as JSON"),
        ('{"format": "refinevla-truth/1", "episodes": [{"episode_id": "x"}]}', "missing field"),
    ):
        (old / TRUTH_FILE).write_text(body)
        with pytest.raises(SourceError) as caught:
            open_source(f"rlds:{old}").truth()  # type: ignore[attr-defined]
        message = str(caught.value)
        assert "\n" not in message and str(old / TRUTH_FILE) in message and needle in message, message
    (old / TRUTH_FILE).unlink()
    source = open_source(f"rlds:{old}")
    assert source.truth() is None  # type: ignore[attr-defined]
    assert len(list(source.iter_episodes(ReadOptions()))) == 2 and auto_transform(source) == "none"
    assert read_demo_pairs(old, "--episodes-from").pairs(CARROT) == [(0, 0), (1, 0)]
    assert set(ReplayPolicy(f"replay:{old}").views) == {(CARROT, 0, 0), (CARROT, 1, 0)}
    assert open_source("sample").truth() is None  # type: ignore[attr-defined]  # any other dataset: none


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tasks", "carrot"], "unknown widowx task(s) carrot"),
        (["--suite", "google-vm"], "demonstrations are recorded in the widowx suite's scenes only"),
        (["--episodes", "0"], "--episodes 0: must be at least 1"),
    ],
)
def test_bad_demos_flags_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    from refinevla.evaluate.cli import app

    result = CliRunner().invoke(app, ["demos", *args, "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output


def test_a_folder_with_data_is_never_written_over(tmp_path: Path, sim_env: dict[str, str]) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "features.json").write_text("{}")
    cmd = [sys.executable, "-m", "refinevla.evaluate", "demos", "--tasks", "carrot_on_plate", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sim_env, timeout=120)
    assert r.returncode == 1 and "exists and is not empty" in r.stderr and "Traceback" not in r.stderr
    assert (out / "features.json").read_text() == "{}"


def test_replay_of_the_demos_own_scenes_succeeds(demos_dir: Path, replay_run: Path) -> None:
    """A perfect imitator of the training view (transform + tokenizer round trip) on the demos' own scenes."""
    records = [json.loads(line) for line in (replay_run / "episodes.jsonl").read_text().splitlines()]
    assert sorted((rec["config"], rec["seed"]) for rec in records) == [(0, 0), (1, 0)]  # exactly the demos' scenes
    assert all(rec["success"] for rec in records)
    run = json.loads((replay_run / "run.json").read_text())
    assert run["episodes_from"] == str(demos_dir) and run["policy"]["transform"] == "none"


def test_the_schedule_follows_the_demos_folder() -> None:
    from refinevla.evaluate.config import RunArgs
    from refinevla.evaluate.demos import DemoPairs
    from refinevla.evaluate.runner import schedule
    from refinevla.evaluate.suites import suite_tasks

    task = suite_tasks("widowx", ["carrot_on_plate"])[0]
    demos = DemoPairs(Path("d"), {CARROT: [(3, 7), (0, 0), (3, 8)], "OtherTask-v1": [(5, 0)]})
    base = {"policy": Path("p"), "suite": "widowx", "out": Path("o")}
    own, _ = schedule(task, 24, RunArgs(**base, episodes_from=Path("d")), set(), demos)
    assert own == [(0, 0, 0), (3, 0, 7), (3, 1, 8)]  # (config, repeat, seed): exactly the recorded scenes
    held, _ = schedule(task, 24, RunArgs(**base, held_out_from=Path("d"), episodes_per_config=2), set(), demos)
    assert {c for c, _, _ in held} == set(range(24)) - {0, 3} and len(held) == 44
    assert (1, 1, 25) in held  # the default seeds (seed + repeat * n_configs + config) elsewhere


def test_a_folder_that_is_no_demos_is_one_line(sim_env: dict[str, str], tmp_path: Path) -> None:
    from refinevla.annotate.sources.presets import sample_dir

    base = [sys.executable, "-m", "refinevla.evaluate", "run", "--suite", "widowx", "--tasks", "carrot_on_plate"]
    for extra, needle in (
        (["--policy", "ckpt", "--episodes-from", sample_dir()], "not a refine-eval demos path"),
        (["--policy", f"replay:{sample_dir()}"], "is not a refine-eval demos episode"),
        (["--policy", f"replay:{tmp_path / 'nothing'}"], "not a refine-eval demos folder"),
    ):
        r = subprocess.run([*base, *extra, "--out", str(tmp_path / "o")], capture_output=True, text=True, env=sim_env)
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
