"""`refine-eval attention` on the tiny PaliGemma and Idefics3 checkpoints (random weights, 2 decoder
layers, 32x32 images): map shapes and normalisation, agreement with attention taken straight from
one full forward pass, layer choice, errors, and the PNG."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from refinevla.evaluate.attention import (
    AttentionMaps,
    attention_maps,
    image_positions,
    overlay,
    patch_grid,
    run_attention,
)
from refinevla.evaluate.errors import EvalError
from refinevla.train.policy import N_ACTION, generate, resize_image
from refinevla.train.targets import ACTION_TAG, prompt_text

INSTRUCTION = "put the spoon on the towel"
BUDGET = 8  # rationale tokens: enough for a rationale map, short enough to decode fast


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A non-square frame, so the resize to the policy's 32x32 and the overlay are exercised."""
    return (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def policies(paligemma_policy: Path, idefics3_policy: Path) -> Iterator[dict[str, Any]]:
    from refinevla.train.policy import Policy

    yield {"paligemma": Policy(paligemma_policy), "idefics3": Policy(idefics3_policy)}


@pytest.fixture(scope="module")
def pali_maps(policies: dict[str, Any], frame: np.ndarray) -> AttentionMaps:
    return attention_maps(policies["paligemma"], frame, INSTRUCTION, max_rationale_tokens=BUDGET)


def prompt_and_inputs(policy: Any, frame: np.ndarray) -> tuple[list[int], dict[str, Any]]:
    """The prompt ids and image tensors the processor makes of the frame as the policy sees it."""
    size = (int(policy.info["image_size"][0]), int(policy.info["image_size"][1]))
    ids, extra = policy.adapter.encode_prompts(
        policy.processor, [prompt_text(INSTRUCTION)], [resize_image(frame, size)]
    )
    return ids[0], extra


def image_token_count(policy: Any, frame: np.ndarray) -> int:
    ids, _ = prompt_and_inputs(policy, frame)
    return ids.count(policy.model.config.image_token_id)


def check_normalised(grid_map: np.ndarray, grid: tuple[int, int]) -> None:
    assert grid_map.shape == grid
    assert np.isfinite(grid_map).all()
    assert (grid_map >= 0).all()
    assert abs(grid_map.sum() - 1.0) < 1e-5


def test_maps_cover_the_image_token_grid_and_sum_to_one(
    pali_maps: AttentionMaps, policies: dict[str, Any], frame: np.ndarray
) -> None:
    policy = policies["paligemma"]
    count = image_token_count(policy, frame)
    assert count == policy.processor.image_seq_length  # 16: 32x32 pixels in 8x8 patches
    side = round(count**0.5)
    assert pali_maps.grid == (side, side)
    check_normalised(pali_maps.action_map, pali_maps.grid)
    assert pali_maps.rationale_map is not None
    check_normalised(pali_maps.rationale_map, pali_maps.grid)
    assert 0 < pali_maps.action_image_share <= 1
    assert pali_maps.rationale_image_share is not None and 0 < pali_maps.rationale_image_share <= 1
    assert pali_maps.layers == (0, 1) and pali_maps.num_layers == 2
    tag = len(policy.adapter.tokenizer(policy.processor)(ACTION_TAG, add_special_tokens=False)["input_ids"])
    assert pali_maps.rationale_tokens == len(pali_maps.generated_ids) - tag - N_ACTION == BUDGET
    assert policy.model.config._attn_implementation == "sdpa"  # the replay's eager attention is undone


@pytest.mark.parametrize("family", ["paligemma", "idefics3"])
def test_maps_equal_the_image_attention_of_one_full_forward_pass(
    family: str, policies: dict[str, Any], frame: np.ndarray
) -> None:
    """Independently: one eager forward pass over prompt + generated ids (a freshly loaded model),
    layer -1, heads and rows averaged at the image columns, renormalised. The rows are those that
    produced the tokens — checked by the action-bin argmax of their logits giving the action ids."""
    import torch
    from transformers import AutoModelForImageTextToText

    policy = policies[family]
    maps = attention_maps(policy, frame, INSTRUCTION, layers=[-1], max_rationale_tokens=BUDGET)
    prompt, extra = prompt_and_inputs(policy, frame)
    assert list(maps.prompt_ids) == prompt
    ids = torch.tensor([prompt + list(maps.generated_ids)])
    model = AutoModelForImageTextToText.from_pretrained(policy.path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **extra,
            **policy.adapter.text_inputs([len(prompt)], ids.shape[1]),
            output_attentions=True,
        )
    attention = out.attentions[-1][0].mean(dim=0).double().numpy()  # (seq, seq), heads averaged
    columns = [i for i, t in enumerate(prompt) if t == model.config.image_token_id]
    producing = len(prompt) - 1 + np.arange(len(maps.generated_ids))  # row of the token before each one

    def expected(rows: np.ndarray) -> np.ndarray:
        mean = attention[rows][:, columns].mean(axis=0)
        return (mean / mean.sum()).reshape(maps.grid)

    action_rows = producing[-N_ACTION:]
    np.testing.assert_allclose(maps.action_map, expected(action_rows), atol=1e-5)
    assert maps.rationale_map is not None
    np.testing.assert_allclose(maps.rationale_map, expected(producing[: maps.rationale_tokens]), atol=1e-5)
    lo, hi = policy.actions.first_id, policy.actions.first_id + policy.actions.n_bins
    argmax = out.logits[0, action_rows, lo:hi].argmax(dim=-1) + lo
    assert argmax.tolist() == list(maps.generated_ids[-N_ACTION:])


def test_choosing_layers_changes_the_map_and_all_layers_pool_them(
    pali_maps: AttentionMaps, policies: dict[str, Any], frame: np.ndarray
) -> None:
    policy = policies["paligemma"]
    first = attention_maps(policy, frame, INSTRUCTION, layers=[0], max_rationale_tokens=BUDGET)
    last = attention_maps(policy, frame, INSTRUCTION, layers=[-1], max_rationale_tokens=BUDGET)
    assert first.layers == (0,) and last.layers == (1,)
    assert not np.allclose(first.action_map, last.action_map, atol=1e-6)
    # averaging happens before normalising: the all-layer map weighs each layer by its image share
    s0, s1 = first.action_image_share, last.action_image_share
    pooled = (s0 * first.action_map + s1 * last.action_map) / (s0 + s1)
    np.testing.assert_allclose(pali_maps.action_map, pooled, atol=1e-6)
    assert pali_maps.action_image_share == pytest.approx((s0 + s1) / 2, abs=1e-6)


@pytest.mark.parametrize("layers", [[2], [0, -3]])
def test_layer_out_of_range_names_the_layer_count(
    layers: list[int], policies: dict[str, Any], frame: np.ndarray
) -> None:
    with pytest.raises(EvalError, match="has 2 decoder layers"):
        attention_maps(policies["paligemma"], frame, INSTRUCTION, layers=layers)


def test_a_model_without_an_image_token_id_is_refused(
    policies: dict[str, Any], frame: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = policies["paligemma"]
    # the same decoder, under a config that names no image token
    monkeypatch.setattr(policy, "model", SimpleNamespace(model=policy.model.model, config=SimpleNamespace()))
    with pytest.raises(EvalError, match="cannot locate the image tokens of a paligemma model"):
        attention_maps(policy, frame, INSTRUCTION)


def test_unreadable_image_is_named(paligemma_policy: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing-frame.png"
    with pytest.raises(EvalError, match=r"missing-frame\.png.*no such file"):
        run_attention(paligemma_policy, missing, INSTRUCTION, tmp_path / "out.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    with pytest.raises(EvalError, match=r"garbage\.png: cannot read the image"):
        run_attention(paligemma_policy, garbage, INSTRUCTION, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_without_reasoning_there_is_an_action_map_only(policies: dict[str, Any], frame: np.ndarray) -> None:
    policy = policies["paligemma"]
    maps = attention_maps(policy, frame, INSTRUCTION, reasoning=False)
    assert maps.rationale_map is None and maps.rationale_image_share is None
    assert maps.rationale == "" and maps.rationale_tokens == 0
    assert len(maps.generated_ids) == N_ACTION
    check_normalised(maps.action_map, maps.grid)
    # recording the decoding does not change it
    plain = generate(policy, [resize_image(frame, (32, 32))], [INSTRUCTION], reasoning=False)[0]
    np.testing.assert_array_equal(maps.action, plain.action)


def test_run_attention_writes_a_png_with_the_frame_and_each_map(
    paligemma_policy: Path, frame: np.ndarray, tmp_path: Path
) -> None:
    from PIL import Image

    image = tmp_path / "frame.png"
    Image.fromarray(frame).save(image)
    both = run_attention(
        paligemma_policy, image, INSTRUCTION, tmp_path / "deep" / "both.png", [-1], True, "cpu", BUDGET
    )
    action = run_attention(paligemma_policy, image, INSTRUCTION, tmp_path / "action.png", None, False, "cpu")
    assert both.layers == (1,) and both.rationale_map is not None and action.rationale_map is None
    sizes = {}
    for name in ("deep/both.png", "action.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"
            png.load()
            sizes[name] = png.size
    (w3, h3), (w2, h2) = sizes["deep/both.png"], sizes["action.png"]
    assert h3 == h2 and 200 <= h3 <= 1000
    assert w3 == pytest.approx(1.5 * w2, rel=0.02)  # three panels against two
    assert w2 > 1.5 * h2


def test_overlay_is_the_frame_size_and_follows_the_map(frame: np.ndarray) -> None:
    grid_map = np.zeros((4, 4))
    grid_map[0, 0] = 1.0  # all the attention on the top-left patch
    picture = overlay(frame, grid_map)
    assert picture.shape == frame.shape and picture.dtype == np.uint8
    blank = overlay(np.zeros_like(frame), grid_map).astype(int)
    h, w = frame.shape[:2]
    top_left, bottom_right = blank[: h // 8, : w // 8].mean(axis=(0, 1)), blank[-h // 8 :, -w // 8 :].mean(axis=(0, 1))
    assert top_left[0] > top_left[2] + 20  # the colormap's hot end
    assert bottom_right[2] > bottom_right[0] + 20  # its cold end


def test_idefics3_maps_follow_the_pixel_shuffled_grid(policies: dict[str, Any], frame: np.ndarray) -> None:
    policy = policies["idefics3"]
    maps = attention_maps(policy, frame, INSTRUCTION, layers=[0], max_rationale_tokens=BUDGET)
    count = image_token_count(policy, frame)
    config = policy.model.config
    patches = config.vision_config.image_size // config.vision_config.patch_size
    assert count == (patches // config.scale_factor) ** 2 == maps.grid[0] * maps.grid[1]
    assert maps.grid == (2, 2)
    check_normalised(maps.action_map, maps.grid)
    assert maps.rationale_map is not None
    check_normalised(maps.rationale_map, maps.grid)


def test_image_positions_take_the_last_run_of_image_tokens() -> None:
    # Idefics3 with image splitting: <fake><row_1_col_1><image>*4 ... <fake><global-img><image>*4<fake>
    ids = [9, 5, 7, 3, 3, 3, 3, 5, 8, 3, 3, 3, 3, 5, 6, 3, 3, 3, 3, 5, 1]
    assert image_positions(ids, 3) == [15, 16, 17, 18]
    assert image_positions([3, 3, 2, 1], 3) == [0, 1]
    assert image_positions([2, 1], 3) == []


def test_patch_grid_follows_the_image_aspect() -> None:
    assert patch_grid(256, (224, 224)) == (16, 16)
    assert patch_grid(12, (30, 40)) == (3, 4)
    with pytest.raises(EvalError, match="7 image tokens"):
        patch_grid(7, (32, 32))
