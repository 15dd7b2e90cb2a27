"""OpenVLA (`openvla/openvla-7b`: Prismatic, DINOv2 + SigLIP fused, Llama 2; remote code).

Through the same interface, but not run here: its weights (15 GB) and remote code come from the
Hub, which tests never touch. What it needs: `trust_remote_code=True`, `AutoModelForVision2Seq`,
the prompt `In: {prompt}\\nOut:` (OpenVLA's), the processor's 224x224 images, and the Llama
decoder at `language_model.model.layers`. OpenVLA's own action tokens are the same scheme as
refine-train's (`vocab_size - digitize`), so its `norm_stats` and ours line up.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import ModelAdapter


class OpenVLAAdapter(ModelAdapter):
    family: ClassVar[str] = "openvla"
    model_types: ClassVar[tuple[str, ...]] = ("openvla",)
    trust_remote_code: ClassVar[bool] = True
    language_model_path: ClassVar[str] = "language_model"

    def load_model(self, path: str, dtype: Any) -> Any:
        from transformers import AutoModelForVision2Seq

        return AutoModelForVision2Seq.from_pretrained(path, torch_dtype=dtype, trust_remote_code=True)

    def image_size(self, processor: Any) -> tuple[int, int]:
        size = processor.image_processor.input_sizes[0]  # (3, H, W)
        return int(size[1]), int(size[2])

    def wrap_prompt(self, prompt: str) -> str:
        return f"In: {prompt}\nOut:"

    def language_model(self, model: Any) -> Any:
        return model.language_model.model

    def lm_head(self, model: Any) -> Any:
        return model.language_model.lm_head

    def vision_modules(self, model: Any) -> list[Any]:
        return [model.vision_backbone, model.projector]
