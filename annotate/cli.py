"""`refine-data`: read robot episodes, compute statistics, annotate, publish.

Thin by design: parse flags, call the library, report. Heavy imports happen inside
commands so `refine-data --help` is instant. Errors a user can act on
(`RefineError`) print as one red line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    ACTION_KEY_FLAG,
    CAMERA_FLAG,
    INSTRUCTION_KEY_FLAG,
    SOURCE_FLAG,
    STATE_KEY_FLAG,
    DataDirOpt,
    SplitOpt,
)
from .errors import RefineError
from .exits import user_errors
from .source_args import open_cli_source, parse_range
from .viewer import (
    GRPC_PORT,
    LOOPBACK,
    WEB_PORT,
    BindOpt,
    GrpcPortOpt,
    PortOpt,
    SaveOpt,
    ServeOpt,
    ViewTarget,
    report_and_serve,
)

app = typer.Typer(
    name="refine-data",
    help="Reasoning-enriched robot datasets: inspect sources, compute statistics, annotate with a teacher, publish.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by every command that reads a source (Typer's Annotated reuse); their help is declared
# once in cli_options, where `AnnotateArgs` takes the same flags from.
SourceArg = Annotated[str, SOURCE_FLAG.parameter_info("source")]
CameraOpt = Annotated[list[str] | None, CAMERA_FLAG.parameter_info("camera")]
InstructionKeyOpt = Annotated[str | None, INSTRUCTION_KEY_FLAG.parameter_info("instruction_key")]
StateKeyOpt = Annotated[str | None, STATE_KEY_FLAG.parameter_info("state_key")]
ActionKeyOpt = Annotated[str | None, ACTION_KEY_FLAG.parameter_info("action_key")]
EpisodesOpt = Annotated[str | None, typer.Option("--episodes", help="Episode index range START:STOP (split order).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Reader processes (0 = read in this process).")]
SkipCorruptOpt = Annotated[
    bool, typer.Option("--skip-corrupt", help="Skip and count records that fail their CRC instead of stopping.")
]


@app.command()
@user_errors
def inspect(
    source: SourceArg,
    limit: Annotated[int | None, typer.Option("--limit", help="Show at most N episodes.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per episode, then a summary object.")
    ] = False,
    data_dir: DataDirOpt = None,
    split: SplitOpt = "train",
    camera: CameraOpt = None,
    instruction_key: InstructionKeyOpt = None,
    state_key: StateKeyOpt = None,
    action_key: ActionKeyOpt = None,
    episodes: EpisodesOpt = None,
    workers: WorkersOpt = 0,
    skip_corrupt: SkipCorruptOpt = False,
) -> None:
    """One line per episode (id, steps, instruction, cameras, action range), then a summary."""
    from .sources import ReadOptions
    from .summaries import episode_summary, run_summary

    src = open_cli_source(source, data_dir, split, camera, instruction_key, state_key, action_key)
    start, stop = parse_range(episodes, limit)
    rows = []
    for ep in src.iter_episodes(ReadOptions(start=start, stop=stop, workers=workers, skip_corrupt=skip_corrupt)):
        row = episode_summary(ep)
        rows.append(row)
        if as_json:
            typer.echo(json.dumps(row))
        else:
            lo, hi = row["action_min"], row["action_max"]
            rng = " ".join(f"[{a:+.3f},{b:+.3f}]" for a, b in zip(lo, hi, strict=True))
            typer.echo(
                f"{row['episode_id']}  steps={row['steps']}  cameras={','.join(row['cameras'])}  "
                f"instruction={row['instruction']!r}  action={rng}"
            )
    summary = run_summary(src.name, rows, src.counters.corrupt)
    if as_json:
        typer.echo(json.dumps({"summary": summary}))
    else:
        typer.echo(
            f"{summary['dataset']}: {summary['episodes']} episodes, {summary['steps']} steps "
            f"(mean {summary['mean_steps']:.1f}, min {summary['min_steps']}, max {summary['max_steps']}), "
            f"{summary['instructions']} distinct instructions, {summary['corrupt_skipped']} corrupt records skipped"
        )
    for line in src.counters.corrupt:
        typer.secho(f"skipped: {line}", fg=typer.colors.YELLOW, err=True)


@app.command()
@user_errors
def stats(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write dataset_statistics.json.")] = Path(
        "dataset_statistics.json"
    ),
    transform: Annotated[
        str, typer.Option("--transform", help="bridge_orig | fractal | none | auto (from the preset).")
    ] = "auto",
    key: Annotated[
        str | None, typer.Option("--key", help="Top-level key (unnorm_key); default: the dataset name.")
    ] = None,
    data_dir: DataDirOpt = None,
    split: SplitOpt = "train",
    camera: CameraOpt = None,
    instruction_key: InstructionKeyOpt = None,
    state_key: StateKeyOpt = None,
    action_key: ActionKeyOpt = None,
    episodes: EpisodesOpt = None,
    workers: WorkersOpt = 0,
    skip_corrupt: SkipCorruptOpt = False,
) -> None:
    """Write OpenVLA-format action/proprio statistics (mean, std, min, max, q01, q99, mask)."""
    from .sources import ReadOptions
    from .stats import TRANSFORMS, auto_transform, compute_statistics

    src = open_cli_source(source, data_dir, split, camera, instruction_key, state_key, action_key)
    if transform == "auto":
        transform = auto_transform(src)
    if transform not in TRANSFORMS:
        raise RefineError(f"--transform {transform!r}: choose from {', '.join(TRANSFORMS)}, auto")
    start, stop = parse_range(episodes)
    eps = src.iter_episodes(ReadOptions(start=start, stop=stop, workers=workers, skip_corrupt=skip_corrupt))
    try:
        entry = compute_statistics(eps, transform)
    except ValueError as exc:
        raise RefineError(f"{source}: {exc}") from None
    unnorm_key = key or src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({unnorm_key: entry}, indent=2))
    typer.echo(
        f"wrote {out}: {unnorm_key} ({transform}), {entry['num_trajectories']} trajectories, "
        f"{entry['num_transitions']} transitions"
    )
    for line in src.counters.corrupt:
        typer.secho(f"skipped: {line}", fg=typer.colors.YELLOW, err=True)


@app.command()
@user_errors
def view(
    out: Annotated[str, typer.Argument(help="An annotate output folder, or a Hub dataset ORG/NAME.")],
    episodes: Annotated[
        str | None,
        typer.Option(
            "--episodes",
            help="Episode index range START:STOP of the source (default: 0), or worst:N (refine-data audit's worst N).",
        ),
    ] = None,
    save: SaveOpt = None,
    serve: ServeOpt = False,
    port: PortOpt = WEB_PORT,
    grpc_port: GrpcPortOpt = GRPC_PORT,
    bind: BindOpt = LOOPBACK,
    data_dir: DataDirOpt = None,
) -> None:
    """Frames, states, actions and the rationale (text, boxes, segments) of episodes on one timeline in Rerun."""
    from .view import view_dataset

    target = ViewTarget(save, serve, port, grpc_port, bind).checked()
    raise typer.Exit(report_and_serve(view_dataset(out, episodes, target, data_dir), target))


def _register_optional_commands() -> None:
    """Commands that live in their own modules (`commands.annotate`, `commands.publish`, `commands.audit`,
    `commands.pilot`) add
    themselves here."""
    from importlib import import_module

    for module in ("commands.annotate", "commands.publish", "commands.audit", "commands.pilot"):
        try:
            mod = import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise
            continue
        mod.register(app)


_register_optional_commands()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
