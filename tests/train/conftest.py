"""Tiny offline models and a real published dataset for the refine-train tests.

Models are built from configs with random weights (SigLIP + Gemma for PaliGemma, SigLIP + Llama
for Idefics3; hidden 64, 2 layers, 32x32 images) with a ByteLevel BPE tokenizer of 512 tokens
trained here with `tokenizers`, saved with `save_pretrained` and loaded back by refine-train
through the same `from_pretrained` path a Hub model takes. The dataset is written by the
project's own writers: a Bridge-layout RLDS source, annotated by `refine-data annotate` with the
rule-based teacher. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from refinevla.train.config import TrainConfig
from refinevla.train.tiny import IMAGE, VOCAB, build_idefics3, build_paligemma, tiny_llama, tiny_tokenizer
from tests.conftest import tiny_episode

EPISODES = 6
STEPS = (10, 11, 12, 10, 11, 12)


# 4 samples, 120 steps: enough to drive the action-token accuracy on them to 100%
OVERFIT = {"max_steps": 120, "batch_size": 4, "limit_samples": 4, "learning_rate": 5e-3, "warmup_steps": 5}


def config(published: Path, model: Path, output: Path, cache_dir: Path, **kw: object) -> TrainConfig:
    """A TrainConfig for the tiny models: batch 2, no workers, no validation unless `kw` says otherwise."""
    base = {
        "dataset": str(published),
        "model": str(model),
        "output": output,
        "cache_dir": cache_dir,
        "batch_size": 2,
        "num_workers": 0,
        "val_fraction": 0.0,
        "learning_rate": 1e-3,
    }
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def paligemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PaliGemma folder (model + processor), as a user's own local model would be."""
    return build_paligemma(tmp_path_factory.mktemp("paligemma"))


@pytest.fixture(scope="session")
def idefics3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="session")
def rlds_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Bridge-layout RLDS source: 6 episodes of 10-12 steps, one 32x32 camera."""
    root = tmp_path_factory.mktemp("src")
    eps = [tiny_episode(i, STEPS[i], size=IMAGE) for i in range(EPISODES)]
    d = write_rlds(root, specs.bridge_features(cameras=1, image_size=(IMAGE, IMAGE)), eps, name="bridge_orig")
    return f"rlds:{d}"


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory, rlds_uri: str) -> Path:
    """`OUT/` written by `refine-data annotate` with the rule-based teacher (read-only: copy to modify)."""
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

    out = tmp_path_factory.mktemp("published") / "out"
    assert run_annotate(AnnotateArgs(source=rlds_uri, out=out, progress="none", license="apache-2.0")) == 0
    return out


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def build_openvla(path: Path) -> Path:
    """A tiny checkpoint in openvla/openvla-7b's layout: remote code (`openvla_standin/`, which keeps the
    published code's contract), `auto_map` entries for AutoConfig / AutoModelForVision2Seq / AutoProcessor,
    a <BOS>-prefixing tokenizer and a Llama text config padded by `pad_to_multiple_of`, as OpenVLA's is."""
    import json
    import shutil

    import torch
    from tokenizers import processors

    from refinevla.train.adapters.openvla import transformers5_compat
    from tests.train.openvla_standin import configuration_prismatic, modeling_prismatic, processing_prismatic

    path.mkdir(parents=True, exist_ok=True)
    for f in (Path(__file__).parent / "openvla_standin").glob("*_prismatic.py"):
        shutil.copy(f, path / f.name)
    tok = tiny_tokenizer({})
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    cfg = configuration_prismatic.OpenVLAConfig(
        use_fused_vision_backbone=True,
        image_sizes=[IMAGE, IMAGE],
        patch_size=8,
        vision_dim=16,
        pad_to_multiple_of=64,
        text_config=tiny_llama(
            VOCAB + 64, pad_token_id=tok.pad_token_id, bos_token_id=bos, eos_token_id=tok.eos_token_id
        ),
        pad_token_id=tok.pad_token_id,
        norm_stats={},
    )
    torch.manual_seed(0)
    transformers5_compat(modeling_prismatic.OpenVLAForActionPrediction)(cfg).save_pretrained(path)
    ip = processing_prismatic.PrismaticImageProcessor(input_sizes=[(3, IMAGE, IMAGE), (3, IMAGE, IMAGE)])
    ip.save_pretrained(path)
    tok.save_pretrained(path)
    auto_map = {
        "config.json": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "preprocessor_config.json": {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        },
        "tokenizer_config.json": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
    }
    for name, entries in auto_map.items():
        data = json.loads((path / name).read_text())
        data["auto_map"] = entries
        data.pop("_attn_implementation_internal", None)
        (path / name).write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture(scope="session")
def openvla_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_openvla(tmp_path_factory.mktemp("openvla"))
