"""PaliGemma and PaliGemma 2 (SigLIP + Gemma; SpatialVLA's base).

The processor writes `<image>` x N, BOS, the prompt and a newline; the target follows. Training
passes `token_type_ids` (0 prefix, 1 suffix) as big_vision does, so the prefix — image and
prompt — attends bidirectionally and only the suffix is causal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import ModelAdapter


class PaliGemmaAdapter(ModelAdapter):
    family: ClassVar[str] = "paligemma"
    model_types: ClassVar[tuple[str, ...]] = ("paligemma",)
    language_model_path: ClassVar[str] = "language_model"

    def image_size(self, processor: Any) -> tuple[int, int]:
        size = processor.image_processor.size
        return int(size["height"]), int(size["width"])

    def wrap_prompt(self, prompt: str) -> str:
        return "<image>" + prompt

    def text_inputs(self, prompt_lens: Sequence[int], seq_len: int) -> dict[str, Any]:
        positions = torch.arange(seq_len)[None, :]
        return {"token_type_ids": (positions >= torch.tensor(list(prompt_lens))[:, None]).long()}

    def language_model(self, model: Any) -> Any:
        return model.model.language_model

    def vision_modules(self, model: Any) -> list[Any]:
        return [model.model.vision_tower, model.model.multi_modal_projector]
