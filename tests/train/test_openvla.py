"""OpenVLA through refine-train and refine-eval, on a tiny stand-in of its remote code.

`openvla_standin/` keeps the published code's contract and the habits that break under
transformers 5 (see its docstring), so these tests show what the adapter's compatibility layer
fixes, and that training and generation are right with it: the logits carry the image patches
(dropped before the loss), generation sees the image and reuses its cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refinevla.train.adapters import adapter_for  # noqa: E402
from refinevla.train.errors import TrainError  # noqa: E402
from refinevla.train.policy import POLICY_FILE, Policy  # noqa: E402
from refinevla.train.preparation import make_loader, prepare  # noqa: E402
from refinevla.train.trainer import train  # noqa: E402
from refinevla.train.validation import predict_action_ids, validation_metrics  # noqa: E402
from tests.train.conftest import OVERFIT, config  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_published_code_does_not_load_on_transformers_5_without_the_adapter(openvla_dir: Path) -> None:
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(str(openvla_dir), trust_remote_code=True)
    raw = get_class_from_dynamic_module(config.auto_map["AutoModelForVision2Seq"], str(openvla_dir))
    with pytest.raises((TypeError, AttributeError)):  # tie_weights(recompute_mapping=...), the _supports_sdpa property
        raw.from_pretrained(str(openvla_dir), config=config)
    model = adapter_for(str(openvla_dir), trust_remote_code=True).load_model(str(openvla_dir), torch.float32)
    assert type(model).__name__ == "OpenVLAForActionPrediction" and hasattr(model, "generate")


def test_logits_without_the_patch_positions_line_up_with_the_text(openvla_dir: Path) -> None:
    adapter = adapter_for(str(openvla_dir), trust_remote_code=True)
    model = adapter.load_model(str(openvla_dir), torch.float32).eval()
    processor = adapter.load_processor(str(openvla_dir))
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ids, extra = adapter.encode_prompts(processor, ["What action should the robot take to go?"], [image])
    assert ids[0][0] == adapter.tokenizer(processor).bos_token_id  # the patches go in after <BOS>
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(1, len(ids[0]), dtype=torch.long), **extra}
    with torch.no_grad():
        full = model(**inputs).logits
        text = adapter.logits(model, inputs)
    patches = (32 // 8) ** 2
    assert full.shape[1] == len(ids[0]) + patches and text.shape[1] == len(ids[0])
    assert torch.equal(text[:, 0], full[:, 0]) and torch.equal(text[:, 1:], full[:, 1 + patches :])


def test_openvla_learns_its_actions_and_its_checkpoint_generates_from_the_image(
    published: Path, openvla_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ckpt"
    cfg = config(published, openvla_dir, out, tmp_path / "cache", train_vision=True, trust_remote_code=True, **OVERFIT)
    result = train(cfg)
    p = prepare(cfg)
    loader = make_loader(p, result.train_indices, cfg, epoch=0, train=False, batch_size=4)
    metrics = validation_metrics(result.model, p.adapter, loader, p.actions, 1.0, "cpu")
    assert metrics["action_token_accuracy"] == 1.0, metrics
    assert result.losses[-1] < result.losses[0] / 10

    # a self-contained checkpoint: the remote code travels with it, and it reloads to the same predictions
    assert {f.name for f in out.glob("*_prismatic.py")} == {
        "configuration_prismatic.py",
        "modeling_prismatic.py",
        "processing_prismatic.py",
    }
    assert json.loads((out / POLICY_FILE).read_text())["model_family"] == "openvla"
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForVision2Seq"].startswith(
        "modeling_prismatic."
    )
    with pytest.raises(TrainError, match="pass --trust-remote-code if you trust"):
        Policy(out)  # refine-eval's loading: the checkpoint carries OpenVLA's code
    policy = Policy(out, trust_remote_code=True)
    batch = next(iter(loader))
    ours = predict_action_ids(result.model.eval(), p.adapter, batch)
    assert torch.equal(ours, predict_action_ids(policy.model, policy.adapter, batch))
    assert torch.equal(ours, batch["action_ids"])

    # refine-eval's decoding: one row at a time, the image seen once per row, the cache reused
    from refinevla.train.policy import generate

    seen: list[tuple[int, ...]] = []
    policy.model.vision_backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    got = generate(policy, images, ["put the spoon on the towel"] * 2, max_rationale_tokens=12)
    assert seen == [(1, 6, 32, 32), (1, 6, 32, 32)]
    assert all(len(g.action_ids) == 7 for g in got)

    # greedy generation with the cache equals recomputing the whole sequence each token
    tok = policy.adapter.tokenizer(policy.processor)
    ids, extra = policy.adapter.encode_prompts(
        policy.processor, ["What action should the robot take to go?"], images[:1]
    )
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(1, len(ids[0]), dtype=torch.long), **extra}
    with torch.no_grad():
        cached = policy.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        seq = torch.tensor(ids)
        for _ in range(8):
            step = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
            seq = torch.cat([seq, policy.adapter.logits(policy.model, step)[:, -1:].argmax(-1)], dim=1)
            if int(seq[0, -1]) == tok.eos_token_id:  # generate stops there too
                break
    assert cached.tolist() == seq.tolist() and cached.shape[1] > len(ids[0]) + 1


def test_without_trust_remote_code_refine_train_refuses_openvla_in_one_line(
    published: Path, openvla_dir: Path, tmp_path
):
    from typer.testing import CliRunner

    from refinevla.train.cli import app

    args = ["--dataset", str(published), "--model", str(openvla_dir), "--output", str(tmp_path / "o")]
    r = CliRunner().invoke(app, [*args, "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "runs its own Python code" in lines[0] and "--trust-remote-code" in lines[0], r.output
    assert not (tmp_path / "o" / POLICY_FILE).exists()
