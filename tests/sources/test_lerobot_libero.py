"""A LeRobot dataset in the layout of LeRobot's published LIBERO datasets (8-D `observation.state` only, no
refinevla_source.json), written by `refine-eval demos`' own LeRobot writer from scripted LIBERO observations (no
simulator): the `lerobot:` reader converts the state to the 7-D one motion primitives read and declares the robot
libero_panda, so annotate takes it and a policy trained on it names its robot unasked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.errors import SourceError
from refinevla.annotate.sources import SourceOverrides, open_source
from refinevla.annotate.sources.libero_layout import is_libero_layout, libero_state
from refinevla.evaluate.libero_demos import LiberoDemo, ee_state, write_libero_lerobot
from refinevla.evaluate.suites import Task

STEPS = 12
OPEN, CLOSED = (0.04, -0.04), (0.0, 0.0)  # robot0_gripper_qpos at the Panda's finger limits


def scripted_obs(t: int, seed: int) -> dict[str, Any]:
    """A LIBERO observation of a reach-and-grasp: the hand pointing down, turning about z, moving forward and
    down, its fingers open for the first half and closed after."""
    from scipy.spatial.transform import Rotation

    quat = Rotation.from_euler("xyz", [np.pi - 0.05, 0.1, 0.2 + 0.05 * t + 0.1 * seed]).as_quat()  # xyzw
    return {
        "robot0_eef_pos": np.array([-0.1 + 0.02 * t, 0.05 * seed, 1.1 - 0.01 * t]),
        "robot0_eef_quat": quat,
        "robot0_gripper_qpos": np.array(OPEN if t < STEPS // 2 else CLOSED),
    }


def scripted_demo(seed: int) -> LiberoDemo:
    """One demo as `record` keeps it: the policy's 8-D state (`policy_state`, robosuite's axis-angle) per step,
    and the 7-D state `refine-eval demos` computes from the quaternion, kept here as the expected conversion."""
    pytest.importorskip("robosuite", reason="LIBERO's 8-D state is built with robosuite's quat2axisangle")
    from refinevla.evaluate.backends.libero import policy_state

    task = Task("libero", "libero_object/0", "pick_up_the_alphabet_soup", "libero", "libero_panda", False)
    demo = LiberoDemo(task, seed, seed, "pick up the alphabet soup and place it in the basket")
    for t in range(STEPS):
        obs = scripted_obs(t, seed)
        demo.images.append(np.full((32, 32, 3), 10 * t, np.uint8))
        demo.wrists.append(np.full((32, 32, 3), 5 * t, np.uint8))
        demo.states.append(policy_state(obs))
        demo.ee_states.append(ee_state(obs))
        demo.actions.append(np.array([0.3, 0, -0.2, 0, 0, 0.1, -1.0 if t < STEPS // 2 else 1.0], np.float32))
    return demo


@pytest.fixture
def published_libero(tmp_path: Path) -> tuple[Path, list[LiberoDemo]]:
    """Two episodes in the published layout: the 8-D state and nothing else (no 7-D columns, no declaration)."""
    demos = [scripted_demo(0), scripted_demo(1)]
    root = tmp_path / "libero_object_lerobot"
    write_libero_lerobot(demos, root, fps=20.0)
    return root, demos


def test_the_published_layout_is_recognised_and_other_panda_datasets_are_not(published_libero):
    root, _ = published_libero
    info = json.loads((root / "meta/info.json").read_text())
    assert list(info["features"]["observation.state"]["shape"]) == [8] and not (root / "refinevla_source.json").exists()
    assert is_libero_layout(info)
    assert not is_libero_layout({**info, "robot_type": "franka"})
    no_wrist = {k: v for k, v in info["features"].items() if k != "observation.images.wrist_image"}
    assert not is_libero_layout({**info, "features": no_wrist})
    nine = {**info["features"], "observation.state": {"dtype": "float32", "shape": [9]}}
    assert not is_libero_layout({**info, "features": nine})


def test_the_reader_converts_the_8d_state_to_the_7d_one_and_declares_libero_panda(published_libero):
    root, demos = published_libero
    src = open_source(f"lerobot:{root}")
    assert src.declared == {"transform": "none", "robot": "libero_panda"}
    assert src.layout()["state"] == ["observation.state"]
    assert src.layout()["state_transform"] == "libero_axis_angle_qpos"
    episodes = list(src.iter_episodes())
    for episode, demo in zip(episodes, demos, strict=True):
        assert episode.states.shape == (STEPS, 7)
        # what refine-eval demos computes from the quaternion, recovered from the stored axis-angle
        np.testing.assert_allclose(episode.states, np.stack(demo.ee_states), atol=1e-5)
    gripper = episodes[0].states[:, 6]
    assert gripper[0] == pytest.approx(1.0) and gripper[-1] == pytest.approx(0.0)


def test_known_axis_angles_and_finger_positions_convert_to_rpy_and_opening():
    half_turn_about_z = [0.1, 0.2, 0.3, 0.0, 0.0, np.pi / 2, *OPEN]
    roll_about_x = [0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.02, -0.02]
    closed = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, *CLOSED]
    got = libero_state(np.array([half_turn_about_z, roll_about_x, closed]), "test")
    np.testing.assert_allclose(got[0], [0.1, 0.2, 0.3, 0.0, 0.0, np.pi / 2, 1.0], atol=1e-6)
    np.testing.assert_allclose(got[1], [0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.5], atol=1e-6)
    assert got[2, 6] == 0.0


def test_a_state_whose_last_columns_are_no_panda_fingers_is_one_line_naming_file_and_feature():
    joints = np.zeros((3, 8))
    joints[:, 6:] = [0.7, 1.2]  # radians of some arm's joints, not finger positions in metres
    with pytest.raises(SourceError, match=r"data/x\.parquet: observation\.state: columns 6-7 .*--state-key"):
        libero_state(joints, "data/x.parquet: observation.state")


def test_a_state_key_given_or_declared_is_read_as_is(published_libero):
    root, _ = published_libero
    src = open_source(f"lerobot:{root}", overrides=SourceOverrides(state_key=("observation.state",)))
    assert src.layout()["state_transform"] is None and src.declared["robot"] == "libero_panda"
    assert next(iter(src.iter_episodes())).states.shape == (STEPS, 8)


def annotate(*args: str) -> Any:
    return CliRunner().invoke(app, ["annotate", *args, "--progress", "none", "--license", "mit"])


def test_annotate_takes_the_published_layout_and_records_what_it_read_and_declares(published_libero, tmp_path):
    root, demos = published_libero
    out = tmp_path / "published"
    r = annotate(f"lerobot:{root}", "--out", str(out))
    assert r.exit_code == 0, r.output
    steps = pl.read_parquet(out / "data").sort("episode_id", "step")
    first = steps.filter(pl.col("episode_id") == steps["episode_id"][0])
    np.testing.assert_allclose(np.stack(first["state"].to_list()), np.stack(demos[0].ee_states), atol=1e-5)
    # the fingers close half-way: the primitives see that gripper event
    assert first["gripper"][0] == "open" and first["gripper"][STEPS - 1] == "closed"
    source = json.loads((out / "refinevla.json").read_text())["source"]
    assert source["declared"] == {"transform": "none", "robot": "libero_panda"}
    assert source["layout"]["state"] == ["observation.state"]
    assert source["layout"]["state_transform"] == "libero_axis_angle_qpos"
    assert source["layout"]["cameras"] == ["observation.images.image"]
    card = (out / "README.md").read_text()
    assert "`observation.state` (converted: `libero_axis_angle_qpos`)" in card and "libero_panda" in card


def test_a_policy_trained_on_it_names_libero_panda(published_libero, tmp_path):
    from refinevla.annotate.stats import compute_statistics
    from refinevla.train.actions import ActionTokenizer
    from refinevla.train.policy import policy_description
    from refinevla.train.table import build_table, open_published

    root, _ = published_libero
    out = tmp_path / "published"
    assert annotate(f"lerobot:{root}", "--out", str(out)).exit_code == 0
    table = build_table(open_published(str(out)), cache_dir=tmp_path / "tables")  # what refine-train builds
    assert (table.meta["robot"], table.meta["transform"]) == ("libero_panda", "none")
    stats = compute_statistics(open_source(f"lerobot:{root}").iter_episodes(), table.meta["transform"])
    description = policy_description(
        family="tiny",
        base_model="tiny",
        table_meta=table.meta,
        actions=ActionTokenizer.from_statistics(stats, 512),
        unnorm_key=table.meta["dataset"],
        image_size=(32, 32),
        reasoning=True,
        config={k: 0 for k in ("reasoning_weight", "reasoning_dropout", "trainable_layers", "lora_rank", "seed")},
        step=0,
    )
    assert description["robot"] == "libero_panda"


def test_the_state_key_and_cameras_given_are_recorded_in_the_published_dataset(tmp_path):
    """--state-key / --camera change what the rows hold: the manifest and the card say which were used."""
    from refinevla.evaluate.libero_demos import EE_STATE_KEYS, write_libero_demos

    demos_dir = tmp_path / "demos"  # refine-eval demos' folder: the 7-D columns beside the 8-D state
    write_libero_demos([scripted_demo(0)], demos_dir, fps=20.0)
    out = tmp_path / "wrist"
    keys = tuple(reversed(EE_STATE_KEYS))  # gripper first: not the declared order, so what is recorded is the flag's
    r = annotate(f"lerobot:{demos_dir}", "--out", str(out), "--camera", "wrist_image", "--state-key", ",".join(keys))
    assert r.exit_code == 0, r.output
    layout = json.loads((out / "refinevla.json").read_text())["source"]["layout"]
    assert layout["state"] == list(keys) and layout["state_transform"] is None
    assert layout["cameras"] == ["observation.images.wrist_image"]
    assert "cameras `observation.images.wrist_image`" in (out / "README.md").read_text()
    rlds = tmp_path / "sample"
    assert annotate("sample", "--out", str(rlds), "--limit", "1").exit_code == 0
    layout = json.loads((rlds / "refinevla.json").read_text())["source"]["layout"]
    assert (layout["state"], layout["cameras"]) == (["observation/state"], ["observation/image_0"])


def test_the_numpy_euler_angles_are_scipys_extrinsic_xyz() -> None:
    """annotate's core install has no scipy: its own conversion must equal scipy's, gimbal lock aside."""
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    from refinevla.annotate.sources.libero_layout import axis_angle_to_euler

    rotvecs = np.random.default_rng(0).normal(size=(500, 3)) * 1.5
    rotvecs = np.concatenate([rotvecs, [[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.0, 0.0, np.pi / 2], [np.pi, 0, 0]]])
    np.testing.assert_allclose(axis_angle_to_euler(rotvecs), rotation.from_rotvec(rotvecs).as_euler("xyz"), atol=1e-9)
