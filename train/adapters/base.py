"""The one interface every model family implements for refine-train.

A family differs in four things only: how the prompt wraps the image (PaliGemma prefixes image
tokens and BOS, Idefics3 speaks a `User:<image>...<end_of_utterance>\\nAssistant:` turn), how big
the images are, any extra per-token inputs (PaliGemma's `token_type_ids`, which make its prefix
attend bidirectionally), and which modules are the decoder layers, final norm, LM head and vision
tower (for `--trainable-layers` and `--train-vision`). Everything else — targets, the loss, the
loop, checkpoints — is shared, so adding a family is one file in this folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelAdapter(ABC):
    """Family-specific glue between refine-train and a transformers image-text-to-text model."""

    family: ClassVar[str]  # name used in refinevla_policy.json and error messages
    model_types: ClassVar[tuple[str, ...]]  # `config.model_type` values this adapter serves
    trust_remote_code: ClassVar[bool] = False  # remote-code models (OpenVLA) need it
    batched_generation: ClassVar[bool] = True  # False: `generate` takes one row at a time (OpenVLA)

    # ---- loading
    def load_model(self, path: str, dtype: Any) -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=self.trust_remote_code)

    def load_processor(self, path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=self.trust_remote_code)  # type: ignore[no-untyped-call]

    def tokenizer(self, processor: Any) -> Any:
        return processor.tokenizer

    # ---- inputs
    @abstractmethod
    def image_size(self, processor: Any) -> tuple[int, int]:
        """(height, width) the frames are resized to in the data workers."""

    @abstractmethod
    def wrap_prompt(self, prompt: str) -> str:
        """The prompt as the processor expects it, image placeholder included."""

    def encode_prompts(
        self, processor: Any, prompts: Sequence[str], images: Sequence[np.ndarray]
    ) -> tuple[list[list[int]], dict[str, Any]]:
        """Per-sample prompt token ids (image tokens expanded) and the batched image tensors."""
        from PIL import Image

        pil = [Image.fromarray(img) for img in images]
        enc = processor(
            text=[self.wrap_prompt(p) for p in prompts],
            images=self.processor_images(pil),
            return_tensors="pt",
            padding="longest",
        )
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        return ids, extra

    def processor_images(self, images: list[Any]) -> Any:
        return images

    def text_logits(self, logits: Any, n_text: int) -> Any:
        """Logits aligned with the `n_text` input ids. A family whose forward splices image features
        into the sequence (OpenVLA) returns longer logits and drops those positions here."""
        return logits

    def logits(self, model: Any, inputs: dict[str, Any]) -> Any:
        """The model's logits for `inputs`, one per input id."""
        return self.text_logits(model(**inputs).logits, inputs["input_ids"].shape[1])

    def text_inputs(self, prompt_lens: Sequence[int], seq_len: int) -> dict[str, Any]:
        """Extra per-token inputs beside input_ids / attention_mask (none by default)."""
        return {}

    # ---- module groups
    @abstractmethod
    def language_model(self, model: Any) -> Any:
        """The decoder stack (has `.layers` and `.norm`)."""

    @abstractmethod
    def vision_modules(self, model: Any) -> list[Any]:
        """Vision encoder and its projector (frozen unless --train-vision)."""

    def decoder_layers(self, model: Any) -> list[Any]:
        return list(self.language_model(model).layers)

    def final_norm(self, model: Any) -> Any:
        return self.language_model(model).norm

    def lm_head(self, model: Any) -> Any:
        return model.get_output_embeddings()

    def lora_target_modules(self) -> str:
        """peft `target_modules` regex: the decoder's linear layers only (not the vision tower)."""
        return rf".*{self.language_model_path}.*\.({'|'.join(LORA_TARGETS)})"

    language_model_path: ClassVar[str] = "language_model"
