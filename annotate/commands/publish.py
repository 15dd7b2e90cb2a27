"""`refine-data card | push | validate | import-ecot | export`: publishing commands.

Thin: parse, call `refinevla.annotate.publish` / `refinevla.datacards`, report. Added to the
`refine-data` app by `register(app)` (called from `cli.py`).
"""

# No `from __future__ import annotations`: Typer evaluates the commands' option annotations.

import shlex
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from ..cli_options import DataDirOpt, SplitOpt
from ..errors import RefineError
from ..outputs import hold_output

LicenseOpt = Annotated[
    str | None,
    typer.Option("--license", help="Hub license id (e.g. cc-by-4.0); required where the source's is not known."),
]


def write_card_or_fail(out: Path, license: str | None) -> Path:
    """`datacards.render.write_card`, its errors as `RefineError` (one red line)."""
    from ...datacards.render import CardError, write_card

    try:
        return Path(write_card(out, license=license))
    except CardError as exc:
        raise RefineError(str(exc)) from None


def hold_existing(out: Path) -> AbstractContextManager[Path]:
    """Hold a dataset folder that must already exist (card, push): refused while a run writes it."""
    if not out.is_dir():
        raise RefineError(f"{out}: no such dataset folder")
    return hold_output(out, "refine-data " + shlex.join(sys.argv[1:]), flag="dataset")


def hold_new(out: Path, flag: str = "--out") -> AbstractContextManager[Path]:
    """Hold the folder a command writes (created if needed)."""
    return hold_output(out, "refine-data " + shlex.join(sys.argv[1:]), flag=flag)


def card(
    out: Annotated[Path, typer.Argument(help="A dataset directory written by annotate or import-ecot.")],
    license: LicenseOpt = None,
) -> None:
    """Write OUT/README.md: the dataset card (YAML front matter, fields, provenance, statistics)."""
    with hold_existing(out):
        path = write_card_or_fail(out, license)
    typer.echo(f"wrote {path}")


def push(
    out: Annotated[Path, typer.Argument(help="The dataset directory to upload.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repo, ORG/NAME.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the operations and file sizes; send nothing.")
    ] = False,
) -> None:
    """Upload OUT (all but .refine/) to a Hub dataset repo, merge its card, tag the schema version."""
    from ..publish.push import push_dataset

    with hold_existing(out):  # never upload a folder a run is writing
        result = push_dataset(out, repo_id, private=private, revision=revision, dry_run=dry_run)
    if dry_run:
        for line in result.operations:
            typer.echo(line)
        return
    merged = " (README YAML merged with the repo's card)" if result.readme_merged else ""
    typer.echo(
        f"pushed {len(result.files)} files to {repo_id}@{result.revision}, commit {result.commit}, "
        f"tag {result.tag}{merged}"
    )


def validate(
    target: Annotated[str, typer.Argument(help="A dataset directory or a Hub dataset id ORG/NAME.")],
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (for ORG/NAME).")] = None,
    max_errors: Annotated[int, typer.Option("--max-errors", help="Failing rows to name at most.")] = 20,
) -> None:
    """Check every row against its schema, the manifest's counts and the card's YAML."""
    from ..publish.validate import validate_dataset

    report = validate_dataset(target, max_errors=max_errors, revision=revision)
    checks = ", ".join(f"{k} {v}" for k, v in report.checks.items())
    typer.echo(
        f"{report.target}: {report.episodes} episodes, {report.steps} steps, "
        f"schema {', '.join(sorted(report.schema_ids)) or '?'}; {checks}"
    )
    if not report.ok:
        for line in report.errors:
            typer.secho(f"  {line}", fg=typer.colors.RED, err=True)
        more = report.error_count - len(report.errors)
        if more > 0:
            typer.secho(f"  ... and {more} more", fg=typer.colors.RED, err=True)
        raise RefineError(f"{report.target}: {report.error_count} problem(s) found")


def import_ecot(
    path: Annotated[Path, typer.Argument(help="Embodied-CoT's embodied_features_bridge.json.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset directory.")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="Source dataset name in the episode ids (joins with annotate runs).")
    ] = "bridge_orig",
    license: LicenseOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Convert at most N episodes.")] = None,
) -> None:
    """Convert Embodied-CoT's Bridge reasoning into refinevla.rationale/1 rows (streamed)."""
    from ..publish.ecot import import_ecot as run_import

    if not path.is_file():
        raise RefineError(f"{path}: no such file")
    if license is None:
        raise RefineError(
            "the license of Embodied-CoT's reasoning is not known to refinevla; pass --license ID "
            "(check the license of the file you downloaded)"
        )
    with hold_new(out):
        report = run_import(path, out, dataset=dataset, limit=limit)
        card_path = write_card_or_fail(out, license)
    typer.echo(
        f"wrote {out}: {report.episodes} episodes, {report.steps} steps; {len(report.malformed)} malformed "
        f"entries skipped; card {card_path.name}"
    )
    for key, reason in report.malformed[:20]:
        typer.secho(f"malformed: {key}: {reason}", fg=typer.colors.YELLOW, err=True)
    for name, count in sorted(report.unknown_fields.items()):
        typer.secho(f"unknown field (kept out): {name} in {count} entries", fg=typer.colors.YELLOW, err=True)
    for name, note in sorted(report.not_in_ecot.items()):
        typer.secho(f"not in Embodied-CoT: {name}: {note}", fg=typer.colors.YELLOW, err=True)


def export(
    out: Annotated[Path, typer.Argument(help="An annotated dataset directory.")],
    to: Annotated[str, typer.Option("--to", help="Target format: lerobot.")],
    source: Annotated[str, typer.Option("--source", help="The source the episodes were annotated from.")],
    dest: Annotated[Path, typer.Option("--out", help="Where to write the exported dataset.")],
    data_dir: DataDirOpt = None,
    split: SplitOpt = "train",
    fps: Annotated[float | None, typer.Option("--fps", help="Control rate (default from the dataset).")] = None,
    camera_storage: Annotated[
        str, typer.Option("--camera-storage", help="video (mp4, LeRobot's default) | image.")
    ] = "video",
) -> None:
    """Export frames + rationales as a LeRobot v3.0 dataset (rationales as language columns)."""
    if to != "lerobot":
        raise RefineError(f"--to {to!r}: only 'lerobot' is supported")
    from ..publish.lerobot_export import export_lerobot

    result = export_lerobot(  # refuses a non-empty --out; a half-written export is removed
        out, source, dest, data_dir=data_dir, split=split, fps=fps, camera_storage=camera_storage
    )
    typer.echo(f"wrote {result.root}: LeRobot v3.0, {result.episodes} episodes, {result.frames} frames")
    typer.echo(
        "note: plan, subtask and motion use LeRobot's language styles; the other reasoning parts use the "
        "extra style 'reasoning', which a LeRobot reader must register (lerobot.datasets.language.EXTENDED_STYLES)"
    )


def register(app: typer.Typer) -> None:
    """Add the publishing commands to a Typer app (the `refine-data` app in `cli.py`)."""
    from ..exits import user_errors

    for name, command in (
        ("card", card),
        ("push", push),
        ("validate", validate),
        ("import-ecot", import_ecot),
        ("export", export),
    ):
        app.command(name)(user_errors(command))
