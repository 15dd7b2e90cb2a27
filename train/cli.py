"""`refine-train`: fine-tune a VLA on a refine-data dataset; `refine-train preview` shows what it learns.

torch and transformers are imported inside the commands, so `--help` is instant. Every flag is
a `TrainConfig` field, which declares its help and default (`options_from`); `--config FILE.yaml` supplies
the same flags from a file and flags given on the command line win. Bad input ends in one red
line and exit status 1, as `refine-data` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..annotate.cli_options import Flags, options_from
from ..annotate.exits import user_errors
from .config import TrainConfig
from .errors import RefineError

app = typer.Typer(
    name="refine-train",
    add_completion=False,
    invoke_without_command=True,
    no_args_is_help=True,
    help="Fine-tune a VLA to write the teacher's rationale, then its action (ReFineVLA); "
    "`refine-train preview` shows the training samples without training.",
)

# Every TrainConfig field is a flag of the training command; preview takes those that shape its samples.
PREVIEW_FIELDS = (
    "dataset",
    "model",
    "source",
    "data_dir",
    "revision",
    "split",
    "camera",
    "transform",
    "stats",
    "cache_dir",
    "val_fraction",
    "seed",
    "reasoning_weight",
)
# Required fields the training command lets the user leave out: `--config FILE.yaml` may supply them.
FROM_CONFIG_FILE = ("dataset", "model", "output")


@app.callback()
@user_errors
@options_from(TrainConfig, optional=FROM_CONFIG_FILE)
def train_command(
    ctx: typer.Context,
    flags: Flags,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with these flags (flags on the command line win).")
    ] = None,
) -> None:
    """Train: `refine-train --dataset OUT --model MODEL --output CKPT [flags]`."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import load_yaml_config

    values = dict(flags)
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
@user_errors
@options_from(TrainConfig, only=PREVIEW_FIELDS)
def preview(
    flags: Flags,
    n: Annotated[int, typer.Option("--n", help="How many samples.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show the first N training samples: prompt, target text and ids, action and its token ids."""
    from .preparation import prepare
    from .targets import target_ids, target_text

    cfg = TrainConfig(**flags, output=Path("."))
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
