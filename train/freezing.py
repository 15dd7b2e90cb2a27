"""Which parameters train: ReFineVLA's selective transfer (the top K decoder layers, the final norm and
the LM head), LoRA instead of full tuning, and the vision tower on request.

Its own module so the rule is read in one place, apart from the loop that steps the optimizer.
"""

from __future__ import annotations

from typing import Any

from .adapters import ModelAdapter
from .config import TrainConfig


def configure_trainable(model: Any, adapter: ModelAdapter, cfg: TrainConfig) -> Any:
    """Freeze per the flags (ReFineVLA's selective transfer, or LoRA); returns the model to train."""
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=2 * cfg.lora_rank,
            lora_dropout=0.0,
            target_modules=adapter.lora_target_modules(),
        )
        model = get_peft_model(model, lora)
        if cfg.train_vision:
            for module in adapter.vision_modules(model.get_base_model()):
                module.requires_grad_(True)
        return model
    if cfg.trainable_layers is not None:
        model.requires_grad_(False)
        layers = adapter.decoder_layers(model)
        k = min(cfg.trainable_layers, len(layers))
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        adapter.final_norm(model).requires_grad_(True)
        adapter.lm_head(model).requires_grad_(True)
    else:
        model.requires_grad_(True)
    for module in adapter.vision_modules(model):
        module.requires_grad_(cfg.train_vision)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
