"""Model families refine-train can fine-tune; `adapter_for` picks one from a model's config.

Adding a family: one file here with a `ModelAdapter` subclass, and one line in `ADAPTERS`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TrainError
from .base import ModelAdapter
from .idefics3 import Idefics3Adapter
from .openvla import OpenVLAAdapter
from .paligemma import PaliGemmaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (PaliGemmaAdapter, Idefics3Adapter, OpenVLAAdapter)

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "adapter_for_type", "model_type_of"]


def model_type_of(model: str) -> str:
    """`config.model_type` of a local folder or Hub id (config.json only; no weights are read)."""
    path = Path(model)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise TrainError(f"{model}: no config.json (not a transformers model folder)")
        import json

        try:
            return str(json.loads(cfg.read_text(encoding="utf-8"))["model_type"])
        except (json.JSONDecodeError, KeyError) as exc:
            raise TrainError(f"{cfg}: cannot read model_type ({exc})") from None
    try:
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(model, trust_remote_code=True).model_type)
    except OSError as exc:
        raise TrainError(f"--model {model}: not a local folder and not loadable from the Hub ({exc})") from None


def adapter_for_type(model_type: str, model: str = "the model") -> ModelAdapter:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    families = ", ".join(f"{c.family} ({'/'.join(c.model_types)})" for c in ADAPTERS)
    raise TrainError(f"{model}: model type {model_type!r} has no refine-train adapter; families: {families}")


def adapter_for(model: str) -> ModelAdapter:
    """The adapter for a model folder or Hub id, or one line naming the families there are."""
    return adapter_for_type(model_type_of(model), model)
