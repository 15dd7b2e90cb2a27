"""Prompt and target serialisation, the loss mask, reasoning dropout, and the joint loss."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refinevla.schemas import load_schema  # noqa: E402
from refinevla.train.errors import TrainError  # noqa: E402
from refinevla.train.loss import joint_loss  # noqa: E402
from refinevla.train.targets import (  # noqa: E402
    ACTION,
    IGNORE_INDEX,
    PROMPT,
    RATIONALE,
    drop_parts,
    prompt_text,
    serialisation_for,
    target_ids,
    target_text,
)


def test_serialisation_order_is_the_schemas_own():
    ser = serialisation_for("refinevla.rationale/1")
    schema = load_schema("refinevla.rationale/1")
    episode_order = list(schema["properties"])
    step_order = list(schema["$defs"]["step"]["properties"])
    assert ser.episode_parts == ("observation", "situation_analysis", "spatial_reasoning", "task_plan")
    assert ser.step_parts == ("subtask", "subtask_reason", "move", "move_reason")
    assert [episode_order.index(p) for p in ser.episode_parts] == sorted(
        episode_order.index(p) for p in ser.episode_parts
    )
    assert [step_order.index(p) for p in ser.step_parts] == sorted(step_order.index(p) for p in ser.step_parts)


def test_an_unknown_schema_id_is_refused_with_one_line():
    with pytest.raises(TrainError) as exc:
        serialisation_for("refinevla.rationale/99", where="OUT/refinevla.json")
    msg = str(exc.value)
    assert "\n" not in msg and "refinevla.rationale/99" in msg and "refinevla.rationale/1" in msg


def test_prompt_and_target_text():
    assert (
        prompt_text("put the spoon on the towel.") == "What action should the robot take to put the spoon on the towel?"
    )
    assert target_text([["SUBTASK", "grasp"], ["MOVE", "move left"]]) == "SUBTASK: grasp\nMOVE: move left\nACTION:"


def test_target_ids_end_with_action_tag_action_ids_and_eos(paligemma_dir):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(paligemma_dir).tokenizer
    ids, kinds = target_ids(tok, [["MOVE", "move left"]], [300, 301, 302, 303, 304, 305, 306])
    assert ids[-8:] == [300, 301, 302, 303, 304, 305, 306, tok.eos_token_id]
    tag = tok("ACTION:", add_special_tokens=False)["input_ids"]
    assert ids[-8 - len(tag) : -8] == tag
    assert tok.decode(ids[: -8 - len(tag)]) == "MOVE: move left\n"
    assert kinds == [RATIONALE] * (len(ids) - 8 - len(tag)) + [ACTION] * (8 + len(tag))


def test_reasoning_dropout_drops_whole_parts_at_the_given_rate():
    parts = [[f"T{i}", f"text {i}"] for i in range(8)]
    assert drop_parts(parts, 0.0, random.Random(0)) == parts
    kept = [len(drop_parts(parts, 0.25, random.Random(i))) for i in range(2000)]
    assert abs(np.mean(kept) / 8 - 0.75) < 0.02
    sub = drop_parts(parts, 0.5, random.Random(3))
    assert all(p in parts for p in sub) and sub == [p for p in parts if p in sub]  # order kept


def _batch(vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kinds = torch.tensor([[PROMPT] * 4 + [RATIONALE] * 5 + [ACTION] * 3])
    labels = torch.randint(0, vocab, kinds.shape, generator=g)
    labels[kinds == PROMPT] = IGNORE_INDEX
    logits = torch.randn(1, kinds.shape[1], vocab, generator=g, requires_grad=True)
    return logits, labels, kinds


def test_lambda_zero_gives_zero_gradient_from_rationale_tokens():
    logits, labels, kinds = _batch()
    out = joint_loss(logits, labels, kinds, reasoning_weight=0.0)
    out.loss.backward()
    grad = logits.grad[0]
    # logit t predicts label t+1: rationale labels sit at 4..8, so logits 3..7 must get no gradient
    assert torch.count_nonzero(grad[3:8]) == 0
    assert torch.count_nonzero(grad[8:11]) > 0
    # ... and changing the rationale labels changes nothing
    labels2 = labels.clone()
    labels2[kinds == RATIONALE] = (labels2[kinds == RATIONALE] + 1) % 32
    logits2 = logits.detach().clone().requires_grad_(True)
    joint_loss(logits2, labels2, kinds, 0.0).loss.backward()
    assert torch.equal(logits2.grad, logits.grad)


def test_joint_loss_is_action_mean_plus_lambda_rationale_mean():
    logits, labels, kinds = _batch(seed=1)
    out = joint_loss(logits, labels, kinds, reasoning_weight=0.5)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    k = kinds[0, 1:]
    expect = ce[k == ACTION].mean() + 0.5 * ce[k == RATIONALE].mean()
    assert torch.allclose(out.loss, expect) and out.n_action == 3 and out.n_rationale == 5
    # the prompt is outside the loss: its labels do not matter
    assert torch.count_nonzero(torch.autograd.grad(out.loss, logits)[0][0, :3]) == 0
