"""`refine-eval run --backend ray` beside the local backend: episodes per second by worker count.

Every row is one `refine-eval run` command as a user types it, on SimplerEnv's WidowX carrot task on
ManiSkill3 (CPU physics and rendering), all measured in one run on this machine:

- local — the local backend (one process, `--num-envs 1`);
- ray, W workers — `--backend ray --workers W` on a one-node Ray cluster on 127.0.0.1
  (`annotate/ray_local.py`, as many CPUs as the machine's), one actor per worker;

with two policies: `replay` — trivial, no model: the recorded actions of demos that `refine-eval demos`
records first (so the simulator is nearly all the cost) — and `tiny` — the tiny PaliGemma trained 2 steps
(as in eval_overhead.py), writing a rationale of --rationale-tokens tokens each step.

Columns: the command's wall time (start-up included: imports, joining the cluster, each worker loading
the policy and building its scene); episodes per second in the steady state, from the first episode's line
to the last (so start-up is left out); that rate against the local run and against one worker; and the
driver's CPU per episode (the command's own process: on Ray the workers are the cluster's, not its
children). On 2 cores a second worker can at best double the rate. Each Ray worker's thread pools
(OpenMP, lavapipe's rasterizer) are its one reserved CPU, while the local command's renderer spreads
over both cores: one worker is slower than local, two add up (before that cap, two workers were no
faster than one, each spreading over both cores).

    MS_ASSET_DIR=../shared/simpler_assets python benchmarks/eval_ray.py
    python benchmarks/eval_ray.py --episodes 8 --workers 1 2 --policies replay --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # eval_overhead's assets and tiny policy

CARROT = ("--suite", "widowx", "--tasks", "carrot_on_plate")


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run one `refine-eval run`; its wall time, steady-state rate and own CPU per episode."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = proc.stdout if proc.stdout is not None else []
        ends = [time.perf_counter() for line in lines if " repeat " in line and " steps, " in line]
        code = proc.wait()
        errors.seek(0)
        stderr = errors.read()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n = len(ends)
    steady = (n - 1) / (ends[-1] - ends[0]) if n > 1 and ends[-1] > ends[0] else float("nan")
    return {"wall": wall, "episodes": n, "rate": steady, "cpu_per_episode": cpu / max(n, 1)}


def record_demos(work: Path, episodes: int, env: dict[str, str]) -> Path:
    out = work / "demos"
    cmd = [sys.executable, "-m", "refinevla.evaluate", "demos", "--tasks", "carrot_on_plate"]
    r = subprocess.run([*cmd, "--episodes", str(episodes), "--out", str(out)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"refine-eval demos failed:\n{r.stderr[-3000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=6, help="episodes per row (demos recorded for replay)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to measure")
    parser.add_argument("--policies", nargs="+", default=["replay", "tiny"], choices=["replay", "tiny"])
    parser.add_argument("--rationale-tokens", type=int, default=8, help="rationale budget of the tiny policy")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every row, interleaved; the table shows means")
    opts = parser.parse_args()

    from eval_overhead import default_assets, tiny_policy

    from refinevla.annotate.ray_local import local_cluster

    default_assets()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp, local_cluster(head_cpus=os.cpu_count() or 2, worker_cpus=0) as cluster:
        work = Path(tmp)
        for policy in opts.policies:
            if policy == "replay":
                demos = record_demos(work, opts.episodes, env)
                flags = ["--policy", f"replay:{demos}", "--episodes-from", str(demos)]
            else:
                ckpt = tiny_policy(work / "tiny")
                flags = ["--policy", str(ckpt), "--max-episodes", str(opts.episodes)]
                flags += ["--max-rationale-tokens", str(opts.rationale_tokens)]
            base = [sys.executable, "-m", "refinevla.evaluate", "run", *CARROT, *flags, "--no-report"]
            runs: dict[str, list[dict[str, float]]] = {}
            for r in range(opts.rounds):  # local, 1 worker, 2 workers, local, ...: drift hits every row alike
                out = ["--out", str(work / f"{policy}-local-{r}")]
                runs.setdefault("local", []).append(measure([*base, *out], env))
                for w in opts.workers:
                    ray = ["--backend", "ray", "--ray-address", cluster.address, "--workers", str(w)]
                    out = ["--out", str(work / f"{policy}-ray{w}-{r}")]
                    runs.setdefault(f"ray, {w} worker(s)", []).append(measure([*base, *ray, *out], cluster.driver_env))
            rows += [(policy, name, {k: statistics.mean(m[k] for m in ms) for k in ms[0]}) for name, ms in runs.items()]

    where = f"{os.cpu_count()} cores, one-node Ray on 127.0.0.1, mean of {opts.rounds} round(s)"
    print(f"\nPutCarrotOnPlateInScene-v1, CPU sim + render, {where}\n")
    head = f"{'policy':8}  {'run':18}  {'episodes':>8}  {'wall s':>7}  {'episodes/s':>10}  {'vs local':>8}"
    print(head + f"  {'vs 1 worker':>11}  {'driver CPU s/episode':>20}")
    for policy, name, m in rows:
        local = next(r for p, n, r in rows if p == policy and n == "local")
        one = next((r for p, n, r in rows if p == policy and n == "ray, 1 worker(s)"), None)
        vs_one = f"{m['rate'] / one['rate']:.2f}" if one is not None and name.startswith("ray") else ""
        print(
            f"{policy:8}  {name:18}  {m['episodes']:>8.0f}  {m['wall']:>7.1f}  {m['rate']:>10.3f}  "
            f"{m['rate'] / local['rate']:>8.2f}  {vs_one:>11}  {m['cpu_per_episode']:>20.2f}"
        )
    print("\ngoal: 2 workers >= 1.5x 1 worker with the trivial (replay) policy; driver CPU per episode small")
    print(json.dumps({f"{p}/{n}": r for p, n, r in rows}))


if __name__ == "__main__":
    main()
