"""The closed loop: scripted demos -> refine-data annotate -> refine-train -> refine-eval, in one table.

Each stage is the command a user runs (`refine-eval demos`, `refine-data annotate` with the
rule-based teacher, `refine-train`, `refine-eval run`), so a convention mismatch between the halves
(frames, statistics, action frames, gripper, transforms) shows up here as a policy that fails. Rows:

- expert: the scripted expert's tries kept (`refine-eval demos`; not run with `--demos-from DIR`, demos
  recorded before by the same command, whose replay `--replay-from RESULTS` may give too: the test suite's);
- replay: `--policy replay:DEMOS` on the demos' own scenes, the success of a perfect imitator of the
  training view (transform + action-token round trip);
- imitation: free-running decoding (the one decoder refine-eval uses) on the training frames, the
  fraction of frames whose 6 movement bins equal the training target's and whose gripper command
  (open > 0.5, as WidowX reads it) is the same.
  Teacher-forced accuracy flatters: later tokens are copied from the true earlier ones;
- policy: the trained policy in refine-eval, on the demos' own scenes (`--mode overfit`) or on the
  task's scenes the demos do not hold (`--mode heldout`);
- untrained (the negative control): the same model at step 0 (refine-train for one step at learning
  rate 0, so the same statistics, tokenizer and policy folder, with the starting weights), in the same
  scenes with the same seeds: what the scenes give a policy that learned nothing. The trained row
  means something only above it.

The simulator's assets come from `--assets DIR`, else `$MS_ASSET_DIR`, else `$REFINEVLA_SIMPLER_ASSETS`.
`--suite libero` runs the same loop in a LIBERO scene (`--task libero_spatial/0`; the demos are a LeRobot v3
dataset, the assets come with the `[libero]` extra; `--resolution 64` makes it affordable on a CPU).

Every rate is printed with its n and a Wilson 95% interval. On 2 CPU cores with the tiny model
(`--model tiny`, random weights built from a config) the numbers show that the plumbing is right,
not ReFineVLA's effect; give `--model PATH` (a PaliGemma / Idefics3 / OpenVLA checkpoint) on a GPU
for that.

    python benchmarks/closed_loop.py --task carrot_on_plate --demos 2 --mode overfit
    python benchmarks/closed_loop.py --task carrot_on_plate --demos 24 --mode heldout --reasoning-weight 1 --json
    python benchmarks/closed_loop.py --suite libero --task libero_spatial/0 --demos 2 --resolution 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The tiny recipe that memorises 2 carrot demonstrations on 2 CPU cores (see the README's figures).
# 48x48 frames, not 32x32: at 32 a frame where the arm has just stopped and the one before it (still descending,
# or still placing) differ by about a pixel while the action flips, and whether the memoriser told them apart
# changed with the machine (a fresh one, Mesa 25.0.7, turned 2/2 into 0/2: imitation 114/120, wrong exactly at the
# grasp and release steps); at 48 it reads all 120 training frames right and succeeds 2/2, in the same time
# (train 84 s against 80 s; 36 vision tokens against 16 are a small share of a step).
# No DataLoader workers: on frames this small a worker costs more than it saves (the same losses to the last
# digit, 40% less time: 19 s against 28 s for 500 steps on 2 cores).
TINY: dict[str, Any] = {
    "image": 48,
    "hidden": 64,
    "layers": 2,
    "steps": 4000,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "num_workers": 0,
}


@dataclass
class Rate:
    k: int
    n: int

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"

    def row(self) -> str:
        from refinevla.evaluate.report import wilson_interval

        lo, hi = wilson_interval(self.k, self.n)
        pct = 100.0 * self.k / self.n if self.n else 0.0
        return f"{self!s:>7}  {pct:5.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]"


@dataclass
class Loop:
    task: str
    mode: str
    reasoning_weight: float
    demos_kept: int = 0
    expert: Rate | None = None
    replay: Rate | None = None
    imitation: Rate | None = None
    policy: Rate | None = None
    untrained: Rate | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: float | None = None


def sh(cmd: list[str], what: str) -> str:
    """Run one CLI stage; its stderr tail on failure (the stage's own one-line error)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{what} failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
    return r.stdout


def cli(module: str) -> list[str]:
    return [sys.executable, "-m", f"refinevla.{module}"]


def successes(results: Path) -> Rate:
    from refinevla.evaluate.results import read_episodes

    eps = read_episodes(results)
    return Rate(sum(bool(e["success"]) for e in eps), len(eps))


def tiny_model(path: Path, image: int, hidden: int, layers: int) -> Path:
    """A PaliGemma with random weights, built from a config (nothing is downloaded)."""
    from refinevla.train.tiny import build_paligemma

    return build_paligemma(path, image=image, hidden=hidden, layers=layers)


# per suite: how the demos folder is read, its camera, and the gripper value above which the command flips
# (WidowX: open > 0.5, as SimplerEnv reads Bridge's absolute open-gripper; LIBERO: close > 0, robosuite's sign)
LIBERO_RESOLUTION = 64  # --suite libero's default camera side: what a 2-core CPU renders in minutes
SUITE_DEMOS = {"widowx": ("rlds", "image_0", 0.5), "libero": ("lerobot", "image", 0.0)}


def imitation(
    policy_dir: Path, demos: Path, episodes: int, trust_remote_code: bool = False, suite: str = "widowx"
) -> Rate:
    """Training frames where the policy's free-running action is the training target's: the same bin in
    each of the 6 movement dimensions and the same gripper command (SUITE_DEMOS' threshold).

    At most `episodes` demos (0: all): with a rationale decoded before every action, each frame costs
    a full generation, and a few episodes already tell memorisation from the mode."""
    import numpy as np

    from refinevla.annotate.sources import ReadOptions, open_source
    from refinevla.train.decoding import generate
    from refinevla.train.policy import Policy, rationale_budget

    policy = Policy(policy_dir, trust_remote_code=trust_remote_code)
    budget = rationale_budget(policy.info)  # refine-eval run's default --max-rationale-tokens
    reasoning = bool(policy.info.get("reasoning", True))  # as Policy.predict decodes
    kind, camera, flip = SUITE_DEMOS[suite]
    match = total = 0
    for i, ep in enumerate(open_source(f"{kind}:{demos}").iter_episodes(ReadOptions())):
        if episodes and i >= episodes:
            break
        frames = [np.asarray(f) for f in ep.frames[camera]]
        for gen, target in zip(
            generate(policy, frames, [ep.instruction] * len(frames), reasoning, budget),
            ep.actions,
            strict=True,
        ):
            same_bins = (policy.actions.encode(gen.action)[:6] == policy.actions.encode(target)[:6]).all()
            match += bool(same_bins and (gen.action[6] > flip) == (target[6] > flip))
            total += 1
    return Rate(match, total)


def record_demos(args: argparse.Namespace, demos: Path, frames: list[str]) -> Rate:
    """`refine-eval demos`: the scripted expert's tries kept, as it prints them."""
    cmd = [*cli("evaluate"), "demos", "--suite", args.suite, *frames, "--tasks", args.task]
    cmd += ["--episodes", str(args.demos), "--seed", str(args.seed), "--out", str(demos)]
    out = sh(cmd, "refine-eval demos")
    found = re.search(rf"{args.task}: (\d+)/(\d+) tries kept", out)
    if found is None:
        sys.exit(f"refine-eval demos printed no '{args.task}: K/N tries kept' line:\n{out[-3000:]}")
    return Rate(int(found[1]), int(found[2]))


def given_demos(args: argparse.Namespace, demos: Path) -> int:
    """The episodes of a --demos-from folder, checked to be demos of --task: the task of each is in the file
    `refine-eval demos` writes beside them (WidowX: the truth file; LIBERO: the scenes file)."""
    truth, scenes = demos / "refinevla_truth.json", demos / "refinevla_demos.json"
    if truth.is_file():
        tasks = [str(e.get("task")) for e in json.loads(truth.read_text()).get("episodes") or []]
    elif scenes.is_file():
        tasks = [f"{e.get('suite')}/{e.get('task_id')}" for e in json.loads(scenes.read_text()).values()]
    else:
        sys.exit(f"--demos-from {demos}: no truth or scenes file (`refine-eval demos` writes one)")
    if sorted(set(tasks)) != [args.task]:
        sys.exit(f"--demos-from {demos}: demos of {', '.join(sorted(set(tasks))) or 'nothing'}, not of {args.task}")
    if len(tasks) < 2:
        sys.exit(f"--demos-from {demos}: {len(tasks)} episode(s); the loop needs at least 2 (see --demos)")
    return len(tasks)


def given_replay(replay: Path, demos: Path) -> Rate:
    """A --replay-from results folder, checked to be `--policy replay:DEMOS` of the demos in use."""
    run_json = replay / "run.json"
    if not run_json.is_file():
        sys.exit(f"--replay-from {replay}: no run.json: not a refine-eval run's results")
    policy = json.loads(run_json.read_text()).get("policy") or {}
    if not str(policy.get("name", "")).startswith("replay:") or Path(policy.get("path", "")) != demos.resolve():
        sys.exit(f"--replay-from {replay}: ran {policy.get('name')} of {policy.get('path')}, not replay:{demos}")
    return successes(replay)


def run(args: argparse.Namespace, work: Path) -> Loop:
    loop = Loop(args.task, args.mode, args.reasoning_weight)
    demos, annotated, ckpt = args.demos_from or work / "demos", work / "annotated", work / "policy"
    frames = ["--resolution", str(args.resolution)] if args.resolution else []  # LIBERO's cameras
    t = time.time()
    if args.demos_from:  # made before by the same command (the test suite's session demos): not run again
        loop.demos_kept = given_demos(args, demos)
    else:
        loop.expert = record_demos(args, demos, frames)
        loop.demos_kept = loop.expert.k
        loop.seconds["demos"] = time.time() - t

    t = time.time()
    common = ["--suite", args.suite, "--tasks", args.task, *frames, "--no-report"]
    if args.replay_from:
        loop.replay = given_replay(args.replay_from, demos)
    else:
        replay = work / "replay"
        replay_cmd = [*cli("evaluate"), "run", "--policy", f"replay:{demos}", "--episodes-from", str(demos)]
        sh([*replay_cmd, "--out", str(replay), *common], "replay")
        loop.replay = successes(replay)
        loop.seconds["replay"] = time.time() - t

    t = time.time()
    kind = SUITE_DEMOS[args.suite][0]
    annotate = [*cli("annotate"), "annotate", f"{kind}:{demos}", "--out", str(annotated), "--license", "mit"]
    sh([*annotate, "--progress", "none"], "refine-data annotate")  # the rule-based teacher: the default
    loop.seconds["annotate"] = time.time() - t

    model = args.model
    if model == "tiny":
        model = str(tiny_model(work / "model", args.image, args.hidden, args.layers))
    t = time.time()
    trust = ["--trust-remote-code"] if args.trust_remote_code else []  # an OpenVLA --model runs its own code
    train = [*cli("train"), "--dataset", str(annotated), "--model", model, "--cache-dir", str(work / "cache"), *trust]
    train += ["--batch-size", str(args.batch_size), "--warmup-steps", str(args.warmup_steps)]
    train += ["--num-workers", str(args.num_workers)]
    train += ["--reasoning-weight", str(args.reasoning_weight), "--val-fraction", "0"]
    train += ["--seed", str(args.seed)] + (["--train-vision"] if args.train_vision else [])
    recipe = ["--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate)]
    sh([*train, "--output", str(ckpt), *recipe], "refine-train")
    loop.seconds["train"] = time.time() - t
    log = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    loop.final_loss = losses[-1] if losses else None

    t = time.time()
    loop.imitation = imitation(ckpt, demos, args.imitation_episodes, args.trust_remote_code, args.suite)
    loop.seconds["imitation"] = time.time() - t

    t = time.time()
    scenes = ["--episodes-from", str(demos)] if args.mode == "overfit" else ["--held-out-from", str(demos)]
    if args.mode == "heldout" and args.eval_episodes:
        scenes += ["--max-episodes", str(args.eval_episodes)]
    reasoning = ["--reasoning", "off"] if args.reasoning_weight == 0 else []
    evaluate = [*cli("evaluate"), "run", *scenes, *common, *reasoning, "--seed", str(args.seed), *trust]
    sh([*evaluate, "--policy", str(ckpt), "--out", str(work / "eval")], "refine-eval run")
    loop.policy = successes(work / "eval")
    loop.seconds["eval"] = time.time() - t

    if args.control:
        t = time.time()
        untrained = work / "untrained"  # step 0: one step at learning rate 0 leaves the starting weights
        sh([*train, "--output", str(untrained), "--max-steps", "1", "--learning-rate", "0"], "refine-train (step 0)")
        sh([*evaluate, "--policy", str(untrained), "--out", str(work / "eval-untrained")], "refine-eval run (step 0)")
        loop.untrained = successes(work / "eval-untrained")
        loop.seconds["control"] = time.time() - t
    return loop


def simulator_assets(given: Path | None) -> Path:
    """SimplerEnv's WidowX assets (ManiSkill3 reads MS_ASSET_DIR): --assets, else the environment's."""
    found = given or next(
        (Path(os.environ[v]) for v in ("MS_ASSET_DIR", "REFINEVLA_SIMPLER_ASSETS") if os.environ.get(v)), None
    )
    if found is None:
        sys.exit("no simulator assets: pass --assets DIR or set MS_ASSET_DIR (SimplerEnv's WidowX assets)")
    if not found.is_dir():
        sys.exit(f"--assets {found}: no such folder")
    return found


def print_table(loop: Loop) -> None:
    print(f"\nclosed loop: {loop.task}, mode {loop.mode}, reasoning weight {loop.reasoning_weight:g}")
    print(f"{'stage':<44} {'k/n':>7}  {'rate':>6}  Wilson 95%")
    rows = [
        ("expert (tries kept)", loop.expert),
        ("replay of the training view (demos' scenes)", loop.replay),
        ("imitation (training frames, free-running)", loop.imitation),
        (f"policy ({'demos' if loop.mode == 'overfit' else 'held-out'} scenes)", loop.policy),
        ("untrained, step 0 (same scenes and seeds)", loop.untrained),
    ]
    for name, rate in rows:
        if rate is not None:
            print(f"{name:<44} {rate.row()}")
    loss = f"{loop.final_loss:.4f}" if loop.final_loss is not None else "-"
    print("final training loss", loss, "| seconds:", ", ".join(f"{k} {v:.0f}" for k, v in loop.seconds.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=tuple(SUITE_DEMOS), default="widowx", help="widowx | libero")
    p.add_argument(
        "--task", help="widowx: carrot_on_plate (default), spoon_on_towel, ...; libero: SUITE/ID (libero_spatial/0)"
    )
    p.add_argument("--resolution", type=int, help="libero: camera side in pixels (default 256)")
    p.add_argument("--demos", type=int, default=2, help="expert tries (failures are dropped)")
    p.add_argument("--mode", choices=("overfit", "heldout"), default="overfit")
    p.add_argument("--reasoning-weight", type=float, default=0.0, help="λ of the rationale loss")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("--model", default="tiny", help="'tiny' (random weights from a config) or a model path")
    p.add_argument(
        "--image", type=int, help=f"tiny model: image side (widowx {TINY['image']}; libero: --resolution, else 64)"
    )
    p.add_argument("--hidden", type=int, default=TINY["hidden"], help="tiny model: hidden size")
    p.add_argument("--layers", type=int, default=TINY["layers"], help="tiny model: layers (vision and text)")
    p.add_argument("--steps", type=int, default=TINY["steps"])
    p.add_argument("--batch-size", type=int, default=TINY["batch_size"])
    p.add_argument("--num-workers", type=int, default=TINY["num_workers"], help="refine-train's DataLoader workers")
    p.add_argument("--learning-rate", type=float, default=TINY["learning_rate"])
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-episodes", type=int, default=0, help="heldout: at most this many held-out scenes (0: all)")
    p.add_argument("--imitation-episodes", type=int, default=4, help="demos decoded for the imitation row (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="--model runs its own code (OpenVLA)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True, help="also run step 0")
    p.add_argument("--assets", type=Path, help="SimplerEnv's assets (default $MS_ASSET_DIR, $REFINEVLA_SIMPLER_ASSETS)")
    p.add_argument("--work", type=Path, help="keep every stage's output here (default: a temporary folder)")
    p.add_argument(
        "--demos-from", type=Path, help="use these demos of --task (a `refine-eval demos` folder) instead of recording"
    )
    p.add_argument(
        "--replay-from", type=Path, help="with --demos-from: their `--policy replay:` run's results, not run again"
    )
    args = p.parse_args(argv)
    args.task = args.task or ("carrot_on_plate" if args.suite == "widowx" else "libero_spatial/0")
    if args.suite == "libero":
        # LIBERO's scenes at 64x64 are cheap enough on a CPU (a step ~0.2 s); the tiny model sees them whole: at 32x32
        # it memorised the frames teacher-forced (loss 0.004) but free-running missed 31 of 300, at the phase ends
        # where the frame barely changes while the action flips (hover -> descend, closed -> lift); at 64x64 the
        # same data, steps and lr gave 300/300. Either policy still failed 0/2 in the scenes (README: why)
        args.resolution = args.resolution or LIBERO_RESOLUTION
        args.image = args.image or args.resolution
    args.image = args.image or TINY["image"]
    if args.demos < 2:
        # refine-train's action bounds are the q01/q99 quantiles (OpenVLA's): over one episode they cut its largest
        # steps (0.017 off one sideways LIBERO step), so even the replay row fails; measured, not guessed
        p.error("--demos must be at least 2: one episode's q01/q99 action bounds clip its own extreme steps")
    if args.replay_from and not args.demos_from:
        p.error("--replay-from needs --demos-from: a replay is of given demos")
    if args.demos_from:
        args.demos_from = args.demos_from.resolve()
    if args.suite == "widowx":  # LIBERO's scenes come with the [libero] extra
        os.environ["MS_ASSET_DIR"] = str(simulator_assets(args.assets))
    with tempfile.TemporaryDirectory(prefix="refinevla-loop-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        loop = run(args, work)
    print_table(loop)
    if args.json:
        print(
            json.dumps(
                {
                    "task": loop.task,
                    "mode": loop.mode,
                    "reasoning_weight": loop.reasoning_weight,
                    "demos_kept": loop.demos_kept,
                    "expert_success": str(loop.expert) if loop.expert else None,
                    "demos_from": str(args.demos_from) if args.demos_from else None,
                    "replay_success": str(loop.replay),
                    "imitation": str(loop.imitation),
                    "policy_success": str(loop.policy),
                    "untrained_success": str(loop.untrained) if loop.untrained else None,
                    "final_loss": loop.final_loss,
                    "seconds": {k: round(v, 1) for k, v in loop.seconds.items()},
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
