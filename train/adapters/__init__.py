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

__all__ = ["ADAPTERS", "TRUST_FLAG", "ModelAdapter", "adapter_for", "adapter_for_type", "model_type_of"]

TRUST_FLAG = "--trust-remote-code"  # the flag of every command that loads a model


def model_type_of(model: str) -> str:
    """`config.model_type` of a local folder or Hub id: config.json read as JSON (no weights are read,
    and no code runs: a model id the user merely typed must not execute anything)."""
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
    from transformers.utils.hub import cached_file

    try:
        resolved = cached_file(model, "config.json")
    except OSError as exc:
        raise TrainError(f"--model {model}: not a local folder and not loadable from the Hub ({exc})") from None
    if resolved is None:
        raise TrainError(f"--model {model}: no config.json on the Hub (not a transformers model)")
    return model_type_of(str(Path(resolved).parent))


def adapter_for_type(model_type: str, model: str = "the model", trust_remote_code: bool = False) -> ModelAdapter:
    """The family's adapter; a family whose checkpoints run their own Python code (OpenVLA's remote
    code, copied into every checkpoint trained from it) only with `trust_remote_code`, the user's flag."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            if cls.trust_remote_code and not trust_remote_code:
                raise TrainError(
                    f"{model}: a {cls.family} model runs its own Python code (the remote code its auto_map names); "
                    f"pass {TRUST_FLAG} if you trust where it comes from"
                )
            return cls()
    families = ", ".join(f"{c.family} ({'/'.join(c.model_types)})" for c in ADAPTERS)
    raise TrainError(f"{model}: model type {model_type!r} has no refine-train adapter; families: {families}")


def adapter_for(model: str, trust_remote_code: bool = False) -> ModelAdapter:
    """The adapter for a model folder or Hub id, or one line naming the families there are."""
    return adapter_for_type(model_type_of(model), model, trust_remote_code)
