"""PaliGemma and Idefics3 through one adapter interface: inputs, the loss mask, module groups."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refinevla.train.actions import ActionTokenizer, dataset_statistics  # noqa: E402
from refinevla.train.adapters import adapter_for  # noqa: E402
from refinevla.train.data import Collator, StepSamples  # noqa: E402
from refinevla.train.errors import TrainError  # noqa: E402
from refinevla.train.loss import joint_loss  # noqa: E402
from refinevla.train.table import build_table, open_published  # noqa: E402
from refinevla.train.targets import IGNORE_INDEX, PROMPT, loads_parts, target_ids  # noqa: E402


@pytest.mark.parametrize("family", ["paligemma", "idefics3"])
def test_batch_masks_exactly_the_target_and_the_model_trains_on_it(family, request, published, cache_dir):
    model_dir = request.getfixturevalue(f"{family}_dir")
    adapter = adapter_for(str(model_dir))
    assert adapter.family == family
    processor = adapter.load_processor(str(model_dir))
    model = adapter.load_model(str(model_dir), torch.float32)
    table = build_table(open_published(str(published)), cache_dir=cache_dir)
    stats = dataset_statistics(table.episodes(), table.meta["transform"], "bridge_orig")["bridge_orig"]
    actions = ActionTokenizer.from_statistics(stats, adapter.tokenizer(processor).vocab_size)
    samples = StepSamples(table, [0, 7, 20], adapter.image_size(processor))
    assert samples[0]["image"].shape == (32, 32, 3)
    batch = Collator(adapter, processor, actions)([samples[i] for i in range(3)])
    tok = adapter.tokenizer(processor)
    for i in range(3):
        row = table.row(samples.indices[i])
        t_ids, _ = target_ids(tok, loads_parts(row["parts"]), actions.encode(np.asarray(row["action"])).tolist())
        labels = batch["labels"][i]
        kept = labels != IGNORE_INDEX
        # the labelled positions are one contiguous run: exactly the target, right after the prompt
        pos = torch.nonzero(kept).flatten()
        assert labels[kept].tolist() == t_ids and pos.tolist() == list(range(pos[0], pos[0] + len(t_ids)))
        assert (batch["kinds"][i, : pos[0]] == PROMPT).all()
        assert batch["model_inputs"]["input_ids"][i, pos].tolist() == t_ids
        assert batch["model_inputs"]["input_ids"][i, batch["action_positions"][i]].tolist() == (
            batch["action_ids"][i].tolist()
        )
        # the prompt holds the image tokens
        image_id = model.config.image_token_id
        assert (batch["model_inputs"]["input_ids"][i, : pos[0]] == image_id).sum() > 0
    if family == "paligemma":  # prefix bidirectional, suffix causal
        tt = batch["model_inputs"]["token_type_ids"][0]
        first = int(torch.nonzero(batch["labels"][0] != IGNORE_INDEX)[0])
        assert (tt[:first] == 0).all() and (tt[first:] == 1).all()
    out = model(**batch["model_inputs"])
    loss = joint_loss(out.logits, batch["labels"], batch["kinds"], 1.0)
    loss.loss.backward()
    assert torch.isfinite(loss.loss) and loss.n_action == 3 * (
        len(tok("ACTION:", add_special_tokens=False)["input_ids"]) + 8
    )
    assert len(adapter.decoder_layers(model)) == 2
    assert adapter.final_norm(model).weight.grad is not None
    assert all(p.grad is not None for p in adapter.lm_head(model).parameters())


def test_a_family_without_an_adapter_names_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(TrainError) as exc:
        adapter_for(str(tmp_path))
    msg = str(exc.value)
    assert "'llava' has no refine-train adapter" in msg and "paligemma" in msg and "idefics3" in msg
    assert "\n" not in msg


def test_a_small_training_set_decodes_each_frame_once_per_run_and_a_large_one_streams(
    published, cache_dir, paligemma_dir, monkeypatch
):
    from types import SimpleNamespace

    from refinevla.train import data
    from refinevla.train.preparation import Prepared, make_loader

    table = build_table(open_published(str(published)), cache_dir=cache_dir)
    decoded: list[int] = []
    real = data.decode_resize
    monkeypatch.setattr(data, "decode_resize", lambda frame, size: decoded.append(1) or real(frame, size))
    adapter = adapter_for(str(paligemma_dir))
    processor = adapter.load_processor(str(paligemma_dir))
    stats = dataset_statistics(table.episodes(), table.meta["transform"], "bridge_orig")["bridge_orig"]
    actions = ActionTokenizer.from_statistics(stats, adapter.tokenizer(processor).vocab_size)
    indices = [0, 7, 20]
    p = Prepared(table, adapter, processor, indices, [], {"bridge_orig": stats}, "bridge_orig", actions)
    cfg = SimpleNamespace(reasoning=True, reasoning_dropout=0.0, seed=0, num_workers=0, batch_size=3)
    epochs = [list(make_loader(p, indices, cfg, epoch=e, train=True)) for e in range(2)]  # a new loader each
    assert len(decoded) == 3  # each frame once in the run, not once per epoch
    assert torch.equal(epochs[0][0]["model_inputs"]["pixel_values"], epochs[1][0]["model_inputs"]["pixel_values"])
    assert p.frames is not None and p.frames.frames is not None
    first = [p.frames.frames[i] for i in indices]
    for image, index in zip(first, indices, strict=True):  # exactly what decoding gives
        assert np.array_equal(image, real(table.row(index)["frame"], (32, 32)))
    with pytest.raises(ValueError, match="read-only"):  # a transform writing into it fails, never the next epoch
        first[0][0, 0, 0] = 1

    monkeypatch.setattr(data, "FRAME_CACHE_BYTES", 2 * 32 * 32 * 3)  # two frames fit, not three: every item decodes
    streaming = StepSamples(table, indices, (32, 32))
    decoded.clear()
    for _ in range(2):
        assert [streaming[k]["image"].shape for k in range(3)] == [(32, 32, 3)] * 3
    assert len(decoded) == 6
