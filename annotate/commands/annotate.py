"""`refine-data annotate`: episodes -> teacher -> validated rationales -> `OUT/`.

Thin: parse the flags, wire source, teacher, store, engine and writer, report. The
command is added to the `refine-data` app by `register(app)` (called from `cli.py`).
"""

# No `from __future__ import annotations`: Typer evaluates the option annotations of the commands
# defined inside `register` (locals, not module globals).

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ...schemas.dataset_layout import MANIFEST, PRIVATE_DIR
from ..errors import RefineError
from ..exits import EXIT_INTERRUPTED
from ..outputs import hold_output
from ..part import AnnotateArgs, PartResult, RunSetup, run_part, setup_run

__all__ = ["AnnotateArgs", "PartResult", "RunSetup", "register", "run_annotate", "run_part"]


def _elide_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": f"<image/jpeg, {len(p['image_url']['url'])} base64 chars>"}}
                if p.get("type") == "image_url"
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


def run_annotate(args: AnnotateArgs) -> int:
    """Run the command; returns the exit code (0 done, 1 some episodes failed, 130 interrupted)."""

    setup = setup_run(args)
    teacher = setup.teacher
    if teacher.paid and setup.prices.get(teacher.model) is None:
        if args.max_cost is not None:
            raise RefineError(
                f"no price for model {teacher.model!r}, so --max-cost cannot be enforced; "
                'add it with --prices FILE ({"MODEL": {"input": USD_PER_1M, "output": USD_PER_1M}})'
            )
        typer.secho(f"warning: no price for model {teacher.model!r}: cost is not tracked", fg="yellow", err=True)
    if args.batch:
        from .batch import check_batch_args

        check_batch_args(args, teacher)
    if args.dry_run:
        episodes = setup.read(setup.start, setup.stop)
        return _dry_run(args, teacher, setup.options, setup.prices, episodes, setup.total)

    _check_card_license(setup.out, setup.source.name, args.license)  # before anything is written
    command = "refine-data " + shlex.join(args.argv) if args.argv else "refine-data annotate"
    with hold_output(setup.out, command, part=setup.suffix or None):
        return _run_held(args, setup)


def _run_held(args: AnnotateArgs, setup: RunSetup) -> int:
    """The run proper, while this process holds OUT (or its shard of OUT)."""
    if args.backend == "local":  # on Ray the driver is one process; its line names the cluster instead
        typer.echo(setup.processes.line(), err=True)
    teacher = setup.teacher
    batch: dict[str, Any] | None = None
    if args.batch:
        from dataclasses import replace

        from .batch import batch_manifest, run_batch_mode

        resume = _resume_command(args)
        try:
            summary = run_batch_mode(args, setup, lambda line: typer.echo(line, err=True))
        except KeyboardInterrupt:
            typer.secho(
                f"interrupted; the batches keep running at {teacher.name} and every answer ingested is stored. "
                f"Resume (polls them, submits nothing twice) with: {resume}",
                fg="yellow",
                err=True,
            )
            return EXIT_INTERRUPTED
        batch = batch_manifest(summary, args, teacher.name)
        # the dataset is written from the store; only --reask live asks anything more (the re-asks, live)
        setup.options = replace(
            setup.options,
            ask=args.reask == "live",
            unasked_reason="no batch answer (its lines failed more than --max-resubmits times, or --max-cost "
            "stopped the submissions); rerun to submit it again",
        )
        if summary.stop_reason == "max-cost":
            typer.secho(f"--max-cost ${args.max_cost} reached: no more batches submitted", fg="yellow", err=True)
    backend = _local_backend(setup)
    if args.backend == "ray":
        from ..ray_backend import run_on_ray

        part, cluster = run_on_ray(args, setup)
        backend = cluster.manifest()
        typer.echo(
            f"ray: {cluster.nodes} node(s), {cluster.cpus:g} CPUs, {cluster.workers} preparation workers", err=True
        )
    elif setup.processes.count > 1 and setup.total > 1:
        from ..parallel import run_processes

        part = run_processes(args, setup)
    else:
        part = run_part(args, setup, setup.start, setup.stop, setup.out, live_progress=True)
    return _finalize(args, setup, part, batch, backend)


