"""`refine-eval run` end to end on the real simulator, as a user types it (a subprocess per command).

SimplerEnv's WidowX task `PutCarrotOnPlateInScene-v1` runs on ManiSkill3 on the CPU with the
workplace's SimplerEnv assets (real robot, objects and overlay photos; the table stage is a
stand-in, so the success rate is not comparable to papers). The policy is a tiny checkpoint made
by `refine-train` in the test session. One run is killed with SIGKILL after its first episode and
resumed; every check reads what the run left on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinevla.evaluate.robots import euler_to_axis_angle
from tests.evaluate.conftest import CARROT_RUN, CARROT_STEPS, CARROT_TASK_STEPS, episodes, refine_eval

PICKCUBE_STEPS = 50  # PickCube-v1's max_episode_steps
PICKCUBE_CAP = 15  # --max-steps there


def test_killed_run_resumes_without_repeating_an_episode(carrot_run: Path) -> None:
    eps = episodes(carrot_run)
    keys = [(e["suite"], e["task"], e["config"], e["repeat"]) for e in eps]
    assert keys == [("widowx", "carrot_on_plate", c, 0) for c in (0, 1, 2)]
    first = json.loads((carrot_run / "killed_first_line.json").read_text())
    assert eps[0] == first  # the episode finished before the kill is kept as it was, not rerun


def test_episode_records_come_from_the_task(carrot_run: Path) -> None:
    for ep in episodes(carrot_run):
        assert ep["env_id"] == "PutCarrotOnPlateInScene-v1"
        assert ep["instruction"] == "put carrot on plate"  # the task's own instruction
        assert ep["steps"] == CARROT_STEPS == ep["info"]["elapsed_steps"]  # --max-steps: the env's own count
        assert ep["success"] is ep["info"]["success"]  # taken from the env's info at the last step
        # SimplerEnv's grasp metric is an "ever" flag: at least what the last step's info says
        assert ep["grasp"] is True or ep["info"]["consecutive_grasp"] is False
        assert ep["grasped_once"] is True or ep["info"]["is_src_obj_grasped"] is False
        assert ep["success_once"] is True or ep["success"] is False
        assert len(ep["rationales"]) == CARROT_STEPS and all(isinstance(r, str) for r in ep["rationales"])
        assert ep["wall_s"] > 0


def test_logged_actions_follow_widowx_conventions(carrot_run: Path, paligemma_policy: Path) -> None:
    stats = json.loads((paligemma_policy / "dataset_statistics.json").read_text())
    (entry,) = stats.values()
    lo, hi = np.asarray(entry["action"]["q01"]), np.asarray(entry["action"]["q99"])
    mask = np.asarray(entry["action"]["mask"])
    for ep in episodes(carrot_run):
        assert len(ep["actions"]) == CARROT_STEPS
        raw = np.array([a["raw_action"] for a in ep["actions"]])
        sent = np.array([a["env_action"] for a in ep["actions"]])
        assert raw.shape == sent.shape == (CARROT_STEPS, 7)
        # unnormalised outputs lie within the statistics' q01..q99 where the mask applies
        assert np.all(raw[:, mask] >= lo[mask] - 1e-6) and np.all(raw[:, mask] <= hi[mask] + 1e-6)
        np.testing.assert_allclose(sent[:, :3], raw[:, :3])  # world vector as is
        np.testing.assert_allclose(sent[:, 3:6], euler_to_axis_angle(raw[:, 3:6]), atol=1e-9)
        np.testing.assert_array_equal(sent[:, 6], np.where(raw[:, 6] > 0.5, 1.0, -1.0))


def test_videos_hold_every_frame(carrot_run: Path) -> None:
    import av

    for ep in episodes(carrot_run):
        path = carrot_run / ep["video"]
        with av.open(str(path)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert frames == CARROT_STEPS + 1  # the reset frame and one per step
    assert not list(carrot_run.rglob("*.partial*"))  # the killed episode's half-written video was redone


def test_run_json_records_checkpoint_backend_and_assets(carrot_run: Path, paligemma_policy: Path) -> None:
    run = json.loads((carrot_run / "run.json").read_text())
    assert run["policy"]["path"] == str(paligemma_policy.resolve())
    assert run["backend"] == "maniskill3"
    assert run["versions"]["mani_skill"] and run["versions"]["torch"]
    assets = run["assets"]
    assert assets["dir"].endswith("simpler_assets/data") and len(assets["digest"]) == 64 and assets["files"] > 10
    sim = run["simulators"]["maniskill3:PutCarrotOnPlateInScene-v1"]
    assert sim["max_steps"] == CARROT_STEPS and sim["reference_max_steps"] == CARROT_TASK_STEPS
    assert sim["control_freq"] == 5
    assert sim["n_configs"] == 24  # the task's built-in episode configurations


def test_report_beside_published_baselines(carrot_run: Path, tmp_path: Path, sim_env: dict[str, str]) -> None:
    from PIL import Image

    extra = tmp_path / "mine.csv"
    extra.write_text("suite,task,metric,model,value\nwidowx_vm,carrot_on_plate,success,MyVLA,12.5\n")
    result = refine_eval(sim_env, "report", str(carrot_run), "--baselines", str(extra), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "report.md").read_text()
    successes = sum(e["success"] for e in episodes(carrot_run))
    row = next(line for line in md.splitlines() if line.startswith("| carrot_on_plate"))
    assert f"{100 * successes / 3:.1f}% [" in row and "(n=3)" in row
    assert "SpatialVLA" in md and "12.5%" in row  # packaged and user baselines side by side
    assert json.loads((carrot_run / "run.json").read_text())["assets"]["digest"] in md
    with Image.open(tmp_path / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    # `run` wrote its own report into the results folder at the end
    assert (carrot_run / "report.md").is_file() and (carrot_run / "report.png").is_file()


def test_rerun_of_a_finished_run_runs_nothing(
    carrot_run: Path, paligemma_policy: Path, sim_env: dict[str, str]
) -> None:
    """Nothing left to run: the policy is not even loaded (a --device this machine lacks is never touched);
    with one episode left it is, and that device is one line."""
    args = ["run", "--policy", str(paligemma_policy), "--suite", "widowx", "--tasks", "carrot_on_plate"]
    args += [*CARROT_RUN, "--device", "cuda:7", "--out", str(carrot_run)]
    result = refine_eval(sim_env, *args, "--max-episodes", "3")
    assert result.returncode == 0, result.stderr
    assert "0 episodes to run, 3 already done" in result.stdout
    assert len(episodes(carrot_run)) == 3
    more = refine_eval(sim_env, *args, "--max-episodes", "4")  # one episode to run: the policy loads, and fails
    assert more.returncode == 1 and "--device cuda:7: torch sees 0 CUDA device(s)" in more.stderr, more.stderr
    assert "Traceback" not in more.stderr
    assert len(episodes(carrot_run)) == 3


def test_rerun_with_other_settings_is_refused(
    carrot_run: Path, paligemma_policy: Path, sim_env: dict[str, str]
) -> None:
    args = ["run", "--policy", str(paligemma_policy), "--suite", "widowx", "--tasks", "carrot_on_plate"]
    result = refine_eval(sim_env, *args, *CARROT_RUN, "--reasoning", "off", "--out", str(carrot_run))
    assert result.returncode == 1
    assert "reasoning" in result.stderr and "another --out" in result.stderr
    assert "Traceback" not in result.stderr


def test_any_maniskill_task_with_parallel_cpu_envs(
    tmp_path: Path, paligemma_policy: Path, sim_env: dict[str, str]
) -> None:
    """PickCube-v1 (assets ship with mani-skill), 2 envs as 2 processes answered by one forward pass."""
    out = tmp_path / "pickcube"
    result = refine_eval(
        sim_env,
        "run",
        "--policy",
        str(paligemma_policy),
        "--suite",
        "maniskill:PickCube-v1",
        "--instruction",
        "pick up the red cube",
        "--episodes-per-config",
        "2",
        "--num-envs",
        "2",
        "--reasoning",
        "off",
        "--max-steps",
        str(PICKCUBE_CAP),
        "--out",
        str(out),
        "--no-report",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    eps = episodes(out)
    assert [(e["task"], e["config"], e["repeat"]) for e in eps] == [("PickCube-v1", 0, 0), ("PickCube-v1", 0, 1)]
    assert eps[0]["seed"] != eps[1]["seed"]
    for ep in eps:
        assert ep["suite"] == "maniskill:PickCube-v1" and ep["instruction"] == "pick up the red cube"
        assert ep["steps"] == PICKCUBE_CAP and ep["grasp"] is None  # --max-steps reaches each env's process
        assert ep["rationales"] == [""] * PICKCUBE_CAP  # --reasoning off: the action only
    run = json.loads((out / "run.json").read_text())
    sim = run["simulators"]["maniskill3:PickCube-v1"]
    assert sim["processes"] == 2 and (sim["max_steps"], sim["reference_max_steps"]) == (PICKCUBE_CAP, PICKCUBE_STEPS)


def test_missing_assets_name_the_download_command(
    tmp_path: Path, paligemma_policy: Path, sim_env: dict[str, str]
) -> None:
    env = {**sim_env, "MS_ASSET_DIR": str(tmp_path / "empty")}
    args = ["run", "--policy", str(paligemma_policy), "--suite", "widowx", "--tasks", "spoon_on_towel"]
    result = refine_eval(env, *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 1
    assert "python -m mani_skill.utils.download_asset bridge_v2_real2sim" in result.stderr
    assert "MS_ASSET_DIR" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_view_shows_each_episodes_frames_rationales_actions_and_outcome(carrot_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("rerun", reason="rerun: needs the [viz] extra")
    from rerun.chunk import RrdReader

    rrd = tmp_path / "eval.rrd"
    result = subprocess.run(
        [sys.executable, "-m", "refinevla.evaluate", "view", str(carrot_run), "--episodes", "1", "--save", str(rrd)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"logged 1 episode(s), {CARROT_STEPS + 1} frames" in result.stdout
    rows: dict[str, list[dict[str, Any]]] = {}
    for chunk in RrdReader(str(rrd)).stream():
        rows.setdefault(chunk.entity_path, []).extend(chunk.to_record_batch().to_pylist())
    ep = episodes(carrot_run)[1]
    assert not any(k.startswith("/episodes/0/") for k in rows)
    assert len(rows["/episodes/1/camera"]) == CARROT_STEPS + 1
    written = [r["TextDocument:text"][0] for r in rows["/episodes/1/rationale"]]
    assert (
        written == [text or "(no rationale: action-only)" for text in ep["rationales"]] and len(written) == CARROT_STEPS
    )
    for name in ("raw_action", "env_action"):
        values = [r["Scalars:scalars"] for r in rows[f"/episodes/1/{name}"] if r.get("Scalars:scalars") is not None]
        np.testing.assert_allclose(np.array(values), np.array([a[name] for a in ep["actions"]]), rtol=1e-6)
    (doc,) = rows["/episodes/1/result"]
    assert f"configuration {ep['config']}, seed {ep['seed']}" in doc["TextDocument:text"][0]
    assert f"**Success**: {'yes' if ep['success'] else 'no'}" in doc["TextDocument:text"][0]

    bare = tmp_path / "bare"  # the same results without their videos, asked for frames
    bare.mkdir()
    for name in ("run.json", "episodes.jsonl"):
        (bare / name).write_bytes((carrot_run / name).read_bytes())
    refused = subprocess.run(
        [sys.executable, "-m", "refinevla.evaluate", "view", str(bare), "--frames", "--save", str(tmp_path / "b.rrd")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and "have no video" in lines[0], refused.stderr
    assert "--video" in lines[0]


def test_video_rationale_writes_each_steps_rationale_under_its_frame(
    paligemma_policy: Path, sim_env: dict[str, str], tmp_path: Path
) -> None:
    import av

    out = tmp_path / "results"
    args = ["run", "--policy", str(paligemma_policy), "--suite", "widowx", "--tasks", "carrot_on_plate"]
    args += ["--max-episodes", "1", "--max-rationale-tokens", "12", "--max-steps", str(CARROT_STEPS)]
    args += ["--video", "--video-rationale", "--out", str(out)]
    result = refine_eval(sim_env, *args, "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    (ep,) = episodes(out)
    with av.open(str(out / ep["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == CARROT_STEPS + 1 and frames[0].shape[0] > 480 and frames[0].shape[1] == 640
    from refinevla.evaluate.overlay import PANEL_LINES, with_rationale

    assert frames[0].shape[0] == with_rationale(frames[0][:480], "").shape[0] == 480 + PANEL_LINES * 14 + 8
    panel = frames[0][488:, :8].astype(int)  # left margin of the panel: dark, whatever the text
    assert panel.mean() < 40
    without_video = [a for a in args[:-2] if a != "--video"]  # --video-rationale alone
    alone = refine_eval(sim_env, *without_video, "--out", str(tmp_path / "r2"))
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode != 0 and "give both" in lines[-1] and "Traceback" not in alone.stderr
