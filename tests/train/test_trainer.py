"""The training loop on tiny offline models: it learns, it freezes what it should, it resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refinevla.train.checkpoint import latest_checkpoint  # noqa: E402
from refinevla.train.data import StepSamples  # noqa: E402
from refinevla.train.policy import POLICY_FILE, STATS_FILE, Policy, rationale_budget  # noqa: E402
from refinevla.train.preparation import make_loader, prepare  # noqa: E402
from refinevla.train.targets import loads_parts, rationale_text  # noqa: E402
from refinevla.train.trainer import train  # noqa: E402
from refinevla.train.validation import predict_action_ids, validation_metrics  # noqa: E402
from tests.train.conftest import OVERFIT, config  # noqa: E402


def test_trainable_layers_1_changes_only_the_top_layer_norm_and_head(published, paligemma_dir, tmp_path, cache_dir):
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(paligemma_dir).state_dict()
    cfg = config(published, paligemma_dir, tmp_path / "ckpt", cache_dir, max_steps=1, trainable_layers=1)
    result = train(cfg)
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    top = {k for k in before if k.startswith("model.language_model.layers.1.")}
    # Gemma ties the LM head to the input embeddings: training the head moves both names of one tensor
    expect = top | {"model.language_model.norm.weight", "lm_head.weight", "model.language_model.embed_tokens.weight"}
    assert changed == expect
    assert result.trainable_parameters == sum(before[k].numel() for k in expect - {"lm_head.weight"})


def test_overfitting_4_samples_reaches_full_action_token_accuracy_and_the_checkpoint_predicts_the_same(
    published, paligemma_dir, tmp_path, cache_dir
):
    cfg = config(published, paligemma_dir, tmp_path / "ckpt", cache_dir, train_vision=True, **OVERFIT)
    result = train(cfg)
    p = prepare(cfg)
    loader = make_loader(p, result.train_indices, cfg, epoch=0, train=False, batch_size=4)
    metrics = validation_metrics(result.model, p.adapter, loader, p.actions, 1.0, "cpu")
    assert metrics["action_token_accuracy"] == 1.0, metrics
    assert result.losses[-1] < result.losses[0] / 10

    # the folder is self-describing and reloads to the same predictions
    out = tmp_path / "ckpt"
    policy = json.loads((out / POLICY_FILE).read_text())
    assert policy["model_family"] == "paligemma" and policy["unnorm_key"] == "bridge_orig"
    assert policy["robot"] == "widowx" and policy["camera"] == "image_0" and policy["image_size"] == [32, 32]
    assert policy["serialisation"]["step_parts"] == ["subtask", "subtask_reason", "move", "move_reason"]
    tok = p.adapter.tokenizer(p.processor)
    rationales = [rationale_text(loads_parts(p.table.row(i)["parts"])) for i in range(len(p.table))]
    longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in rationales)
    assert policy["rationale_tokens"] == {"max": longest} and longest > 50
    assert rationale_budget(policy) > longest and rationale_budget(policy, 7) == 7  # the decoder's default budget
    assert json.loads((out / STATS_FILE).read_text()) == p.statistics
    reloaded = Policy(out)
    batch = next(iter(loader))
    ours = predict_action_ids(result.model.eval(), p.adapter, batch)
    theirs = predict_action_ids(reloaded.model, reloaded.adapter, batch)
    assert torch.equal(ours, theirs) and torch.equal(ours, batch["action_ids"])
    assert np.allclose(reloaded.actions.decode(theirs.numpy()), p.actions.decode(batch["action_ids"].numpy()))


def test_resume_continues_with_the_same_data_position_and_the_same_next_loss(
    published, paligemma_dir, tmp_path, cache_dir
):
    kw = {
        "max_steps": 4,
        "save_every": 2,
        "grad_accum": 2,
        "reasoning_dropout": 0.3,
        "num_workers": 1,
        "limit_samples": 12,
        "warmup_steps": 1,
    }
    full = train(config(published, paligemma_dir, tmp_path / "a", cache_dir, **kw))
    assert len(full.losses) == 4
    resumed_out = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", resumed_out / "checkpoints" / "step-000002")
    assert latest_checkpoint(resumed_out).name == "step-000002"
    again = train(config(published, paligemma_dir, resumed_out, cache_dir, resume=True, **kw))
    assert again.global_step == 4 and len(again.losses) == 2
    assert again.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    a = json.loads((tmp_path / "a" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    b = json.loads((resumed_out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert a == b  # same epoch, batch and samples seen
    sa = full.model.state_dict()
    sb = again.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_lora_trains_a_small_share_and_the_merged_checkpoint_reloads(published, paligemma_dir, tmp_path, cache_dir):
    cfg = config(
        published,
        paligemma_dir,
        tmp_path / "ckpt",
        cache_dir,
        max_steps=8,
        limit_samples=4,
        learning_rate=2e-2,
        lora_rank=4,
        save_every=4,
    )
    result = train(cfg)
    assert result.trainable_parameters < result.total_parameters / 10
    assert result.losses[-1] < result.losses[0]
    assert not any("lora" in k for k in result.model.state_dict())  # merged into plain weights
    p = prepare(cfg)
    batch = next(iter(make_loader(p, result.train_indices, cfg, epoch=0, train=False)))
    assert torch.equal(
        predict_action_ids(result.model.eval(), p.adapter, batch),
        predict_action_ids(Policy(cfg.output).model, p.adapter, batch),
    )
    # An intermediate checkpoint holds the adapter only; the policy rebuilds base + adapter, merged.
    mid = cfg.output / "checkpoints" / "step-000004"
    assert (mid / "adapter_config.json").is_file()
    mid_model = Policy(mid).model
    assert not any("lora" in k for k in mid_model.state_dict())
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(paligemma_dir).state_dict()
    moved = [k for k, v in mid_model.state_dict().items() if k in plain and not torch.equal(v, plain[k])]
    assert moved, "the adapter's update is merged into the rebuilt weights"
    final = result.model.state_dict()
    assert any(not torch.equal(mid_model.state_dict()[k], final[k]) for k in moved), "step 4, not step 8"


def test_action_only_baseline_generates_its_actions_from_the_checkpoint(published, idefics3_dir, tmp_path, cache_dir):
    cfg = config(
        published,
        idefics3_dir,
        tmp_path / "ckpt",
        cache_dir,
        max_steps=60,
        limit_samples=2,
        learning_rate=1e-2,
        reasoning_weight=0.0,
    )
    train(cfg)
    info = json.loads((tmp_path / "ckpt" / POLICY_FILE).read_text())
    assert info["reasoning"] is False and info["rationale_tokens"] is None
    policy = Policy(tmp_path / "ckpt")
    p = prepare(cfg)
    for index in p.train_indices[:2]:
        sample = StepSamples(p.table, [index], (32, 32))[0]
        rationale, action = policy.predict(sample["image"], p.table.row(index)["instruction"], max_new_tokens=16)
        assert rationale == ""
        assert np.allclose(action, p.actions.decode(p.actions.encode(sample["action"])), atol=1e-6)


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_gradient_checkpointing_trains_the_same_weights(
    published, paligemma_dir, tmp_path, cache_dir, trainable_layers
):
    kw = {"max_steps": 2, "limit_samples": 4, "trainable_layers": trainable_layers}
    plain = train(config(published, paligemma_dir, tmp_path / "plain", cache_dir, **kw))
    ckpt = train(config(published, paligemma_dir, tmp_path / "gc", cache_dir, gradient_checkpointing=True, **kw))
    assert ckpt.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-4)
    sa, sb = plain.model.state_dict(), ckpt.model.state_dict()
    moved = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa), moved[:3]
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(paligemma_dir).state_dict()
    assert any(not torch.equal(before[k], sb[k]) for k in sb), "recomputed activations still carry gradients"
