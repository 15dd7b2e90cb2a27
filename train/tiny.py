"""Tiny offline models: random weights built from a config, with a tokenizer trained here.

What the tests and the benchmarks fine-tune and evaluate on a CPU, with nothing downloaded: a
PaliGemma (SigLIP + Gemma) and an Idefics3 (SigLIP + Llama) of hidden size 64, 2 layers, 32x32 images,
and a ByteLevel BPE tokenizer of 512 tokens trained with `tokenizers` on robot-ish text. Each is
saved with `save_pretrained`, so refine-train and refine-eval load it through the same
`from_pretrained` path a Hub model takes. Handy for a user too: a whole demos -> annotate -> train
-> eval loop runs in minutes on a laptop (`benchmarks/closed_loop.py --model tiny`). Needs the
`[train]` extra. Also a text-only Gemma chat model (`build_gemma_chat`) that vLLM's CPU build serves,
to run the vLLM teacher and `vllm serve` for real without a GPU.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

VOCAB = 512  # tokenizer size
IMAGE = 32  # square frame side, pixels


def tiny_tokenizer(specials: dict[str, str]) -> Any:
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
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", extra_special_tokens=specials
    )
    if fast.vocab_size != VOCAB:  # the corpus is built to fill it; a tokenizers change could leave it short
        raise RuntimeError(f"tiny tokenizer: {fast.vocab_size} tokens, expected {VOCAB}")
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
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # type: ignore[no-untyped-call]
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return path


def build_idefics3(path: Path) -> Path:
    """An Idefics3 with random weights (SigLIP + a 2-layer Llama), no image splitting."""
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


# A one-line chat template: "role: text" per message (a list of text parts joined), then "assistant: ".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{{ m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_gemma_chat(path: Path, hidden: int = 128, layers: int = 4, context: int = 16384) -> Path:
    """A text-only Gemma chat model with random weights, for serving with vLLM on a CPU (`tests/vllm_cpu/`).

    Random weights never close a JSON string: under a schema grammar such a model writes one string
    until `max_tokens`. So one direction of the embeddings (dimension 0) is made shared by every token
    and strongest in `"` (then `]`): the tied output layer then ranks the closing quote first wherever
    the grammar allows it, so every string holds one character and an answer fits in ~1,000 tokens.
    Everything else stays random: the numbers and plan lengths it writes are arbitrary, so its answers
    are schema-valid but most fail the semantic checks (a plan that does not tile the episode).
    """
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = tiny_tokenizer({})
    tok.chat_template = CHAT_TEMPLATE
    cfg = GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden // 4,
        max_position_embeddings=context,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight  # tied to the output layer
        embeddings[:, 0] += 1.0
        for token, extra in (('"', 2.0), ("]", 1.0)):
            embeddings[tok.convert_tokens_to_ids(token), 0] += extra
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
