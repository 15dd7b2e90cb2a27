"""`refine-eval run`: a checkpoint through a suite's tasks, one durable line per finished episode.

Per task the schedule is every (configuration, repeat) pair — configuration = the task's own
episode id, repeat < --episodes-per-config — minus the ones `episodes.jsonl` already holds, cut
to --max-episodes. Episodes run in batches of --num-envs, in lock step, with one forward pass of
the policy per step for the whole batch. A killed run loses at most the batch in progress; a
rerun does only what is missing. A rerun into a folder made with another checkpoint, backend,
reasoning mode or asset digest is refused, so numbers made on different setups never mix.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.outputs import hold_output
from .backends.base import Simulator
from .config import RunArgs
from .demos import DemoPairs, read_demo_pairs
from .errors import EvalError
from .policy import PolicySetup, RefinePolicy
from .replay import ReplayPolicy, is_replay
from .results import (
    RESULTS_FORMAT,
    RUN_FILE,
    EpisodeLog,
    EpisodeResult,
    episode_key,
    read_episodes,
    read_run,
    write_run,
)
from .robots import flat_env_action
from .suites import SUITE_ROBOTS, Task, scene_key, suite_tasks
from .zero import ZeroPolicy, is_zero

# run.json fields that must agree between a results folder and a rerun into it
# (--episodes-per-config may grow: repeat r of config c keeps its seed, so earlier episodes stay valid)
SAME_RUN = (
    "policy_digest",
    "reasoning",
    "seed",
    "max_rationale_tokens",
    "episodes_from",
    "held_out_from",
    "max_steps",
    "resolution",
)
Policy = RefinePolicy | ReplayPolicy | ZeroPolicy  # what acts in an episode
Setup = PolicySetup | ReplayPolicy | ZeroPolicy  # what run.json describes (no weights loaded)


@dataclass
class RunSummary:
    done: int = 0  # episodes finished in this invocation
    skipped: int = 0  # already in episodes.jsonl
    per_task: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (successes, episodes), all so far
    forced_tags: int = 0  # policy steps whose rationale hit the budget


def make_simulator(task: Task, args: RunArgs) -> Simulator:
    if task.backend == "libero":
        from .backends.libero import make_libero

        task_id = int(task.name.rsplit("/", 1)[1])
        return make_libero(task.suite, task_id, args.num_envs, args.resolution, args.max_steps)
    if task.backend == "maniskill3":
        from .backends.maniskill import make_maniskill

        return make_maniskill(
            task.env_id, args.num_envs, args.sim_backend, args.camera, args.control_mode, max_steps=args.max_steps
        )
    from .backends.simpler import make_simpler

    return make_simpler(task, args.num_envs, max_steps=args.max_steps)


def preflight(task: Task) -> None:
    """Raise EvalError naming what to install or download if the task's backend or assets are missing."""
    if task.backend == "maniskill3":
        from .backends.maniskill import check_assets

        check_assets(task.env_id)
    elif task.backend == "libero":
        from .backends.libero import import_libero

        import_libero()
    else:
        from .backends.simpler import import_simpler

        import_simpler()


Planned = tuple[int, int, int]  # (configuration, repeat, reset seed) of one episode


def schedule(
    task: Task, n_configs: int, args: RunArgs, done: set[str], demos: DemoPairs | None = None
) -> tuple[list[Planned], int]:
    """(the episodes still to run, how many of the first --max-episodes are done).

    By default every configuration `--episodes-per-config` times, repeat r of config c with seed
    `--seed + r * n_configs + c`. `--episodes-from`: exactly the demos' (configuration, seed) pairs of this
    task (repeat = the pair's rank among its configuration's seeds). `--held-out-from`: the default
    schedule without the configurations the demos hold — a configuration fixes the objects' placement,
    so another seed of a seen configuration would not be held out.
    """
    pairs: list[Planned] = [
        (c, r, args.seed + r * n_configs + c) for r in range(args.episodes_per_config) for c in range(n_configs)
    ]
    if demos is not None and args.episodes_from is not None:
        seen = demos.pairs(scene_key(task))
        pairs = [(c, [s for cc, s in seen if cc == c].index(s), s) for c, s in seen]
    elif demos is not None:
        configs = {c for c, _ in demos.pairs(scene_key(task))}
        pairs = [p for p in pairs if p[0] not in configs]
    if args.max_episodes is not None:
        pairs = pairs[: args.max_episodes]
    todo = [p for p in pairs if episode_key(task.suite, task.name, p[0], p[1]) not in done]
    return todo, len(pairs) - len(todo)