def _finalize(
    args: AnnotateArgs,
    setup: RunSetup,
    part: PartResult,
    batch: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
) -> int:
    """Rejects file, manifest and card for the whole run; the summary and the exit code."""
    from ..engine import Counters
    from ..progress import summary_line
    from ..store import ResultStore

    out = setup.out
    i, n = setup.shard
    c = Counters(**part.counters, started=time.monotonic() - part.seconds)  # rates over the run, not from now
    if batch is not None:  # answers ingested from batches in this run were written as store hits: count them as new
        moved = min(int(batch["this_run"]["answers"]), c.cached)
        c.annotated, c.cached = c.annotated + moved, c.cached - moved
    if batch is None:  # a batch run's answers may still be coming: its manifest records where it stands
        _refuse_an_empty_dataset(args, part, c)
    with ResultStore(setup.store_path) as store:
        spend = store.spend()
        rejects = store.rejects()
    _write_rejects(out / PRIVATE_DIR / f"rejects{setup.suffix}.jsonl", rejects)
    _write_manifest(args, setup, part, c, spend, batch, backend)
    if n == 1:
        _write_card(out, args.license)
    else:
        typer.echo(f"shard {i}/{n} written; once all {n} shards are in {out}, run: refine-data merge {out}", err=True)
    typer.echo(summary_line(c), err=True)
    counts = part.counts
    typer.echo(f"wrote {out}: {counts['episodes']} episodes, {counts['steps']} steps, {len(rejects)} rejected")
    return _report_stop(args, setup, part, c, spend.cost, batch is not None)


def _local_backend(setup: RunSetup) -> dict[str, Any]:
    """The manifest's record of a local run: its engine processes and how that number was chosen."""
    chosen = setup.processes
    return {"name": "local", "processes": chosen.count, "processes_chosen": f"{chosen.requested}: {chosen.why}"}


def _resume_command(args: AnnotateArgs) -> str:
    return "refine-data " + shlex.join(args.argv) if args.argv else "the same command"


def failure_summary(reasons: dict[str, int], limit: int = 3) -> str:
    """The commonest reasons episodes failed this run, with their counts (the URL, the status...)."""
    from ..engine import GAVE_UP

    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:limit]
    text = "; ".join(f"{reason.removeprefix(GAVE_UP)} ({count})" for reason, count in top)
    return text + ("; ..." if len(reasons) > limit else "")


def _refuse_an_empty_dataset(args: AnnotateArgs, part: PartResult, c: Any) -> None:
    """Every selected episode failed (a teacher that cannot be reached, say) and nothing was ever
    annotated into OUT: one line saying why, and no manifest or card as if a dataset had been made."""
    if part.counts["episodes"] or part.statuses.get("rejected") or not c.failed or part.stop_reason:
        return
    raise RefineError(
        f"nothing annotated: all {c.failed} episodes failed after retries: {failure_summary(part.failure_reasons)}; "
        f"no dataset written. Rerun once the teacher answers: {_resume_command(args)}"
    )


