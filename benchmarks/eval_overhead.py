"""refine-eval's own cost per env step, against the simulator alone, and the tiny policy's cost.

Printed as a table, all measured in one run on the same env (SimplerEnv's WidowX task
`PutCarrotOnPlateInScene-v1` on ManiSkill3, CPU physics and rendering):

1. bare loop — `env.reset(options={"episode_id": i})` then `env.step(zeros)` to the task's step
   limit, straight on the gymnasium env: the simulator's own rate.
2. runner, trivial policy — the same episodes through `refine-eval`'s `run_batch` (policy call,
   robot conventions, image hand-over, info scalarisation, per-step rationale and action records)
   with a policy that answers zeros at once. Goal: >= 0.9 of the bare loop's steps/s.
3. runner, tiny trained policy — a PaliGemma (hidden 64, 2 layers) trained 2 steps by
   refine-train, decoding its rationale (budget --rationale-tokens) and 7 action tokens every
   step: the policy's ms per step.

Bare and runner episodes alternate (A B A B ...) so drift of the shared machine hits both alike.

    MS_ASSET_DIR=../shared/simpler_assets python benchmarks/eval_overhead.py
    python benchmarks/eval_overhead.py --episodes 6 --rationale-tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_throughput's data and tiny model
ENV_ID = "PutCarrotOnPlateInScene-v1"


def default_assets() -> None:
    """ManiSkill3 reads MS_ASSET_DIR; REFINEVLA_SIMPLER_ASSETS (the tests' variable) serves too."""
    if "MS_ASSET_DIR" in os.environ:
        return
    if os.environ.get("REFINEVLA_SIMPLER_ASSETS"):
        os.environ["MS_ASSET_DIR"] = os.environ["REFINEVLA_SIMPLER_ASSETS"]
        return
    sys.exit("set MS_ASSET_DIR to a folder with ManiSkill3's bridge_v2_real2sim and widowx250s assets")


class ZeroPolicy:
    """Answers zeros at once: what is left of a step is the runner and the simulator."""

    def __init__(self) -> None:
        from refinevla.evaluate.robots import GripperState

        self.gripper = GripperState("widowx", 1)
        self.last: list[Any] = []

    def reset(self, instructions: list[str]) -> None:
        from refinevla.evaluate.robots import GripperState
        from refinevla.train.policy import Generated

        self.gripper = GripperState("widowx", len(instructions))
        self.last = [Generated("", [0] * 7, np.zeros(7), False, 0) for _ in instructions]

    def step(self, images: np.ndarray, instructions: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        from refinevla.evaluate.robots import env_actions, raw_action_dict

        raw = np.zeros((len(images), 7))
        return raw_action_dict(raw), env_actions(raw, self.gripper)

    @property
    def rationales(self) -> list[str]:
        return ["" for _ in self.last]


class TimedPolicy:
    """Wraps a policy and sums the wall time of its `step` calls."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.seconds, self.calls = policy, 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def step(self, images: np.ndarray, instructions: Any = None) -> Any:
        t0 = time.perf_counter()
        out = self.policy.step(images, instructions)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def bare_episode(env: Any, config: int, seed: int, steps: int) -> float:
    import torch

    zeros = torch.zeros((1, 7))
    t0 = time.perf_counter()
    env.reset(seed=seed, options={"episode_id": torch.tensor([config])})
    for _ in range(steps):
        env.step(zeros)
    return time.perf_counter() - t0


def runner_episode(sim: Any, policy: Any, config: int, seed: int, out: Path) -> float:
    from refinevla.evaluate.runner import RunArgs, RunSummary, run_batch
    from refinevla.evaluate.suites import suite_tasks

    (task,) = suite_tasks("widowx", ["carrot_on_plate"])
    args = RunArgs(policy=out, suite="widowx", out=out, seed=seed, log_actions=True)
    t0 = time.perf_counter()
    run_batch(sim, policy, task, [(config, 0)], args, RunSummary())
    return time.perf_counter() - t0


def tiny_policy(work: Path) -> Path:
    """A refine-train checkpoint of the tiny PaliGemma on a small annotated Bridge-layout dataset."""
    from train_throughput import build, model_dir
    from typer.testing import CliRunner

    from refinevla.train.cli import app

    published = build(work, 8)
    ckpt = work / "ckpt"
    args = ["--dataset", str(published), "--model", str(model_dir(work)), "--output", str(ckpt)]
    args += ["--cache-dir", str(work / "cache"), "--max-steps", "2", "--batch-size", "2", "--num-workers", "0"]
    result = CliRunner().invoke(app, [*args, "--val-fraction", "0"])
    if result.exit_code != 0:
        sys.exit(result.output)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4, help="episodes each of bare loop and trivial runner")
    parser.add_argument("--policy-episodes", type=int, default=1, help="episodes with the tiny trained policy")
    parser.add_argument("--rationale-tokens", type=int, default=16, help="rationale budget of the tiny policy")
    opts = parser.parse_args()
    default_assets()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    from refinevla.evaluate.backends.maniskill import ManiSkillSim
    from refinevla.evaluate.policy import RefinePolicy

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sim = ManiSkillSim(ENV_ID, 1, "cpu")
        steps = sim.max_steps
        bare_episode(sim.env, 0, 0, 2)  # warm-up: first render, shader compilation
        bare, trivial = 0.0, 0.0
        zero = ZeroPolicy()
        for i in range(opts.episodes):
            bare += bare_episode(sim.env, i, i, steps)
            trivial += runner_episode(sim, zero, i, i, work)
        timed = TimedPolicy(RefinePolicy(tiny_policy(work), max_rationale_tokens=opts.rationale_tokens, device="cpu"))
        with_policy = sum(runner_episode(sim, timed, i, i, work) for i in range(opts.policy_episodes))
        sim.close()

    n = opts.episodes * steps
    bare_rate, trivial_rate = n / bare, n / trivial
    policy_steps = opts.policy_episodes * steps
    rows = [
        ("bare env loop", f"{bare_rate:.1f}", "1.00", ""),
        ("runner, trivial policy", f"{trivial_rate:.1f}", f"{trivial_rate / bare_rate:.3f}", "goal >= 0.9"),
        (
            f"runner, tiny policy ({opts.rationale_tokens}-token rationale)",
            f"{policy_steps / with_policy:.1f}",
            f"{policy_steps / with_policy / bare_rate:.3f}",
            f"policy {1000 * timed.seconds / timed.calls:.1f} ms/step",
        ),
    ]
    print(f"\n{ENV_ID}, CPU sim + render, {steps} steps/episode, {opts.episodes} episodes per row\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'env steps/s':>12}  {'vs bare':>8}  note")
    for name, rate, ratio, note in rows:
        print(f"{name:{width}}  {rate:>12}  {ratio:>8}  {note}")


if __name__ == "__main__":
    main()