def check_same_run(out: Path, run: dict[str, Any]) -> None:
    if not (out / RUN_FILE).is_file():
        return
    old = read_run(out)
    for key in SAME_RUN:
        if old.get(key) != run.get(key):
            raise EvalError(
                f"{out}: made with {key}={old.get(key)!r}, this run has {run.get(key)!r}; "
                "use another --out (results of different setups are never mixed)"
            )


def check_same_assets(out: Path, task: Task, description: dict[str, Any]) -> None:
    """Per backend: the asset digest recorded the first time must match."""
    run = read_run(out)
    sims = run.setdefault("simulators", {})
    key = f"{description['backend']}:{scene_key(task)}"  # LIBERO's by SUITE/ID: LIBERO-PRO reuses task names
    old = sims.get(key)
    if old is not None and old.get("assets", {}).get("digest") != description.get("assets", {}).get("digest"):
        raise EvalError(
            f"{out}: {task.env_id} was evaluated on assets {old['assets'].get('digest')} ({old['assets'].get('dir')}), "
            f"this run finds {description['assets'].get('digest')} ({description['assets'].get('dir')}); "
            "use another --out"
        )
    sims[key] = description
    write_run(out, run)


def run_eval(args: RunArgs, progress: Callable[[str], None] = print) -> RunSummary:
    """The run on this machine (`--backend ray` is `ray_backend.run_on_ray`'s, which `refine-eval run` calls)."""
    if args.backend == "ray":
        raise EvalError("run_eval runs on this machine; --backend ray runs through ray_backend.run_on_ray")
    tasks, demos = checked_run(args)
    with holding(args):  # before minutes of model loading, too
        return _run_held(args, tasks, progress, demos)


def checked_run(args: RunArgs) -> tuple[list[Task], DemoPairs | None]:
    """The run's tasks and demos, every flag checked (and, on this machine, the simulator and its assets)."""
    tasks = suite_tasks(args.suite, args.tasks)
    if args.suite.startswith("maniskill:") and not args.instruction:
        raise EvalError(f"--suite {args.suite}: give the policy's instruction with --instruction TEXT")
    for name, value in (("--num-envs", args.num_envs), ("--episodes-per-config", args.episodes_per_config)):
        if value < 1:
            raise EvalError(f"{name} {value}: must be at least 1")
    if args.video_rationale and not args.video:
        raise EvalError("--video-rationale writes the rationale under the frames of --video: give both")
    check_backend_flags(args)
    check_policy_robot(args)  # before any simulator or weights load
    demos = selected_demos(args, tasks)  # a wrong folder is one line before the simulator's imports (~3 s)
    if args.backend == "local":  # on Ray each node the workers may run on is checked (ray_backend)
        for task in tasks:
            preflight(task)  # a missing simulator or asset is reported before minutes of model loading
    return tasks, demos


def holding(args: RunArgs) -> contextlib.AbstractContextManager[Path]:
    """The lock on --out for the run (one run per results folder)."""
    command = "refine-eval " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "refine-eval run"
    return hold_output(Path(args.out), command)


def check_backend_flags(args: RunArgs) -> None:
    if args.backend not in ("local", "ray"):
        raise EvalError(f"--backend must be local or ray, not {args.backend!r}")
    counts = {
        "--workers": args.workers,
        "--cpus-per-worker": args.cpus_per_worker,
        "--gpus-per-worker": args.gpus_per_worker,
        "--placement-timeout": args.placement_timeout,
    }
    if args.backend == "local":
        given = [name for name, value in {**counts, "--ray-address": args.ray_address}.items() if value is not None]
        if given:
            raise EvalError(f"{', '.join(given)}: need --backend ray")
        return
    least = {"--workers": 1, "--cpus-per-worker": 1, "--gpus-per-worker": 0}  # a worker runs its envs on CPUs
    for name, value in counts.items():
        if value is not None and name in least and value < least[name]:
            raise EvalError(f"{name} {value:g}: must be at least {least[name]}")
    if args.placement_timeout is not None and not args.placement_timeout > 0:
        raise EvalError(f"--placement-timeout {args.placement_timeout:g}: must be more than 0 seconds")


