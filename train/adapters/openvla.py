"""OpenVLA (`openvla/openvla-7b`: Prismatic, DINOv2 + SigLIP fused, Llama 2; remote code).

Through the same interface, but not run here: its weights (15 GB) and remote code come from the
Hub, which tests never touch. What it needs: `trust_remote_code=True`, the class its `auto_map`
names for `AutoModelForVision2Seq`, the prompt `In: {prompt}\\nOut:` (OpenVLA's), the processor's
224x224 images, and the Llama decoder at `language_model.model.layers`. OpenVLA's own action
tokens are the same scheme as refine-train's (`vocab_size - digitize`), so its `norm_stats` and ours line up.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import TrainError
from .base import ModelAdapter


class OpenVLAAdapter(ModelAdapter):
    family: ClassVar[str] = "openvla"
    model_types: ClassVar[tuple[str, ...]] = ("openvla",)
    trust_remote_code: ClassVar[bool] = True
    language_model_path: ClassVar[str] = "language_model"

    def load_model(self, path: str, dtype: Any) -> Any:
        """OpenVLA registers its class under `AutoModelForVision2Seq`, which transformers 5 removed:
        resolve the class from the config's `auto_map` instead of through the Auto class."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        ref = (getattr(config, "auto_map", None) or {}).get("AutoModelForVision2Seq")
        if ref is None:
            raise TrainError(f"{path}: config.json has no auto_map.AutoModelForVision2Seq (not an OpenVLA checkpoint?)")
        cls: Any = get_class_from_dynamic_module(ref, path)
        return cls.from_pretrained(path, config=config, torch_dtype=dtype, trust_remote_code=True)

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
