"""`refine-data annotate`: episodes -> teacher -> validated rationales -> `OUT/`.

Thin: parse the flags, wire source, teacher, store, engine and writer, report. The
command is added to the `refine-data` app by `register(app)` (called from `cli.py`).
"""

# No `from __future__ import annotations`: Typer evaluates the option annotations of the command
# defined inside `register`, whose shared types are imported there (locals, not module globals).

import asyncio
import contextlib
import json
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import RefineError

EXIT_INTERRUPTED = 130


@dataclass
class AnnotateArgs:
    """Everything `annotate` was asked to do (the CLI flags, one field each)."""

    source: str
    teacher: str = "rule-based"
    model: str | None = None
    base_url: str | None = None
    out: Path | None = None
    data_dir: str | None = None
    split: str = "train"
    camera: list[str] | None = None
    instruction_key: str | None = None  # layout flags, as for inspect/stats
    state_key: str | None = None
    action_key: str | None = None
    frames: int = 6
    image_size: int = 256
    prompt_template: str = "rationale-v1"
    schema_id: str = "refinevla.rationale/1"
    concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 120.0
    max_attempts: int = 3
    max_retries: int = 6
    retry_base: float = 1.0
    max_cost: float | None = None
    limit: int | None = None
    shard: str = "0/1"
    dry_run: bool = False
    temperature: float = 0.2
    max_tokens: int = 4096
    prices: Path | None = None
    tensor_parallel_size: int = 1
    progress: str = "auto"  # auto | rich | plain | none
    license: str | None = None  # dataset-card license; needed where the source's is not known
    processes: int = 1  # engine processes on this machine, each with a contiguous part of the selection
    argv: list[str] = field(default_factory=list)  # for the resume command


