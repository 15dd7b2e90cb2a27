"""`refine-train`: fine-tune a VLA on a refine-data dataset; `refine-train preview` shows what it learns.

torch and transformers are imported inside the commands, so `--help` is instant. Every flag is
a `TrainConfig` field (its comment is the help text's source); `--config FILE.yaml` supplies
the same flags from a file and flags given on the command line win. Bad input ends in one red
line and exit status 1, as `refine-data` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..annotate.exits import user_errors
from .errors import RefineError

app = typer.Typer(
    name="refine-train",
    add_completion=False,
    invoke_without_command=True,
    no_args_is_help=True,
    help="Fine-tune a VLA to write the teacher's rationale, then its action (ReFineVLA); "
    "`refine-train preview` shows the training samples without training.",
)

DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="refine-data output folder, or a Hub dataset repo id ORG/NAME.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Hub id or local folder of the model (paligemma, idefics3/smolvlm, openvla)."),
]
SourceOpt = Annotated[
    str | None, typer.Option("--source", help="Where the frames come from; default: the manifest's source.")
]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="TFDS data dir for bridge/fractal presets.")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Source split; default: the manifest's.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="--dataset ORG/NAME: Hub branch, tag or commit (default main).")
]
CameraOpt = Annotated[str | None, typer.Option("--camera", help="Camera feature, e.g. image_1; default: primary.")]
TransformOpt = Annotated[str, typer.Option("--transform", help="bridge_orig | fractal | none | auto.")]
StatsOpt = Annotated[
    Path | None, typer.Option("--stats", help="dataset_statistics.json to use; default: the training split's.")
]
CacheOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Where training tables live; default $REFINEVLA_CACHE/train.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the split, data order, dropout and init.")]
ValOpt = Annotated[float, typer.Option("--val-fraction", help="Share of episodes held out for validation.")]
WeightOpt = Annotated[
    float, typer.Option("--reasoning-weight", help="λ in CE(action) + λ·CE(rationale); 0: action-only baseline.")
]


@app.callback()
@user_errors  # type: ignore[untyped-decorator]  # mypy reads train/ as its own top level
def train_command(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    output: Annotated[Path | None, typer.Option("--output", help="Checkpoint folder to write.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with these flags (flags on the command line win).")
    ] = None,
    source: SourceOpt = None,
    data_dir: DataDirOpt = None,
    revision: RevisionOpt = None,
    split: SplitOpt = None,
    camera: CameraOpt = None,
    transform: TransformOpt = "auto",
    stats: StatsOpt = None,
    unnorm_key: Annotated[
        str | None, typer.Option("--unnorm-key", help="Statistics key; default: dataset name.")
    ] = None,
    cache_dir: CacheOpt = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training split.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per micro-batch per process.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Peak learning rate.")] = 2e-5,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up before cosine decay.")] = 0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0: off).")] = 1.0,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0: at the end).")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Validate every N steps (0: at the end).")] = 0,
    log_every: Annotated[int, typer.Option("--log-every", help="Log every N steps.")] = 1,
    val_fraction: ValOpt = 0.05,
    seed: SeedOpt = 0,
    reasoning_weight: WeightOpt = 1.0,
    reasoning_dropout: Annotated[
        float, typer.Option("--reasoning-dropout", help="Drop each rationale part with this probability.")
    ] = 0.0,
    trainable_layers: Annotated[
        int | None, typer.Option("--trainable-layers", help="Train the top K decoder layers + norm + LM head only.")
    ] = None,
    train_vision: Annotated[bool, typer.Option("--train-vision", help="Also train the vision tower.")] = False,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA rank instead of full tuning.")] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 mixed precision; default: the accelerate config's mixed_precision under accelerate "
            "launch, else bf16 where the GPU has it.",
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations (less memory).")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --output.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the policy, checkpoints and logs an earlier run left in --output."),
    ] = False,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Upload the final policy to this Hub model repo.")
    ] = None,
    num_workers: Annotated[int, typer.Option("--num-workers", help="DataLoader workers (decode, resize).")] = 2,
    limit_samples: Annotated[
        int | None, typer.Option("--limit-samples", help="Train on the first N samples only (debugging).")
    ] = None,
    trace_samples: Annotated[
        bool, typer.Option("--trace-samples", help="Each rank logs its micro-batches' sample indices to OUTPUT/trace/.")
    ] = False,
) -> None:
    """Train: `refine-train --dataset OUT --model MODEL --output CKPT [flags]`."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import TrainConfig, load_yaml_config

    values = {name: ctx.params[name] for name in TrainConfig.field_names()}
    if config is not None:
        for name, value in load_yaml_config(config).items():
            if getattr(ctx.get_parameter_source(name), "name", None) != "COMMANDLINE":  # typer may vendor click
                values[name] = value
    for required in ("dataset", "model", "output"):
        if not values.get(required):
            raise RefineError(f"--{required} is required (or give it in --config)")
    for name in ("output", "stats", "cache_dir"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    from .trainer import train

    train(TrainConfig(**values))


@app.command()
@user_errors  # type: ignore[untyped-decorator]  # mypy reads train/ as its own top level
def preview(
    dataset: Annotated[str, typer.Option("--dataset", help="refine-data output folder or ORG/NAME.")],
    model: Annotated[str, typer.Option("--model", help="Model (its processor and tokenizer) or a checkpoint.")],
    n: Annotated[int, typer.Option("--n", help="How many samples.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    source: SourceOpt = None,
    data_dir: DataDirOpt = None,
    revision: RevisionOpt = None,
    split: SplitOpt = None,
    camera: CameraOpt = None,
    transform: TransformOpt = "auto",
    stats: StatsOpt = None,
    cache_dir: CacheOpt = None,
    val_fraction: ValOpt = 0.05,
    seed: SeedOpt = 0,
    reasoning_weight: WeightOpt = 1.0,
) -> None:
    """Show the first N training samples: prompt, target text and ids, action and its token ids."""
    from .config import TrainConfig
    from .targets import target_ids, target_text
    from .trainer import prepare

    cfg = TrainConfig(
        dataset=dataset,
        model=model,
        output=Path("."),
        source=source,
        data_dir=data_dir,
        revision=revision,
        split=split,
        camera=camera,
        transform=transform,
        stats=stats,
        cache_dir=cache_dir,
        val_fraction=val_fraction,
        seed=seed,
        reasoning_weight=reasoning_weight,
    )
    p = prepare(cfg, checkpoint_statistics=True)
    tok = p.adapter.tokenizer(p.processor)
    for index in p.train_indices[:n]:
        row = p.table.row(index)
        from .targets import loads_parts

        parts = loads_parts(row["parts"]) if cfg.reasoning else []
        action_ids = p.actions.encode(row["action"]).tolist()
        ids, _ = target_ids(tok, parts, action_ids)
        record = {
            "episode_id": row["episode_id"],
            "step": row["step"],
            "prompt": row["prompt"],
            "target": target_text(parts),
            "target_token_ids": ids,
            "action": [float(a) for a in row["action"]],
            "action_token_ids": action_ids,
            "unnorm_key": p.unnorm_key,
            "transform": p.table.meta["transform"],
        }
        if as_json:
            typer.echo(json.dumps(record, ensure_ascii=False))
            continue
        typer.secho(f"== {row['episode_id']} step {row['step']}", bold=True)
        typer.echo(f"prompt: {row['prompt']}")
        typer.echo(f"target:\n{record['target']} {' '.join(f'<{i}>' for i in action_ids)}")
        typer.echo(f"target ids ({len(ids)}): {ids}")
        typer.echo(f"action ({p.table.meta['transform']}): {[round(a, 5) for a in record['action']]}")
        typer.echo(f"action token ids: {action_ids}")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
