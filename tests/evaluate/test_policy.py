"""`RefinePolicy`: a refine-train checkpoint behind SimplerEnv's `reset` / `step` contract.

Un-normalisation is checked against OpenVLA's formula written out here from the checkpoint's own
`dataset_statistics.json`; checkpoint variants (other statistics, no robot, an action-only policy)
are copies of the tiny PaliGemma policy with one JSON file edited.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinevla.evaluate.errors import EvalError
from refinevla.evaluate.policy import RefinePolicy

INSTRUCTION = "put the carrot on the plate"
N_BINS = 256


def frame(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def edited_copy(src: Path, dst: Path, file: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
    data = json.loads((dst / file).read_text())
    edit(data)
    (dst / file).write_text(json.dumps(data))
    return dst


def openvla_unnormalise(ids: list[int], checkpoint: Path) -> np.ndarray:
    """OpenVLA's `predict_action` by hand: bin centre of (vocab_size - id), then q01/q99 where mask."""
    info = json.loads((checkpoint / "refinevla_policy.json").read_text())
    stats = json.loads((checkpoint / "dataset_statistics.json").read_text())[info["unnorm_key"]]["action"]
    vocab_size = info["action_tokenizer"]["vocab_size"]
    bins = np.linspace(-1.0, 1.0, N_BINS)
    centres = (bins[:-1] + bins[1:]) / 2.0
    discretised = np.clip(vocab_size - np.asarray(ids) - 1, 0, len(centres) - 1)
    normalised = centres[discretised]
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    mask = np.asarray(stats.get("mask", [True] * 6 + [False]))
    return np.where(mask, 0.5 * (normalised + 1.0) * (q99 - q01) + q01, normalised)


