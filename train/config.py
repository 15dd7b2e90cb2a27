"""`TrainConfig`: every `refine-train` flag, one field each; its help text is the documentation.

The CLI builds one from its flags (and `--config FILE.yaml`, the flags winning); tests and
scripts build one directly and call `refinevla.train.trainer.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..annotate.cli_options import option
from .errors import TrainError
from .policy import TRUST_REMOTE_CODE


@dataclass
class TrainConfig:
    dataset: str = option(help="refine-data output folder, or a Hub dataset repo id ORG/NAME.")
    model: str = option(
        help="Hub id or local folder of the model (paligemma, idefics3/smolvlm, openvla), or a refine-train checkpoint."
    )
    output: Path = option(help="Checkpoint folder to write.")  # the final policy, checkpoints/step-N, logs/
    source: str | None = option(None, "Where the frames come from; default: the manifest's source.")
    data_dir: str | None = option(None, "TFDS data dir for bridge/fractal presets.")  # as refine-data's --data-dir
    revision: str | None = option(None, "--dataset ORG/NAME: Hub branch, tag or commit (default main).")
    split: str | None = option(None, "Source split; default: the manifest's.")
    camera: str | None = option(None, "Camera feature, e.g. image_1; default: the one annotate read, else primary.")
    transform: str = option("auto", "bridge_orig | fractal | none | auto.")  # as refine-data stats
    stats: Path | None = option(None, "dataset_statistics.json to use; default: the training split's.")
    unnorm_key: str | None = option(None, "Statistics key; default: dataset name.")
    cache_dir: Path | None = option(None, "Where training tables live; default $REFINEVLA_CACHE/train.")
    max_steps: int | None = option(None, "Optimizer steps (overrides --epochs).")
    epochs: int = option(1, "Passes over the training split.")  # when --max-steps is not given
    batch_size: int = option(8, "Samples per micro-batch per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(2e-5, "Peak learning rate.")  # OpenVLA: 2e-5 full fine-tuning, 5e-4 LoRA
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(0, "Linear warm-up before cosine decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping (0: off).")
    save_every: int = option(0, "Checkpoint every N steps (0: at the end).")
    eval_every: int = option(0, "Validate every N steps (0: at the end).")
    log_every: int = option(1, "Log every N steps.")  # loss / lr / samples/s
    val_fraction: float = option(0.05, "Share of episodes held out for validation.")  # split by episode
    seed: int = option(0, "Seed of the split, data order, dropout and init.")
    reasoning_weight: float = option(1.0, "λ in CE(action) + λ·CE(rationale); 0: action-only baseline.")
    reasoning_dropout: float = option(0.0, "Drop each rationale part with this probability.")  # ECoT-Lite
    trainable_layers: int | None = option(None, "Train the top K decoder layers + norm + LM head only.")
    train_vision: bool = option(False, "Also train the vision tower.")  # and the projector
    trust_remote_code: bool = option(False, TRUST_REMOTE_CODE)  # OpenVLA needs it
    lora_rank: int | None = option(None, "LoRA rank instead of full tuning.")  # peft, on the decoder's linear layers
    bf16: bool | None = option(
        None,
        "bf16 mixed precision; default: the accelerate config's mixed_precision under accelerate "
        "launch, else bf16 where the GPU has it.",
        spelling="--bf16/--no-bf16",
    )
    gradient_checkpointing: bool = option(False, "Recompute activations (less memory).")
    resume: bool = option(False, "Continue from the latest checkpoint in --output.")
    overwrite: bool = option(False, "Replace the policy, checkpoints and logs an earlier run left in --output.")
    push_to_hub: str | None = option(None, "Upload the final policy to this Hub model repo.")
    num_workers: int = option(2, "DataLoader workers (decode, resize).")  # and tokenise
    limit_samples: int | None = option(None, "Train on the first N samples only (debugging).")
    trace_samples: bool = option(False, "Each rank logs its micro-batches' sample indices to OUTPUT/trace/.")

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs}
        for name, value in positive.items():
            if value < 1:
                raise TrainError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"--max-steps {self.max_steps}: must be at least 1")
        if not 0.0 <= self.reasoning_dropout < 1.0:
            raise TrainError(f"--reasoning-dropout {self.reasoning_dropout}: must be in [0, 1)")
        if self.reasoning_weight < 0:
            raise TrainError(f"--reasoning-weight {self.reasoning_weight}: must be >= 0")
        if self.trainable_layers is not None and self.lora_rank is not None:
            raise TrainError("--trainable-layers and --lora-rank are alternatives; give one")
        if self.trainable_layers is not None and self.trainable_layers < 0:
            raise TrainError(f"--trainable-layers {self.trainable_layers}: must be >= 0")

    @property
    def reasoning(self) -> bool:
        """Whether the target carries the rationale (λ > 0)."""
        return self.reasoning_weight > 0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}


def load_yaml_config(path: Path) -> dict[str, Any]:
    """Flags from a YAML file: keys as the flags are spelled (`max-steps`) or as fields (`max_steps`)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a mapping of flag: value")
    out = {}
    known = set(TrainConfig.field_names())
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise TrainError(f"{path}: unknown key {key!r}")
        out[name] = value
    return out