def _write_rejects(path: Path, rejects: list[Any]) -> None:
    """OUT/.refine/rejects*.jsonl: every rejected answer with its reason and the raw text paid for."""
    with path.open("w", encoding="utf-8") as fh:
        for r in rejects:
            row = {"episode_id": r.episode_id, "key": r.key, "reason": r.reason, "raw": r.raw, "attempts": r.attempts}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_manifest(
    args: AnnotateArgs,
    setup: RunSetup,
    part: PartResult,
    c: Any,
    spend: Any,
    batch: dict[str, Any] | None,
    backend: dict[str, Any] | None,
) -> None:
    """refinevla.json (or a shard's manifest under .refine/): source, teacher, prompt, schema, counts, spend."""
    from ...schemas import backend_for, schema_digest
    from ...schemas.dataset_layout import write_manifest
    from ..prompts import load_template
    from ..writer import tool_version, utc_now

    source, teacher = setup.source, setup.teacher
    i, n = setup.shard
    tmpl = load_template(setup.options.template)  # the one asked with (--frames 0 picks the text-only one)
    counts = part.counts
    rejected = part.statuses.get("rejected", 0)
    manifest = {
        "refinevla_version": tool_version(),
        "created": utc_now(),
        "source": {
            "uri": args.source,
            "dataset": source.name,
            "split": args.split,
            "episodes_in_source": len(source),
            # which features were read (--state-key, --camera, ...) and what the source declares (robot, transform)
            "layout": source.layout(),
            "declared": dict(source.declared),
        },
        "selection": {
            "shard": f"{i}/{n}",
            "start": setup.start,
            "stop": setup.stop,
            "limit": args.limit,
            **({"sample": list(setup.indices)} if setup.indices is not None else {}),
        },
        "teacher": {
            "name": teacher.name,
            "model": teacher.model,
            "sampling": teacher.sampling(),
            "base_url": getattr(teacher, "base_url", None),
            # a local engine's own record (vllm: its version, structured-output API and engine arguments)
            **(teacher.provenance() if hasattr(teacher, "provenance") else {}),
            "written_by_model": teacher.name != "rule-based",
            "note": (
                "rule-based: no model wrote these rationales; they are composed from the instruction, "
                "the trajectory and the gripper events"
                if teacher.name == "rule-based"
                else f"written by {teacher.model}, validated against the schema and semantic checks"
            ),
        },
        "prompt": {"template": tmpl.version, "sha256": tmpl.digest},
        "frames": {"count": args.frames, "max_side": args.image_size},
        "schema": {
            "id": args.schema_id,
            "sha256": schema_digest(args.schema_id),
            "request_detail": setup.options.schema_detail,
            "request_backend": backend_for(teacher.name).name,
        },
        "counts": {
            "episodes": counts["episodes"],
            "steps": counts["steps"],
            "selected": setup.total,
            "annotated_this_run": c.annotated,
            "cached": c.cached,
            "rejected": rejected,
            "failed": c.failed,
            "not_done": setup.total - counts["episodes"] - rejected,
            "reject_reasons": dict(part.reject_reasons),
        },
        "tokens": {
            "prompt": spend.prompt_tokens,
            "completion": spend.completion_tokens,
            "requests": spend.requests,
        },
        "cost_usd": round(spend.cost, 6),
        "this_run": {
            "requests": c.requests,
            "retries": c.retries,
            "reasks": c.reasks,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "cost_usd": round(c.cost, 6),
            "seconds": round(part.seconds, 2),
            "processes": setup.processes.count,
        },
        "backend": backend or _local_backend(setup),
        "complete": part.stop_reason is None and c.failed == 0,
        "stop_reason": part.stop_reason,
    }
    if batch is not None:
        manifest["batch"] = batch
    name = MANIFEST if n == 1 else f"{PRIVATE_DIR}/manifest{setup.suffix}.json"
    _keep_server_record(manifest["teacher"], Path(setup.out) / name)
    write_manifest(setup.out, manifest, name)


def _keep_server_record(teacher: dict[str, Any], previous: Path) -> None:
    """A rerun that asked nothing never contacted the server: the server the earlier run recorded (same
    model at the same URL) still describes who wrote the rows, so it is kept rather than dropped."""
    if "server" in teacher or not previous.is_file():
        return
    try:
        before = json.loads(previous.read_text(encoding="utf-8")).get("teacher") or {}
    except (OSError, ValueError):  # an unreadable earlier manifest is replaced, as before
        return
    same = all(before.get(k) == teacher.get(k) for k in ("name", "model", "base_url"))
    if same and isinstance(before.get("server"), dict):
        teacher["server"] = before["server"]


def _report_stop(args: AnnotateArgs, setup: RunSetup, part: PartResult, c: Any, spent: float, batch: bool) -> int:
    """Why the run ended short, if it did, in one line with what to do next; the exit code."""
    resume = _resume_command(args)
    not_done = setup.total - part.counts["episodes"] - part.statuses.get("rejected", 0)
    if part.stop_reason == "interrupted":
        typer.secho(f"interrupted; answers so far are stored. Resume with: {resume}", fg="yellow", err=True)
        return EXIT_INTERRUPTED
    if part.stop_reason == "max-cost":
        typer.secho(
            f"stopped: --max-cost ${args.max_cost} reached (spent ${spent:.4f} in all); "
            f"{not_done} episodes not annotated. Raise --max-cost and rerun to continue.",
            fg="yellow",
            err=True,
        )
        return 0
    if c.failed and batch:
        typer.secho(
            f"{c.failed} episodes have no batch answer (--max-cost, or lines that failed more than --max-resubmits "
            f"times); rerun to submit them again: {resume}",
            fg="yellow",
            err=True,
        )
        return 1
    if c.failed:
        typer.secho(
            f"{c.failed} episodes failed after retries: {failure_summary(part.failure_reasons)}; "
            f"rerun to retry them: {resume}",
            fg="yellow",
            err=True,
        )
        return 1
    return 0


def _check_card_license(out: Path, dataset: str, license: str | None) -> None:
    """Fail before anything is paid for if the run's card could not be written at the end.

    The same resolution the card uses (--license, else the card already in OUT, else the source's).
    """
    from ...datacards.render import CardError, resolve_license

    try:
        resolve_license(out, {"source": {"dataset": dataset}}, license)
    except CardError as exc:
        raise RefineError(f"{exc} (the dataset card needs one)") from None


