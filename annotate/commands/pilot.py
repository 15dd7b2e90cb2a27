"""`refine-data pilot`: compare teachers on the same few episodes before paying for the whole source.

Thin: parse, call `refinevla.annotate.pilot`, print and write the comparison. Added to the
`refine-data` app by `register(app)` (called from `cli.py`).
"""

# No `from __future__ import annotations`: Typer evaluates the commands' option annotations.

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli_options import Flags, options_from
from ..part import AnnotateArgs
from ..pilot import PILOT_SHARED


def pilot(
    flags: Flags,
    teachers: Annotated[
        list[str],
        typer.Option(
            "--teacher",
            help="TEACHER[:MODEL][@BASE_URL], repeatable: e.g. gemini:gemini-2.5-flash, rule-based, "
            "openai-compatible:qwen2.5-vl-7b@http://127.0.0.1:8000/v1.",
        ),
    ],
    episodes: Annotated[int, typer.Option("--episodes", help="Episodes of the sample (spread over the source).")],
    out: Annotated[Path, typer.Option("--out", help="The pilot's folder: one annotate output per teacher, pilot.md.")],
    truth: Annotated[
        Path | None, typer.Option("--truth", help="A refine-eval demos folder: audit against the simulator's truth.")
    ] = None,
    tolerance: Annotated[int, typer.Option("--tolerance", help="Steps a boundary may be off and still count.")] = 2,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print each teacher's estimated cost of the pilot; ask nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="End with one line: the comparison as JSON.")] = False,
    progress: Annotated[str, typer.Option("--progress", help="auto | rich | plain | none.")] = "auto",
) -> None:
    """Compare teachers on the same N episodes: audit, answers, latency, $ per episode, the whole source's cost."""
    from rich.console import Console
    from rich.table import Table

    from ..commands.annotate import run_annotate
    from ..pilot import run_pilot, teacher_args, teacher_specs
    from ..pilot_report import table, write_pilot_report

    specs = teacher_specs(teachers)
    shared: dict[str, Any] = dict(flags)
    if dry_run:  # annotate's own estimate per teacher, for the sample: nothing is asked, nothing written
        for spec in specs:
            typer.echo(f"{spec.label}:")
            run_annotate(teacher_args(shared, spec, out, episodes, dry_run=True, progress="none"))
        return
    try:
        _, summary = run_pilot(shared, specs, episodes, out, truth=truth, tolerance=tolerance, progress=progress)
    except KeyboardInterrupt:
        typer.echo(f"pilot interrupted; resume with: refine-data {' '.join(sys.argv[1:])}", err=True)
        raise typer.Exit(130) from None
    md, js = write_pilot_report(summary, out)
    header, rows = table(summary)
    grid = Table(*header, title=f"pilot: {episodes} episode(s) of {summary['source']}")
    for row in rows:
        grid.add_row(*row)
    Console().print(grid)
    for pair in summary["agreement"]:
        f1, iou = pair["boundary_f1"], pair["box_iou"]
        typer.echo(
            f"agreement {pair['a']} ~ {pair['b']}: boundary F1 {'-' if f1 is None else f'{f1:.2f}'}, "
            f"box IoU {'-' if iou is None else f'{iou:.2f}'} over {pair['episodes']} episode(s)"
        )
    typer.echo(f"wrote {md} and {js.name}")
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    if any(t["exit_code"] for t in summary["teachers"]):  # the comparison is written; a teacher fell short
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `pilot` command to a Typer app (the `refine-data` app in `cli.py`)."""
    from ..exits import user_errors

    app.command("pilot")(user_errors(options_from(AnnotateArgs, only=PILOT_SHARED)(pilot)))