def selected_demos(args: RunArgs, tasks: list[Task]) -> DemoPairs | None:
    """The demos folder of --episodes-from / --held-out-from (read and checked), or None."""
    if args.episodes_from is not None and args.held_out_from is not None:
        raise EvalError("--episodes-from runs a demos folder's scenes, --held-out-from the others: give one")
    folder, flag = (
        (args.episodes_from, "--episodes-from") if args.episodes_from else (args.held_out_from, "--held-out-from")
    )
    if folder is None:
        return None
    demos = read_demo_pairs(Path(folder), flag)
    if not any(demos.pairs(scene_key(task)) for task in tasks):
        held = ", ".join(sorted(demos.by_env)) or "none"
        wanted = ", ".join(scene_key(t) for t in tasks)
        raise EvalError(f"{flag} {folder}: holds no episode of {wanted} (it holds: {held})")
    return demos


def policy_setup(args: RunArgs) -> Setup:
    """What the run evaluates, without loading weights (a replay or the zero policy is its own setup: it
    holds no model). Refused in one line when the policy drives another robot than the suite's."""
    setup: Setup
    if is_zero(args.policy):
        setup = ZeroPolicy(args.policy, args.robot or SUITE_ROBOTS.get(args.suite))
    elif is_replay(args.policy):
        setup = ReplayPolicy(args.policy, args.robot)
    else:
        setup = PolicySetup(args.policy, args.robot, args.reasoning, args.max_rationale_tokens)
    refuse_other_robot(args, setup.robot)
    return setup


def check_policy_robot(args: RunArgs) -> None:
    """A policy for another robot than the suite's is refused from its description alone (a replay's robot
    is its demos folder's: `policy_setup` checks it as the folder loads)."""
    if is_replay(args.policy) or args.suite not in SUITE_ROBOTS:
        return
    from ..train.policy import is_policy, read_policy_info

    robot: object = args.robot
    if robot is None and is_zero(args.policy):
        robot = SUITE_ROBOTS[args.suite]
    elif robot is None and is_policy(Path(args.policy)):
        robot = read_policy_info(Path(args.policy)).get("robot")
    if robot is not None:  # no checkpoint there, or one naming no robot: refused with its own message as it loads
        refuse_other_robot(args, str(robot))


def refuse_other_robot(args: RunArgs, robot: str) -> None:
    suite_robot = SUITE_ROBOTS.get(args.suite)
    if suite_robot is not None and robot != suite_robot:
        raise EvalError(
            f"--policy {args.policy} drives {robot} (its training data's conventions); "
            f"--suite {args.suite} needs a {suite_robot} policy"
        )


def load_policy(args: RunArgs, setup: Setup | None = None) -> Policy:
    """The policy that acts: `setup` itself for a replay or the zero policy, else the checkpoint's weights."""
    if isinstance(setup, ReplayPolicy | ZeroPolicy):
        return setup
    if is_zero(args.policy) or is_replay(args.policy):
        acting = policy_setup(args)  # these setups are their own policy
        assert isinstance(acting, ReplayPolicy | ZeroPolicy)
        return acting
    return RefinePolicy(
        args.policy, args.robot, args.reasoning, args.max_rationale_tokens, args.device, args.trust_remote_code
    )


