"""`refine-eval`: run a refine-train checkpoint in SimplerEnv, report it beside the published
baselines, and look at where its action and rationale tokens attend.

torch, transformers, the simulators and matplotlib are imported inside the commands, so
`--help` is instant. Bad input ends in one red line and exit status 1 (Ctrl-C: 130), as in
`refine-data` and `refine-train`; a Ctrl-C'd run keeps every finished episode and the same
command continues it.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..annotate.cli import split_keys
from ..annotate.exits import user_errors

app = typer.Typer(
    name="refine-eval",
    add_completion=False,
    no_args_is_help=True,
    help="Benchmark refine-train policies in SimplerEnv (WidowX on ManiSkill3, Google Robot on the original "
    "SimplerEnv), report success beside the published baselines, and draw attention maps.",
)


class OnOff(str, Enum):
    on = "on"
    off = "off"


PolicyOpt = Annotated[Path, typer.Option("--policy", help="refine-train checkpoint folder (refinevla_policy.json).")]
ReasoningOpt = Annotated[
    OnOff,
    typer.Option("--reasoning", help="on: the policy writes its rationale, then the action; off: the action only."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device of the policy; default cuda if there.")]


@app.command()
@user_errors  # type: ignore[untyped-decorator]  # mypy reads evaluate/ as its own top level
def run(
    policy: PolicyOpt,
    suite: Annotated[
        str, typer.Option("--suite", help="widowx | google-vm | google-va | maniskill:ENV_ID (any ManiSkill3 task).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Results folder (episodes.jsonl, run.json, videos/).")],
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="Comma-separated task names (carrot_on_plate, pick_coke_can, ...); default all."),
    ] = None,
    episodes_per_config: Annotated[
        int, typer.Option("--episodes-per-config", help="Episodes per built-in task configuration (new seed each).")
    ] = 1,
    max_episodes: Annotated[
        int | None, typer.Option("--max-episodes", help="Per task, run at most the first N episodes of the schedule.")
    ] = None,
    num_envs: Annotated[
        int,
        typer.Option(
            "--num-envs",
            help="Parallel envs, one policy forward pass for all (GPU: one scene batch; CPU: one process each).",
        ),
    ] = 1,
    reasoning: ReasoningOpt = OnOff.on,
    max_rationale_tokens: Annotated[
        int, typer.Option("--max-rationale-tokens", help="Rationale budget per step; then ACTION: is forced.")
    ] = 256,
    video: Annotated[bool, typer.Option("--video", help="Write an mp4 per episode under videos/.")] = False,
    log_actions: Annotated[
        bool, typer.Option("--log-actions", help="Keep each step's raw_action and env_action in episodes.jsonl.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Base seed of the env resets.")] = 0,
    instruction: Annotated[
        str | None, typer.Option("--instruction", help="maniskill:ENV_ID: the instruction given to the policy.")
    ] = None,
    sim_backend: Annotated[
        str | None,
        typer.Option("--sim-backend", help="ManiSkill3 physics: cpu | gpu (default gpu when CUDA is there)."),
    ] = None,
    camera: Annotated[
        str | None, typer.Option("--camera", help="maniskill:ENV_ID: the camera the policy sees (default the first).")
    ] = None,
    control_mode: Annotated[
        str | None,
        typer.Option("--control-mode", help="maniskill:ENV_ID: a 7-d controller (default pd_ee_delta_pose)."),
    ] = None,
    robot: Annotated[
        str | None, typer.Option("--robot", help="Override the checkpoint's robot conventions: widowx | google_robot.")
    ] = None,
    device: DeviceOpt = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write report.md + report.png at the end.")
    ] = True,
) -> None:
    """Run a policy through a suite's tasks; a rerun into the same --out continues where it stopped."""
    from .runner import RunArgs, run_eval

    args = RunArgs(
        policy=policy,
        suite=suite,
        out=out,
        tasks=list(split_keys(tasks)) or None,
        episodes_per_config=episodes_per_config,
        max_episodes=max_episodes,
        num_envs=num_envs,
        reasoning=reasoning is OnOff.on,
        max_rationale_tokens=max_rationale_tokens,
        video=video,
        log_actions=log_actions,
        seed=seed,
        instruction=instruction,
        sim_backend=sim_backend,
        camera=camera,
        control_mode=control_mode,
        robot=robot,
        device=device,
    )
    try:
        summary = run_eval(args, progress=typer.echo)
    except KeyboardInterrupt:
        typer.secho(f"stopped; finished episodes are in {out}. Run the same command again to continue.", err=True)
        raise
    typer.echo(f"{summary.done} episodes run, {summary.skipped} already done; results in {out}")
    for task, (successes, trials) in summary.per_task.items():
        typer.echo(f"  {task}: {successes}/{trials} success ({100.0 * successes / trials:.1f}%)")
    if summary.forced_tags:
        typer.echo(f"  {summary.forced_tags} policy steps hit --max-rationale-tokens (ACTION: was forced)")
    if report:
        from .report import write_report

        files = write_report([out])
        typer.echo(f"report: {files.markdown}, {files.chart}")


@app.command("report")
@user_errors  # type: ignore[untyped-decorator]  # mypy reads evaluate/ as its own top level
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
@user_errors  # type: ignore[untyped-decorator]  # mypy reads evaluate/ as its own top level
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
) -> None:
    """Attention from the action tokens (and, separately, the rationale tokens) to the image patches."""
    from .attention import run_attention
    from .errors import EvalError

    try:
        chosen = [int(x) for x in split_keys(layers)] or None
    except ValueError:
        raise EvalError(f"--layers {layers!r}: expected comma-separated integers such as 0,-1") from None
    maps = run_attention(policy, image, instruction, out, chosen, reasoning is OnOff.on, device, max_rationale_tokens)
    typer.echo(f"wrote {out} (layers {', '.join(str(i) for i in maps.layers)})")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
