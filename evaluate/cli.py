"""`refine-eval`: run a refine-train checkpoint in SimplerEnv, report it beside the published
baselines, and look at where its action and rationale tokens attend.

torch, transformers, the simulators and matplotlib are imported inside the commands, so
`--help` is instant. Bad input ends in one red line and exit status 1 (Ctrl-C: 130), as in
`refine-data` and `refine-train`; a Ctrl-C'd run keeps every finished episode and the same
command continues it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..annotate.cli_options import Flags, options_from
from ..annotate.exits import user_errors
from ..annotate.source_args import split_keys
from ..annotate.viewer import (
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
from ..train.policy import TRUST_REMOTE_CODE
from .config import DEVICE, POLICY, REASONING, DemosArgs, OnOff, RunArgs

app = typer.Typer(
    name="refine-eval",
    add_completion=False,
    no_args_is_help=True,
    help="Benchmark refine-train policies in SimplerEnv (WidowX on ManiSkill3, Google Robot on the original "
    "SimplerEnv), report success beside the published baselines, and draw attention maps.",
)


PolicyOpt = Annotated[Path, POLICY.parameter_info("policy")]
ReasoningOpt = Annotated[OnOff, REASONING.parameter_info("reasoning")]
DeviceOpt = Annotated[str | None, DEVICE.parameter_info("device")]
TrustOpt = Annotated[bool, TRUST_REMOTE_CODE.parameter_info("trust_remote_code")]


@app.command()
@user_errors
@options_from(RunArgs)
def run(
    flags: Flags,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write report.md + report.png at the end.")
    ] = True,
) -> None:
    """Run a policy through a suite's tasks; a rerun into the same --out continues where it stopped."""
    args = RunArgs(**flags)
    if args.backend == "ray":
        from .ray_backend import run_on_ray as run_eval
    else:
        from .runner import run_eval
    try:
        summary = run_eval(args, progress=typer.echo)
    except KeyboardInterrupt:
        typer.secho(f"stopped; finished episodes are in {args.out}. Run the same command again to continue.", err=True)
        raise
    typer.echo(f"{summary.done} episodes run, {summary.skipped} already done; results in {args.out}")
    for task, (successes, trials) in summary.per_task.items():
        typer.echo(f"  {task}: {successes}/{trials} success ({100.0 * successes / trials:.1f}%)")
    if summary.forced_tags:
        typer.echo(f"  {summary.forced_tags} policy steps hit --max-rationale-tokens (ACTION: was forced)")
    if report:
        from .report import write_report

        files = write_report([args.out])
        typer.echo(f"report: {files.markdown}, {files.chart}")


@app.command()
@user_errors
@options_from(DemosArgs)
def demos(flags: Flags) -> None:
    """Scripted demonstrations, kept when they succeed: WidowX scenes as Bridge-layout RLDS, LIBERO's as LeRobot v3."""
    from .demos import record_demos
    from .errors import EvalError

    args = DemosArgs(**flags)
    if args.suite == "libero":
        from .libero_demos import record_libero_demos

        if args.video:
            raise EvalError("--video: LIBERO demos keep their frames in the dataset itself (observation.images.*)")
        tries, kept_per_task = record_libero_demos(
            args.suite, args.tasks, args.episodes, args.out, args.seed, args.resolution, progress=typer.echo
        )
        for task, n in tries.items():
            k = kept_per_task.get(task, 0)
            typer.echo(f"  {task}: {k}/{n} tries kept ({100.0 * k / n:.1f}%)")
        typer.echo(f"wrote {args.out}: {sum(kept_per_task.values())} episodes (read it as lerobot:{args.out})")
        return
    summary = record_demos(
        args.suite,
        args.tasks,
        args.episodes,
        args.out,
        seed=args.seed,
        noise=args.noise,
        video=args.video,
        progress=typer.echo,
    )
    for task, tried in summary.tried.items():
        kept = summary.kept.get(task, 0)
        typer.echo(f"  {task}: {kept}/{tried} tries kept ({100.0 * kept / tried:.1f}%)")
    typer.echo(f"wrote {args.out}: {sum(summary.kept.values())} episodes (read it as rlds:{args.out})")


@app.command("report")
@user_errors
def report_command(
    results: Annotated[list[Path], typer.Argument(help="One or more results folders (one column each).")],
    baselines: Annotated[
        list[Path] | None,
        typer.Option("--baselines", help="Extra baselines CSV (suite,task,metric,model,value); repeatable."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where report.md and report.png go; default RESULTS.")
    ] = None,
) -> None:
    """Markdown table + bar chart: each run with n and a Wilson 95% interval, beside the published numbers."""
    from .report import write_report

    files = write_report(results, baselines or [], out)
    typer.echo(files.markdown.read_text(encoding="utf-8"))
    typer.echo(f"wrote {files.markdown} and {files.chart}")


@app.command()
@user_errors
def attention(
    policy: PolicyOpt,
    image: Annotated[Path, typer.Option("--image", help="The frame (PNG/JPEG), resized as the policy sees it.")],
    instruction: Annotated[str, typer.Option("--instruction", help="The task instruction.")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write: the frame with each attention map overlaid.")],
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Comma-separated decoder layer indices to average (negative from the top); default all."
        ),
    ] = None,
    reasoning: ReasoningOpt = OnOff.on,
    max_rationale_tokens: Annotated[
        int, typer.Option("--max-rationale-tokens", help="Rationale budget; then ACTION: is forced.")
    ] = 64,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Attention from the action tokens (and, separately, the rationale tokens) to the image patches."""
    from .attention import run_attention
    from .errors import EvalError

    try:
        chosen = [int(x) for x in split_keys(layers)] or None
    except ValueError:
        raise EvalError(f"--layers {layers!r}: expected comma-separated integers such as 0,-1") from None
    maps = run_attention(
        policy, image, instruction, out, chosen, reasoning is OnOff.on, device, max_rationale_tokens, trust_remote_code
    )
    typer.echo(f"wrote {out} (layers {', '.join(str(i) for i in maps.layers)})")


@app.command("view")
@user_errors
def view_command(
    results: Annotated[Path, typer.Argument(help="A refine-eval results folder.")],
    episodes: Annotated[
        str | None,
        typer.Option("--episodes", help="Episode index range START:STOP (episodes.jsonl order; default all)."),
    ] = None,
    save: SaveOpt = None,
    frames: Annotated[
        bool, typer.Option("--frames", help="Require the frames (every selected episode run with --video).")
    ] = False,
    serve: ServeOpt = False,
    port: PortOpt = WEB_PORT,
    grpc_port: GrpcPortOpt = GRPC_PORT,
    bind: BindOpt = LOOPBACK,
) -> None:
    """Each evaluated episode in Rerun: frames, the policy's rationale every step, raw and env actions, the outcome."""
    from .view import view_results

    target = ViewTarget(save, serve, port, grpc_port, bind).checked()
    raise typer.Exit(report_and_serve(view_results(results, episodes, target, frames), target))


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