def flat_raw(raw: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([raw["world_vector"], raw["rotation_delta"], raw["open_gripper"]], axis=-1)


@pytest.fixture(scope="module")
def policy(paligemma_policy: Path) -> RefinePolicy:
    return RefinePolicy(paligemma_policy, max_rationale_tokens=3)


@pytest.fixture(scope="module")
def wide_stats_checkpoint(paligemma_policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same policy with distinct, non-degenerate q01/q99 per dimension and a second unmasked one."""

    def edit(data: dict[str, Any]) -> None:
        (entry,) = data.values()
        a = entry["action"]
        a["q01"] = [-0.05, -0.04, -0.03, -0.3, -0.2, -0.1, 0.0]
        a["q99"] = [0.06, 0.02, 0.09, 0.25, 0.35, 0.15, 1.0]
        a["min"] = [x - 0.01 for x in a["q01"]]
        a["max"] = [x + 0.01 for x in a["q99"]]
        a["mask"] = [True, True, False, True, True, True, False]

    return edited_copy(paligemma_policy, tmp_path_factory.mktemp("wide") / "ckpt", "dataset_statistics.json", edit)


# ---------------------------------------------------------------- un-normalisation
def test_vocab_size_in_the_policy_file_is_the_tokenizers(policy: RefinePolicy) -> None:
    tok = policy.checkpoint.adapter.tokenizer(policy.checkpoint.processor)
    assert policy.info["action_tokenizer"]["vocab_size"] == tok.vocab_size == policy.checkpoint.actions.vocab_size


def test_raw_action_is_openvlas_unnormalisation_of_the_generated_ids(
    policy: RefinePolicy, paligemma_policy: Path
) -> None:
    raw, action = policy.step(frame(0), INSTRUCTION)
    ids = policy.last[0].action_ids
    np.testing.assert_allclose(flat_raw(raw), openvla_unnormalise(ids, paligemma_policy), atol=1e-12)
    np.testing.assert_array_equal(action["world_vector"], raw["world_vector"])
    assert action["gripper"].tolist() == [1.0 if raw["open_gripper"][0] > 0.5 else -1.0]


def test_raw_action_follows_other_statistics(wide_stats_checkpoint: Path) -> None:
    transforms3d_euler = pytest.importorskip("transforms3d.euler")
    policy = RefinePolicy(wide_stats_checkpoint, max_rationale_tokens=3)
    raws = []
    for seed in range(3):
        raw, action = policy.step(frame(seed), INSTRUCTION)
        expected = openvla_unnormalise(policy.last[0].action_ids, wide_stats_checkpoint)
        np.testing.assert_allclose(flat_raw(raw), expected, atol=1e-12)
        raws.append(flat_raw(raw))
        ax, angle = transforms3d_euler.euler2axangle(*raw["rotation_delta"])
        np.testing.assert_allclose(action["rot_axangle"], ax * angle, atol=1e-9)
    q01, q99 = np.array([-0.05, -0.04, -0.03, -0.3, -0.2, -0.1]), np.array([0.06, 0.02, 0.09, 0.25, 0.35, 0.15])
    masked = np.stack(raws)[:, [0, 1, 3, 4, 5]]
    assert np.all(masked >= q01[[0, 1, 3, 4, 5]]) and np.all(masked <= q99[[0, 1, 3, 4, 5]])
    assert np.all(np.abs(np.stack(raws)[:, 2]) < 1.0)  # unmasked: the bin centre itself, in (-1, 1)


# ---------------------------------------------------------------- SimplerEnv shapes
def test_single_frame_gives_simplerenvs_unbatched_dicts(policy: RefinePolicy) -> None:
    policy.reset(INSTRUCTION)
    raw, action = policy.step(frame(1))
    assert {k: v.shape for k, v in raw.items()} == {"world_vector": (3,), "rotation_delta": (3,), "open_gripper": (1,)}
    assert {k: v.shape for k, v in action.items()} == {
        "world_vector": (3,),
        "rot_axangle": (3,),
        "gripper": (1,),
        "terminate_episode": (1,),
    }
    assert len(policy.rationales) == 1


def test_stacked_frames_give_batched_dicts(policy: RefinePolicy) -> None:
    frames = np.stack([frame(s) for s in range(3)])
    raw, action = policy.step(frames, INSTRUCTION)  # one instruction for every env
    assert policy.instructions == [INSTRUCTION] * 3
    assert {k: v.shape for k, v in raw.items()} == {
        "world_vector": (3, 3),
        "rotation_delta": (3, 3),
        "open_gripper": (3, 1),
    }
    assert {k: v.shape for k, v in action.items()} == {
        "world_vector": (3, 3),
        "rot_axangle": (3, 3),
        "gripper": (3, 1),
        "terminate_episode": (3, 1),
    }
    assert len(policy.rationales) == 3
    single_raw, _ = policy.step(frames[1], INSTRUCTION)
    np.testing.assert_allclose(raw["world_vector"][1], single_raw["world_vector"])


def test_frame_count_must_match_the_instructions(policy: RefinePolicy) -> None:
    policy.reset(["a", "b"])
    with pytest.raises(EvalError, match="3 frames for 2 instructions"):
        policy.step(np.stack([frame(s) for s in range(3)]))


# ---------------------------------------------------------------- per-env gripper state
def make_sticky(policy: RefinePolicy, value: float) -> None:
    g = policy.gripper
    g.sticky_on[:] = True
    g.sticky_action[:] = value
    g.repeat[:] = 3


def test_same_instruction_keeps_the_sticky_gripper(paligemma_policy: Path) -> None:
    policy = RefinePolicy(paligemma_policy, robot="google_robot", max_rationale_tokens=0)
    policy.step(frame(0), "pick coke can")
    make_sticky(policy, 1.0)
    _, action = policy.step(frame(0), "pick coke can")
    assert action["gripper"].tolist() == [1.0]
    assert policy.gripper.repeat.tolist() == [4]


def test_a_new_instruction_resets_the_gripper_state(paligemma_policy: Path) -> None:
    policy = RefinePolicy(paligemma_policy, robot="google_robot", max_rationale_tokens=0)
    policy.step(frame(0), "pick coke can")
    make_sticky(policy, 1.0)
    _, action = policy.step(frame(0), "move near the apple")
    assert policy.instructions == ["move near the apple"]
    assert action["gripper"].tolist() == [0.0]  # a fresh episode: no previous action, nothing sticky
    assert policy.gripper.sticky_on.tolist() == [False] and policy.gripper.repeat.tolist() == [0]


def test_a_changed_instruction_in_a_batch_resets_every_env(paligemma_policy: Path) -> None:
    policy = RefinePolicy(paligemma_policy, robot="google_robot", max_rationale_tokens=0)
    frames = np.stack([frame(0), frame(1)])
    policy.step(frames, ["open the drawer", "close the drawer"])
    make_sticky(policy, -1.0)
    _, action = policy.step(frames, ["open the drawer", "close the drawer"])
    assert action["gripper"][:, 0].tolist() == [-1.0, -1.0]
    make_sticky(policy, -1.0)
    _, action = policy.step(frames, ["open the drawer", "pick coke can"])
    assert action["gripper"][:, 0].tolist() == [0.0, 0.0]
    assert policy.gripper.n_envs == 2


# ---------------------------------------------------------------- frames
@pytest.mark.parametrize("size", [(480, 640), (20, 30), (32, 32), (256, 256)])
def test_frames_are_resized_to_the_checkpoints_image_size_with_training_lanczos(
    policy: RefinePolicy, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    from PIL import Image

    import refinevla.evaluate.policy as policy_module
    from refinevla.train.data import decode_resize

    seen: list[list[np.ndarray]] = []
    real = policy_module.generate

    def recording(checkpoint: Any, frames: list[np.ndarray], *args: Any) -> Any:
        seen.append(frames)
        return real(checkpoint, frames, *args)

    monkeypatch.setattr(policy_module, "generate", recording)
    img = frame(3, size)
    policy.step(np.stack([img, img[::-1]]), INSTRUCTION)
    expected_size = tuple(policy.info["image_size"])
    assert policy.image_size == expected_size
    (frames,) = seen
    assert [f.shape for f in frames] == [(*expected_size, 3)] * 2
    assert all(f.dtype == np.uint8 for f in frames)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    np.testing.assert_array_equal(frames[0], decode_resize(png.getvalue(), expected_size))


# ---------------------------------------------------------------- checkpoint variants
def test_a_checkpoint_without_a_robot_needs_one(paligemma_policy: Path, tmp_path: Path) -> None:
    def edit(info: dict[str, Any]) -> None:
        info["robot"] = None
        info["transform"] = "my_lab_robot"

    ckpt = edited_copy(paligemma_policy, tmp_path / "ckpt", "refinevla_policy.json", edit)
    with pytest.raises(EvalError, match="names no robot"):
        RefinePolicy(ckpt)
    policy = RefinePolicy(ckpt, robot="google_robot")
    assert policy.robot == "google_robot"
    assert policy.describe()["robot"] == "google_robot"
    with pytest.raises(EvalError):
        RefinePolicy(ckpt, robot="franka")


def test_robot_argument_overrides_the_checkpoints(policy: RefinePolicy, paligemma_policy: Path) -> None:
    assert policy.info["robot"] == "widowx" and policy.robot == "widowx"
    assert RefinePolicy(paligemma_policy, robot="google_robot").gripper.robot == "google_robot"


def test_reasoning_is_off_for_a_policy_trained_without_it(paligemma_policy: Path, tmp_path: Path) -> None:
    def edit(info: dict[str, Any]) -> None:
        info["reasoning"] = False

    ckpt = edited_copy(paligemma_policy, tmp_path / "ckpt", "refinevla_policy.json", edit)
    action_only = RefinePolicy(ckpt, reasoning=True, max_rationale_tokens=5)
    assert action_only.reasoning is False
    action_only.step(frame(0), INSTRUCTION)
    (gen,) = action_only.last
    assert (gen.rationale, gen.forced_tag, gen.new_tokens) == ("", False, 7)

    reasoning = RefinePolicy(paligemma_policy, reasoning=True, max_rationale_tokens=0)
    assert reasoning.reasoning is True
    reasoning.step(frame(0), INSTRUCTION)
    assert reasoning.last[0].forced_tag is True and reasoning.last[0].new_tokens > 7


def test_the_rationale_budget_defaults_to_the_policys_longest_training_rationale(paligemma_policy: Path) -> None:
    """A budget below the training rationales forces ACTION: mid-rationale on every step (measured in the
    closed loop: λ = 1 with the old fixed 256 imitated 0/240 frames), so the default comes from the policy."""
    longest = json.loads((paligemma_policy / "refinevla_policy.json").read_text())["rationale_tokens"]["max"]
    default = RefinePolicy(paligemma_policy)
    assert default.max_rationale_tokens > longest and default.budget_warning is None
    short = RefinePolicy(paligemma_policy, max_rationale_tokens=3)
    assert short.max_rationale_tokens == 3 and short.budget_warning is not None
    assert f"below the {longest} tokens" in short.budget_warning
    assert RefinePolicy(paligemma_policy, reasoning=False, max_rationale_tokens=3).budget_warning is None
