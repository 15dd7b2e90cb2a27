"""`TrainConfig`: every `refine-train` flag, one field each; the comment is the documentation.

The CLI builds one from its flags (and `--config FILE.yaml`, the flags winning); tests and
scripts build one directly and call `refinevla.train.trainer.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import TrainError


@dataclass
class TrainConfig:
    dataset: str  # refine-data output folder, or a Hub dataset repo id ORG/NAME
    model: str  # Hub id or local folder of the model to fine-tune (a refine-train checkpoint works too)
    output: Path  # checkpoint folder: the final policy, checkpoints/step-N, logs/
    source: str | None = None  # frames come from here; default: the source in the dataset's manifest
    data_dir: str | None = None  # as refine-data's --data-dir (TFDS data dir for presets)
    revision: str | None = None  # --dataset ORG/NAME: the Hub branch, tag or commit to train on (default main)
    split: str | None = None  # source split; default: the manifest's
    camera: str | None = None  # camera feature (e.g. image_1); default: the source's primary camera
    transform: str = "auto"  # bridge_orig | fractal | none | auto (as refine-data stats)
    stats: Path | None = None  # dataset_statistics.json to normalise with; default: computed on the training split
    unnorm_key: str | None = None  # key in the statistics; default: the source dataset's name
    cache_dir: Path | None = None  # where training tables are materialised; default $REFINEVLA_CACHE/train
    max_steps: int | None = None  # optimizer steps; overrides --epochs
    epochs: int = 1  # passes over the training split (when --max-steps is not given)
    batch_size: int = 8  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-5  # peak learning rate (OpenVLA: 2e-5 full fine-tuning, 5e-4 LoRA)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps before the cosine decay
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    eval_every: int = 0  # validation every N steps (0: only at the end)
    log_every: int = 1  # log loss / lr / samples/s every N steps
    val_fraction: float = 0.05  # share of episodes held out for validation (split by episode)
    seed: int = 0  # data order, split, dropout and initialisation
    reasoning_weight: float = 1.0  # λ in CE(action) + λ·CE(rationale); 0: action-only baseline (no rationale)
    reasoning_dropout: float = 0.0  # probability of dropping each rationale part per sample (ECoT-Lite)
    trainable_layers: int | None = None  # train only the top K decoder layers + final norm + LM head
    train_vision: bool = False  # also train the vision tower and projector
    lora_rank: int | None = None  # LoRA rank (peft) on the decoder's linear layers, instead of full tuning
    bf16: bool | None = None  # bf16 mixed precision; default: where the GPU supports it
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    resume: bool = False  # continue from the latest checkpoint in --output
    overwrite: bool = False  # replace the policy, checkpoints and logs an earlier run left in --output
    push_to_hub: str | None = None  # upload the final checkpoint to this Hub model repo
    num_workers: int = 2  # DataLoader worker processes (decode + resize + tokenise)
    limit_samples: int | None = None  # train on the first N training samples only (debugging, overfit checks)
    trace_samples: bool = False  # each rank writes the sample indices of every micro-batch to OUTPUT/trace/

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
