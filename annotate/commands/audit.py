"""`refine-data audit`: score an annotated output's rationales (and, with --truth, against the simulator's).

Thin: parse, call `refinevla.annotate.audit`, report. Added to the `refine-data` app by `register(app)`
(called from `cli.py`).
"""

# No `from __future__ import annotations`: Typer evaluates the commands' option annotations.

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import RefineError

_SIZE = re.compile(r"(\d+)[xX](\d+)")


def parse_size(value: str | None) -> tuple[int, int] | None:
    """ "WxH" -> (width, height); None for None. RefineError for anything else."""
    if value is None:
        return None
    m = _SIZE.fullmatch(value.strip())
    if not m or not int(m.group(1)) or not int(m.group(2)):
        raise RefineError(f"--frame-size {value!r}: expected WIDTHxHEIGHT in pixels, e.g. 320x256")
    return int(m.group(1)), int(m.group(2))


def audit(
    out: Annotated[str, typer.Argument(help="An annotate output folder, or a Hub dataset ORG/NAME.")],
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth",
            help="A refine-eval demos folder (its refinevla_truth.json): score boxes, object names and the "
            "expert's phases too.",
        ),
    ] = None,
    tolerance: Annotated[
        int, typer.Option("--tolerance", help="Steps a subtask boundary may be from an event and still count.")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="End with one line: the summary as a JSON object.")] = False,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write audit.md, audit.json and episodes.parquet "
            "(default: OUT/.refine/audit; ./audit-NAME for a Hub dataset).",
        ),
    ] = None,
    frame_size: Annotated[
        str | None,
        typer.Option(
            "--frame-size",
            help="The source frames' WIDTHxHEIGHT, for the large-box rate without --truth "
            "(default: a square of the manifest's image size).",
        ),
    ] = None,
) -> None:
    """Score an annotated output's rationales: boundaries vs gripper events, grounding, duplicates, boxes, cost."""
    from rich.console import Console

    from ..audit import audit_output, print_tables, write_report

    result = audit_output(out, truth=truth, tolerance=tolerance, frame_size=parse_size(frame_size))
    files = write_report(result, report_dir)
    print_tables(Console(), result)
    typer.echo(f"wrote {files.markdown}, {files.summary.name}, {files.episodes.name} (worst first)")
    if files.charts_note:
        typer.secho(files.charts_note, fg=typer.colors.YELLOW, err=True)
    if as_json:
        typer.echo(json.dumps(result.summary))


def register(app: typer.Typer) -> None:
    """Add the `audit` command to a Typer app (the `refine-data` app in `cli.py`)."""
    from ..exits import user_errors

    app.command("audit")(user_errors(audit))