def parse_shard(value: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise RefineError(f"--shard {value!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_range(num_episodes: int, shard: tuple[int, int], limit: int | None) -> tuple[int, int]:
    """Contiguous, deterministic episode range of a shard (like TFDS shards), cut to --limit."""
    i, n = shard
    start, stop = i * num_episodes // n, (i + 1) * num_episodes // n
    if limit is not None:
        stop = min(stop, start + max(0, limit))
    return start, stop


def default_out(source: str, teacher: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rsplit("/", 1)[-1] if ":" in source else source).strip("-")
    return Path("runs") / f"{slug or 'source'}-{teacher}"


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


@dataclass
class RunSetup:
    """What every part of a run shares: the opened source, the selection, the teacher, the limits."""

    source: Any
    start: int
    stop: int
    teacher: Any
    prices: Any
    options: Any
    out: Path
    shard: tuple[int, int]
    suffix: str  # "" for a single shard, "-i-of-n" otherwise: names the store, manifest and rejects

    @property
    def total(self) -> int:
        return self.stop - self.start

    @property
    def store_path(self) -> Path:
        return self.out / ".refine" / f"store{self.suffix}.sqlite"


@dataclass
class PartResult:
    """What one engine run over a range did: the numbers the manifest and the exit code need."""

    counters: dict[str, Any]  # Counters fields (this run)
    statuses: dict[str, int]  # episodes by final status, as written
    reject_reasons: dict[str, int]
    counts: dict[str, int]  # rows written: episodes, steps
    stop_reason: str | None
    seconds: float = 0.0  # how long the engine ran (the rate in the summary line is per this)


def _setup(args: AnnotateArgs) -> RunSetup:
    """Validate flags, open the source, build the teacher and engine options (no request sent)."""
    from .cli import open_cli_source
    from .engine import EngineOptions
    from .pricing import PriceTable
    from .prompts import FrameOptions
    from .teachers import make_teacher

    shard = parse_shard(args.shard)
    for name, value in (
        ("--concurrency", args.concurrency),
        ("--max-attempts", args.max_attempts),
        ("--frames", args.frames),
        ("--processes", args.processes),
    ):
        if value < 1:
            raise RefineError(f"{name} must be at least 1")
    source = open_cli_source(
        args.source,
        args.data_dir,
        args.split,
        args.camera,
        args.instruction_key,
        args.state_key,
        args.action_key,
    )
    start, stop = shard_range(len(source), shard, args.limit)
    teacher = make_teacher(
        args.teacher,
        model=args.model,
        base_url=args.base_url,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        require_key=not args.dry_run,  # a dry run sends nothing: estimate before setting up keys
    )
    prices = PriceTable.load(args.prices)
    options = EngineOptions(
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        max_retries=args.max_retries,
        retry_base=args.retry_base,
        max_cost=args.max_cost,
        schema_id=args.schema_id,
        template=args.prompt_template,
        frames=FrameOptions(count=args.frames, camera=None, max_side=args.image_size),
        expected_completion_tokens=min(args.max_tokens, 1200),
    )
    i, n = shard
    return RunSetup(
        source=source,
        start=start,
        stop=stop,
        teacher=teacher,
        prices=prices,
        options=options,
        out=args.out or default_out(args.source, args.teacher),
        shard=shard,
        suffix="" if n == 1 else f"-{i:05d}-of-{n:05d}",
    )


def run_annotate(args: AnnotateArgs) -> int:
    """Run the command; returns the exit code (0 done, 1 some episodes failed, 130 interrupted)."""
    from .sources import ReadOptions

    setup = _setup(args)
    teacher = setup.teacher
    if teacher.paid and setup.prices.get(teacher.model) is None:
        if args.max_cost is not None:
            raise RefineError(
                f"no price for model {teacher.model!r}, so --max-cost cannot be enforced; "
                'add it with --prices FILE ({"MODEL": {"input": USD_PER_1M, "output": USD_PER_1M}})'
            )
        typer.secho(f"warning: no price for model {teacher.model!r}: cost is not tracked", fg="yellow", err=True)
    if args.dry_run:
        episodes = setup.source.iter_episodes(ReadOptions(start=setup.start, stop=setup.stop))
        return _dry_run(args, teacher, setup.options, setup.prices, episodes, setup.total)

    _check_card_license(setup.out, setup.source.name, args.license)
    if args.processes > 1 and setup.total > 1:
        from .parallel import run_processes

        part = run_processes(args, setup)
    else:
        part = run_part(args, setup, setup.start, setup.stop, setup.out, live_progress=True)
    return _finalize(args, setup, part)


def run_part(
    args: AnnotateArgs,
    setup: RunSetup,
    start: int,
    stop: int,
    rows_root: Path,
    *,
    live_progress: bool,
    stop_signal: int = signal.SIGINT,
    on_counters: Any = None,
) -> PartResult:
    """Annotate episodes [start, stop) into `rows_root`'s Parquet files; answers go to the run's store.

    `stop_signal` is the signal that asks for a clean stop (SIGINT in the foreground process;
    worker processes get theirs from the parent). `on_counters`, when given, is called with the live
    Counters about twice a second (the parent of worker processes aggregates them).
    """
    from dataclasses import asdict

    from .engine import Engine
    from .sources import ReadOptions
    from .store import ResultStore
    from .writer import DatasetWriter

    episodes = setup.source.iter_episodes(ReadOptions(start=start, stop=stop))
    store = ResultStore(setup.store_path)
    writer = DatasetWriter(rows_root, args.schema_id, setup.teacher.name, setup.teacher.model, setup.shard)
    engine = Engine(setup.teacher, store, setup.options, setup.prices, sink=writer.add)
    live = args.progress == "rich" or (args.progress == "auto" and sys.stderr.isatty())
    show = live_progress and args.progress != "none"

    async def report() -> None:
        while True:
            on_counters(engine.counters)
            await asyncio.sleep(0.5)

    async def main() -> None:
        from .progress import show_progress

        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests) / Windows
            loop.add_signal_handler(stop_signal, engine.request_stop, "interrupted")
        tasks = []
        if show:
            tasks.append(asyncio.create_task(show_progress(engine.counters, live)))
        if on_counters is not None:
            tasks.append(asyncio.create_task(report()))
        try:
            await engine.run(episodes, total=stop - start)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(stop_signal)

    try:
        asyncio.run(main())
    finally:
        counts = writer.close()
        store.close()
    counters = asdict(engine.counters)
    seconds = time.monotonic() - counters.pop("started")
    return PartResult(
        counters=counters,
        seconds=seconds,
        statuses=dict(writer.statuses),
        reject_reasons=dict(writer.reject_reasons),
        counts=counts,
        stop_reason=engine.stop_reason,
    )


def _finalize(args: AnnotateArgs, setup: RunSetup, part: PartResult) -> int:
    """Rejects file, manifest and card for the whole run; the summary and the exit code."""
    from ..schemas import schema_digest
    from .engine import Counters
    from .prompts import load_template
    from .store import ResultStore
    from .writer import tool_version, utc_now, write_manifest

    out, source, teacher = setup.out, setup.source, setup.teacher
    i, n = setup.shard
    c = Counters(**part.counters, started=time.monotonic() - part.seconds)  # rates over the run, not from now
    with ResultStore(setup.store_path) as store:
        spend = store.spend()
        rejects = store.rejects()
    with (out / ".refine" / f"rejects{setup.suffix}.jsonl").open("w", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(
                json.dumps(
                    {
                        "episode_id": r.episode_id,
                        "key": r.key,
                        "reason": r.reason,
                        "raw": r.raw,
                        "attempts": r.attempts,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    tmpl = load_template(args.prompt_template)
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
        },
        "selection": {"shard": f"{i}/{n}", "start": setup.start, "stop": setup.stop, "limit": args.limit},
        "teacher": {
            "name": teacher.name,
            "model": teacher.model,
            "sampling": teacher.sampling(),
            "base_url": getattr(teacher, "base_url", None),
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
        "schema": {"id": args.schema_id, "sha256": schema_digest(args.schema_id)},
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
            "processes": args.processes,
        },
        "complete": part.stop_reason is None and c.failed == 0,
        "stop_reason": part.stop_reason,
    }
    write_manifest(out, manifest, "refinevla.json" if n == 1 else f".refine/manifest{setup.suffix}.json")
    if n == 1:
        _write_card(out, args.license)
    else:
        typer.echo(f"shard {i}/{n} written; once all {n} shards are in {out}, run: refine-data merge {out}", err=True)
    from .progress import summary_line

    typer.echo(summary_line(c), err=True)
    typer.echo(f"wrote {out}: {counts['episodes']} episodes, {counts['steps']} steps, {len(rejects)} rejected")
    resume = "refine-data " + shlex.join(args.argv) if args.argv else "the same command"
    if part.stop_reason == "interrupted":
        typer.secho(f"interrupted; answers so far are stored. Resume with: {resume}", fg="yellow", err=True)
        return EXIT_INTERRUPTED
    if part.stop_reason == "max-cost":
        typer.secho(
            f"stopped: --max-cost ${args.max_cost} reached (spent ${spend.cost:.4f} in all); "
            f"{setup.total - counts['episodes'] - rejected} episodes not annotated. "
            "Raise --max-cost and rerun to continue.",
            fg="yellow",
            err=True,
        )
        return 0
    if c.failed:
        typer.secho(
            f"{c.failed} episodes failed on transient errors (rate limits, timeouts); rerun to retry them: {resume}",
            fg="yellow",
            err=True,
        )
        return 1
    return 0


def _check_card_license(out: Path, dataset: str, license: str | None) -> None:
    """Fail before anything is paid for if the run's card could not be written at the end.

    The same resolution the card uses (--license, else the card already in OUT, else the source's).
    """
    from ..datacards.render import CardError, resolve_license

    try:
        resolve_license(out, {"source": {"dataset": dataset}}, license)
    except CardError as exc:
        raise RefineError(f"{exc} (the dataset card needs one)") from None


def _write_card(out: Path, license: str | None) -> None:
    from ..datacards.render import CardError, write_card

    try:
        path = write_card(out, license=license)
    except CardError as exc:
        raise RefineError(f"{out}: dataset card not written: {exc}") from None
    typer.echo(f"wrote {path}")


def _dry_run(args: AnnotateArgs, teacher: Any, options: Any, prices: Any, episodes: Any, total: int) -> int:
    """Print the first request and an estimate of tokens and cost for the whole selection."""
    from .engine import Engine, estimate_prompt_tokens
    from .store import ResultStore

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
        "response_format": engine.response_format,
        **teacher.sampling(),
    }
    typer.echo(json.dumps({"request_key": first.key, "episode_id": first.episode_id, "request": body}, indent=2))
    prompt = sum(estimate_prompt_tokens(p.bundle.messages) for p in sampled) / len(sampled)
    completion = options.expected_completion_tokens
    per = prices.cost(teacher.model, int(prompt), completion)
    typer.echo(
        f"estimate for {total} episodes with {teacher.name} ({teacher.model}): "
        f"~{int(prompt * total):,} prompt + ~{completion * total:,} completion tokens, "
        f"~${per * total:,.2f} (first ask only; re-asks add to it)"
    )
    return 0


def register(app: typer.Typer) -> None:
    """Add the `annotate` command to a Typer app (the `refine-data` app in `cli.py`)."""
    from .cli import (
        ActionKeyOpt,
        CameraOpt,
        DataDirOpt,
        InstructionKeyOpt,
        SourceArg,
        SplitOpt,
        StateKeyOpt,
        user_errors,
    )

    @app.command()
    @user_errors
    def annotate(
        source: SourceArg,
        teacher: Annotated[
            str, typer.Option("--teacher", help="rule-based | gemini | openai | openai-compatible | vllm.")
        ] = "rule-based",
        model: Annotated[str | None, typer.Option("--model", help="Model id (default per teacher).")] = None,
        base_url: Annotated[
            str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
        ] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Output dir (default runs/<source>-<teacher>).")] = None,
        data_dir: DataDirOpt = None,
        split: SplitOpt = "train",
        camera: CameraOpt = None,
        instruction_key: InstructionKeyOpt = None,
        state_key: StateKeyOpt = None,
        action_key: ActionKeyOpt = None,
        frames: Annotated[int, typer.Option("--frames", help="K evenly spaced keyframes (+ gripper events).")] = 6,
        image_size: Annotated[int, typer.Option("--image-size", help="Longest keyframe side in pixels.")] = 256,
        prompt_template: Annotated[str, typer.Option("--prompt-template", help="Prompt template version.")] = (
            "rationale-v1"
        ),
        concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight at most.")] = 16,
        rpm: Annotated[float | None, typer.Option("--rpm", help="Requests per minute limit.")] = None,
        tpm: Annotated[float | None, typer.Option("--tpm", help="Tokens per minute limit.")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request.")] = 120.0,
        max_attempts: Annotated[
            int, typer.Option("--max-attempts", help="Answers per episode (ask + re-asks with the errors).")
        ] = 3,
        max_retries: Annotated[
            int, typer.Option("--max-retries", help="Retries per ask on 429/5xx/timeouts (never on a 400).")
        ] = 6,
        retry_base: Annotated[float, typer.Option("--retry-base", help="First backoff in seconds (doubles).")] = 1.0,
        max_cost: Annotated[float | None, typer.Option("--max-cost", help="Stop cleanly at this spend (USD).")] = None,
        limit: Annotated[int | None, typer.Option("--limit", help="At most N episodes (of this shard).")] = None,
        shard: Annotated[str, typer.Option("--shard", help="i/n: this machine's contiguous part.")] = "0/1",
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the first request and a token/cost estimate; ask nothing.")
        ] = False,
        temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.2,
        max_tokens: Annotated[int, typer.Option("--max-tokens", help="Completion token limit.")] = 4096,
        prices: Annotated[
            Path | None, typer.Option("--prices", help="JSON price table overriding the packaged one.")
        ] = None,
        tensor_parallel_size: Annotated[
            int, typer.Option("--tensor-parallel-size", help="GPUs for --teacher vllm.")
        ] = 1,
        progress: Annotated[str, typer.Option("--progress", help="auto | rich | plain | none.")] = "auto",
        license: Annotated[
            str | None,
            typer.Option("--license", help="Card license (Hub id); required where the source's is not known."),
        ] = None,
        processes: Annotated[
            int,
            typer.Option(
                "--processes", help="Engine processes on this machine (for fast local servers; limits are shared)."
            ),
        ] = 1,
    ) -> None:
        """Annotate episodes with ReFineVLA rationales (resumable; a rerun never pays twice)."""
        code = run_annotate(
            AnnotateArgs(
                source=source,
                teacher=teacher,
                model=model,
                base_url=base_url,
                out=out,
                data_dir=data_dir,
                split=split,
                camera=camera,
                instruction_key=instruction_key,
                state_key=state_key,
                action_key=action_key,
                frames=frames,
                image_size=image_size,
                prompt_template=prompt_template,
                concurrency=concurrency,
                rpm=rpm,
                tpm=tpm,
                timeout=timeout,
                max_attempts=max_attempts,
                max_retries=max_retries,
                retry_base=retry_base,
                max_cost=max_cost,
                limit=limit,
                shard=shard,
                dry_run=dry_run,
                temperature=temperature,
                max_tokens=max_tokens,
                prices=prices,
                tensor_parallel_size=tensor_parallel_size,
                progress=progress,
                license=license,
                processes=processes,
                argv=sys.argv[1:],
            )
        )
        if code:
            raise typer.Exit(code)

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
        from .shards import gather, merge_manifests, shard_manifests
        from .writer import tool_version, utc_now, write_manifest

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
