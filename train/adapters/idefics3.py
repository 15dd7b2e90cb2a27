"""Idefics3 and SmolVLM (SigLIP + Llama with a pixel-shuffle connector), native in transformers.

The prompt is one chat turn, `User:<image>{prompt}<end_of_utterance>\\nAssistant:`, written out
rather than through a chat template so a locally built tokenizer without one works. Images are
given one per sample, unsplit, at the processor's `max_image_size`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import ModelAdapter


class Idefics3Adapter(ModelAdapter):
    family: ClassVar[str] = "idefics3"
    model_types: ClassVar[tuple[str, ...]] = ("idefics3", "smolvlm")
    language_model_path: ClassVar[str] = "text_model"

    def image_size(self, processor: Any) -> tuple[int, int]:
        ip = processor.image_processor
        side = int((getattr(ip, "max_image_size", None) or ip.size)["longest_edge"])
        return side, side

    def wrap_prompt(self, prompt: str) -> str:
        return f"User:<image>{prompt}<end_of_utterance>\nAssistant:"

    def processor_images(self, images: list[Any]) -> Any:
        return [[img] for img in images]

    def language_model(self, model: Any) -> Any:
        return model.model.text_model

    def vision_modules(self, model: Any) -> list[Any]:
        return [model.model.vision_model, model.model.connector]
