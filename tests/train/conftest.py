"""Tiny offline models and a real published dataset for the refine-train tests.

Models are built from configs with random weights (SigLIP + Gemma for PaliGemma, SigLIP + Llama
for Idefics3; hidden 64, 2 layers, 32x32 images) with a ByteLevel BPE tokenizer of 512 tokens
trained here with `tokenizers`, saved with `save_pretrained` and loaded back by refine-train
through the same `from_pretrained` path a Hub model takes. The dataset is written by the
project's own writers: a Bridge-layout RLDS source, annotated by `refine-data annotate` with the
rule-based teacher. Nothing is downloaded.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from refinevla.train.config import TrainConfig
from tests.conftest import tiny_episode

VOCAB = 512
IMAGE = 32
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


def tiny_tokenizer(specials: dict[str, str]):  # type: ignore[no-untyped-def]
    """A 512-token ByteLevel BPE trained on robot-ish text (enough merges to fill the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["<pad>", "<eos>", "<bos>", *specials.values()]
    rng = random.Random(0)
    words = "what action should the robot take to put spoon on towel move forward left right up down close open "
    words += "gripper subtask reason observation situation analysis spatial reasoning task plan steps"
    corpus = [words] * 50 + [
        " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))) for _ in range(20))
        for _ in range(2000)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", extra_special_tokens=specials
    )
    assert fast.vocab_size == VOCAB
    return fast


def tiny_llama(vocab_size: int, **ids: int) -> dict[str, object]:
    """A 2-layer, hidden-64 Llama text config (Idefics3's and OpenVLA's decoder)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        **ids,
    }


def build_paligemma(path: Path, image: int = IMAGE, hidden: int = 64, layers: int = 2, patch: int = 8) -> Path:
    """A PaliGemma with random weights: `layers` SigLIP and Gemma layers of width `hidden`, `image`-pixel
    square frames cut into `patch`-pixel patches."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tiny_tokenizer({"image_token": "<image>"})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = PaliGemmaConfig(
        text_config={
            "model_type": "gemma",
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": hidden // 2,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": image,
            "patch_size": patch,
            "projection_dim": hidden,
        },
        image_token_index=image_id,
        projection_dim=hidden,
        vocab_size=VOCAB,
    )
    import torch

    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg)
    ip = SiglipImageProcessorPil(size={"height": image, "width": image}, image_seq_length=(image // patch) ** 2)
    PaliGemmaProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    model.save_pretrained(path)
    return path


def build_idefics3(path: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = tiny_tokenizer(
        {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        }
    )
    cfg = Idefics3Config(
        text_config=tiny_llama(VOCAB, pad_token_id=tok.pad_token_id),
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE,
            "patch_size": 8,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    import torch

    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE}, max_image_size={"longest_edge": IMAGE}
    )
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4).save_pretrained(path)
    model.save_pretrained(path)
    return path


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