def run_fields(args: RunArgs, setup: Setup) -> dict[str, Any]:
    """run.json's description of this run (what `check_same_run` compares with the folder's)."""
    budget = setup.max_rationale_tokens if isinstance(setup, PolicySetup) and setup.reasoning else None
    return {
        "format": RESULTS_FORMAT,
        "policy": setup.describe(),
        "policy_digest": setup.digest(),
        "suite": args.suite,
        "reasoning": setup.reasoning,
        "seed": args.seed,
        "episodes_per_config": args.episodes_per_config,
        "max_rationale_tokens": budget,
        "episodes_from": str(args.episodes_from) if args.episodes_from else None,
        "held_out_from": str(args.held_out_from) if args.held_out_from else None,
        "max_steps": args.max_steps,
        "resolution": args.resolution,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def start_results(out: Path, run: dict[str, Any]) -> EpisodeLog:
    """Write run.json (keeping the folder's creation time and simulators) and open episodes.jsonl."""
    if (out / RUN_FILE).is_file():
        old = read_run(out)
        run = {**run, "created": old.get("created"), "simulators": old.get("simulators", {})}
    write_run(out, run)
    return EpisodeLog(out)


def open_task(
    task: Task,
    n_configs: int,
    description: dict[str, Any],
    args: RunArgs,
    log: EpisodeLog,
    demos: DemoPairs | None,
    summary: RunSummary,
    progress: Callable[[str], None],
) -> list[Planned]:
    """A task's simulator is up: check and record its assets, and return its episodes still to run."""
    check_same_assets(args.out, task, description)
    _record_run_fields(args.out, description)
    todo, already = schedule(task, n_configs, args, log.done, demos)
    summary.skipped += already
    progress(f"{task.name} ({task.env_id}): {len(todo)} episodes to run, {already} already done")
    return todo


def record_episode(
    log: EpisodeLog, result: EpisodeResult, summary: RunSummary, progress: Callable[[str], None]
) -> None:
    """One finished episode: its durable line in episodes.jsonl, then its progress line."""
    log.append(result)
    summary.done += 1
    progress(
        f"  {result.task} config {result.config} repeat {result.repeat}: "
        f"{'success' if result.success else 'failure'}"
        + (f", grasp {result.grasp}" if result.grasp is not None else "")
        + f" ({result.steps} steps, {result.wall_s:.1f} s)"
    )


def tally(out: Path, summary: RunSummary) -> RunSummary:
    """Successes and episodes per task, over every episode of the folder so far."""
    for rec in read_episodes(out):
        s, n = summary.per_task.get(rec["task"], (0, 0))
        summary.per_task[rec["task"]] = (s + int(rec["success"]), n + 1)
    return summary


def settled(
    args: RunArgs, tasks: list[Task], demos: DemoPairs | None, progress: Callable[[str], None]
) -> RunSummary | None:
    """The summary of a run with nothing left to run, known from the results folder alone; else None.

    A rerun of a finished run (to print its summary, or a loop over checkpoints run again) then loads
    neither the policy nor a simulator, nor starts Ray workers: each task's configuration count is the
    one run.json recorded when its simulator first opened (`simulators`), so the schedule is the same.
    A task never opened, or one with an episode still missing, is None: the run proper decides.
    """
    if not (args.out / RUN_FILE).is_file():
        return None
    # keyed "BACKEND:SCENE" as check_same_assets records them
    recorded = {key.split(":", 1)[-1]: sim for key, sim in read_run(args.out).get("simulators", {}).items()}
    done = {episode_key(r["suite"], r["task"], r["config"], r["repeat"]) for r in read_episodes(args.out)}
    summary, lines = RunSummary(), []
    for task in tasks:
        n_configs = recorded.get(scene_key(task), {}).get("n_configs")
        if not isinstance(n_configs, int):
            return None
        todo, already = schedule(task, n_configs, args, done, demos)
        if todo:
            return None
        summary.skipped += already
        lines.append(f"{task.name} ({task.env_id}): 0 episodes to run, {already} already done")
    for line in lines:
        progress(line)
    return tally(args.out, summary)


def _run_held(
    args: RunArgs, tasks: list[Task], progress: Callable[[str], None], demos: DemoPairs | None = None
) -> RunSummary:
    """The run proper, while this process holds --out."""
    setup = policy_setup(args)
    run = run_fields(args, setup)
    check_same_run(args.out, run)  # before minutes of model loading
    finished = settled(args, tasks, demos, progress)
    if finished is not None:
        return finished
    policy = load_policy(args, setup)
    if isinstance(setup, PolicySetup) and setup.budget_warning:
        progress(f"warning: {setup.budget_warning}")
    log = start_results(args.out, run)
    summary = RunSummary()
    for task in tasks:
        sim = make_simulator(task, args)
        try:
            todo = open_task(task, sim.n_configs, sim.description, args, log, demos, summary, progress)
            for start in range(0, len(todo), sim.n_envs):
                batch = todo[start : start + sim.n_envs]
                for result in run_batch(sim, policy, task, batch, args, summary):
                    record_episode(log, result, summary, progress)
        finally:
            sim.close()
    return tally(args.out, summary)


def _record_run_fields(out: Path, description: dict[str, Any]) -> None:
    """run.json's top-level backend / versions / assets (the report prints them)."""
    run = read_run(out)
    run["backend"] = description["backend"]
    if "mujoco_gl" in description:  # LIBERO: the GL backend MuJoCo rendered with (egl / osmesa)
        run["mujoco_gl"] = description["mujoco_gl"]
    run["versions"] = {**run.get("versions", {}), **description.get("versions", {})}
    run["assets"] = description.get("assets", {})
    write_run(out, run)


def run_batch(
    sim: Simulator,
    policy: Policy,
    task: Task,
    batch: Sequence[Planned],
    args: RunArgs,
    summary: RunSummary,
) -> list[EpisodeResult]:
    """Run len(batch) episodes in lock step (padded to the sim's n_envs; the padding is dropped)."""
    n = len(batch)
    padded = list(batch) + [batch[-1]] * (sim.n_envs - n)
    configs = [c for c, _, _ in padded]
    seeds = [s for _, _, s in padded]
    t0 = time.monotonic()
    if isinstance(policy, ReplayPolicy):  # it plays the recorded episode of each scene
        policy.begin(scene_key(task), list(zip(configs, seeds, strict=True)))
    out = sim.reset(seeds, configs)
    instructions = [args.instruction] * sim.n_envs if args.instruction else out.instructions
    if len(instructions) != sim.n_envs:
        raise EvalError(f"{task.env_id}: the task gives no language instruction; pass --instruction TEXT")
    policy.reset(instructions)
    frames: list[list[np.ndarray]] = [[img] for img in out.images[:n]] if args.video else [[] for _ in range(n)]
    rationales: list[list[str]] = [[] for _ in range(n)]
    actions: list[list[dict[str, list[float]]]] = [[] for _ in range(n)]
    # SimplerEnv's episode stats are "ever" flags: grasp = held >= 5 consecutive steps at any point
    success_once, grasp_ever, grasped_ever = (np.zeros(n, dtype=bool) for _ in range(3))
    steps = 0
    while True:
        if out.instructions and not args.instruction and out.instructions != instructions:
            instructions = out.instructions  # multi-stage tasks move to their next instruction
        raw, env_action = policy.step(out.images, instructions)
        flat = flat_env_action(env_action)
        summary.forced_tags += sum(g.forced_tag for g in policy.last[:n])
        for i in range(n):
            rationales[i].append(policy.rationales[i])
            if args.log_actions:
                raw_i = np.concatenate([raw["world_vector"][i], raw["rotation_delta"][i], raw["open_gripper"][i]])
                actions[i].append({"raw_action": raw_i.tolist(), "env_action": flat[i].tolist()})
        out = sim.step(flat)
        steps += 1
        success_once |= _flags(out.infos[:n], "success")
        grasp_ever |= _flags(out.infos[:n], "consecutive_grasp")
        grasped_ever |= _flags(out.infos[:n], "is_src_obj_grasped")
        if args.video:
            for i in range(n):
                frames[i].append(out.images[i])
        if out.done or steps >= sim.max_steps:
            break
    wall = (time.monotonic() - t0) / max(n, 1)
    results = []
    for i, (config, repeat, _) in enumerate(batch):
        info = out.infos[i]
        texts = rationales[i] if args.video_rationale else None
        video = write_video(args.out, task, config, repeat, frames[i], sim.control_freq, texts) if args.video else None
        results.append(
            EpisodeResult(
                suite=task.suite,
                task=task.name,
                env_id=task.env_id,
                config=config,
                repeat=repeat,
                seed=seeds[i],
                instruction=instructions[i],
                success=bool(info.get("success", False)),
                success_once=bool(success_once[i]),
                grasp=bool(grasp_ever[i]) if task.grasp and "consecutive_grasp" in info else None,
                grasped_once=bool(grasped_ever[i]) if task.grasp and "is_src_obj_grasped" in info else None,
                steps=int(info.get("elapsed_steps", steps)) if task.backend == "libero" else steps,
                wall_s=round(wall, 3),
                rationales=rationales[i],
                actions=actions[i] if args.log_actions else None,
                video=video,
                info={k: v for k, v in info.items() if isinstance(v, bool | int | float)},
            )
        )
    return results


def _flags(infos: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """info[key] of each env as a bool array (False where the task does not report it)."""
    return np.array([bool(info.get(key, False)) for info in infos], dtype=bool)


def write_video(
    out: Path,
    task: Task,
    config: int,
    repeat: int,
    frames: list[np.ndarray],
    fps: float,
    rationales: list[str] | None = None,
) -> str:
    """videos/TASK/config-C_repeat-R.mp4 (relative to the results folder); with `rationales`, frame k carries
    the rationale the policy wrote looking at it (the last frame, the outcome, has none)."""
    from ..annotate.video import write_mp4

    if rationales is not None:
        from .overlay import with_rationale

        frames = [with_rationale(f, rationales[k] if k < len(rationales) else "") for k, f in enumerate(frames)]
    rel = Path("videos") / task.name / f"config-{config:03d}_repeat-{repeat}.mp4"
    write_mp4(out / rel, frames, fps)
    return rel.as_posix()