def _write_card(out: Path, license: str | None) -> None:
    from ...datacards.render import CardError, write_card

    try:
        path = write_card(out, license=license)
    except CardError as exc:
        raise RefineError(f"{out}: dataset card not written: {exc}") from None
    typer.echo(f"wrote {path}")


def _dry_run(args: AnnotateArgs, teacher: Any, options: Any, prices: Any, episodes: Any, total: int) -> int:
    """Print the first request and an estimate of tokens and cost for the whole selection."""
    from ..engine import Engine
    from ..store import ResultStore
    from ..teacher_requests import estimate_prompt_tokens

    engine = Engine(teacher, ResultStore(":memory:"), options, prices)
    sampled = []
    for episode in episodes:
        sampled.append(engine.prepare(episode))
        if len(sampled) >= 8:
            break
    if not sampled:
        raise RefineError(f"{args.source}: no episodes selected")
    first = sampled[0]
    body = {
        "model": teacher.model,
        "messages": _elide_images(first.bundle.messages),
        "response_format": first.response_format,
        **teacher.sampling(),
    }
    typer.echo(json.dumps({"request_key": first.key, "episode_id": first.episode_id, "request": body}, indent=2))
    prompt = sum(estimate_prompt_tokens(p.bundle.messages) for p in sampled) / len(sampled)
    completion = options.expected_completion_tokens
    per = prices.cost(teacher.model, int(prompt), completion, batch=args.batch)
    typer.echo(
        f"estimate for {total} episodes with {teacher.name} ({teacher.model}): "
        f"~{int(prompt * total):,} prompt + ~{completion * total:,} completion tokens, "
        f"~${per * total:,.{2 if per * total >= 1 else 4}f} {'at batch prices ' if args.batch else ''}"
        "(first ask only; re-asks add to it)"
    )
    return 0


def register(app: typer.Typer) -> None:
    """Add the `annotate` command to a Typer app (the `refine-data` app in `cli.py`)."""
    from ..cli_options import Flags, options_from
    from ..exits import user_errors

    @app.command()
    @user_errors
    @options_from(AnnotateArgs)
    def annotate(flags: Flags) -> None:
        """Annotate episodes with ReFineVLA rationales (resumable; a rerun never pays twice)."""
        code = run_annotate(AnnotateArgs(**flags, argv=sys.argv[1:]))
        if code:
            raise typer.Exit(code)

    @app.command()
    @user_errors
    def batches(
        out: Annotated[Path, typer.Argument(help="The run's output dir (annotated with --batch).")],
        cancel: Annotated[
            bool, typer.Option("--cancel", help="Cancel the run's batches that are still running at the provider.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per batch.")] = False,
    ) -> None:
        """List a --batch run's batches with their state (as last polled); --cancel cancels the running ones."""
        from .batch import format_batches, list_batches

        rows = list_batches(out, cancel=cancel)
        if as_json:
            for row in rows:
                typer.echo(json.dumps(row, sort_keys=True))
        else:
            typer.echo(format_batches(rows))

    @app.command()
    @user_errors
    def merge(
        out: Annotated[Path, typer.Argument(help="The run's output dir, holding (or receiving) every shard.")],
        sources: Annotated[
            list[Path] | None,
            typer.Option("--from", help="Another machine's shard output to copy in first (repeatable)."),
        ] = None,
        license: Annotated[
            str | None,
            typer.Option("--license", help="Card license (Hub id); required where the source's is not known."),
        ] = None,
    ) -> None:
        """Combine the shards of a `--shard i/n` run into one dataset: refinevla.json and the card."""
        from ...schemas.dataset_layout import write_manifest
        from ..shards import gather, merge_manifests, shard_manifests
        from ..writer import tool_version, utc_now

        with hold_output(out, "refine-data " + shlex.join(sys.argv[1:]), flag="merge"):
            if sources:
                gather(out, sources)
            n, manifests = shard_manifests(out)
            manifest = merge_manifests(manifests, utc_now(), tool_version())
            write_manifest(out, manifest)
            _write_card(out, license)
        c = manifest["counts"]
        typer.echo(
            f"merged {n} shards into {out}: {c['episodes']} episodes, {c['steps']} steps, {c['rejected']} rejected, "
            f"${manifest['cost_usd']:.4f}"
        )
