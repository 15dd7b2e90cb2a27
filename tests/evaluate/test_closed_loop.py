"""The closed loop: a policy trained by refine-train on refine-eval's own demonstrations succeeds in
refine-eval. Every stage is the user's command (benchmarks/closed_loop.py runs them), so a convention
mismatch anywhere between the demos' frames and actions and the simulator's commands (statistics,
transforms, action frames, gripper, image resizing, the decoder) fails here. The demos and their replay are
the session's (`demos_dir`, `replay_run`: the same `refine-eval demos`/`run` commands the benchmark would run,
already run for the demos tests), given with --demos-from/--replay-from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_policy_overfit_on_two_carrot_demos_succeeds(
    demos_dir: Path, replay_run: Path, sim_env: dict[str, str], tmp_path: Path
) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "closed_loop.py"), "--task", "carrot_on_plate", "--demos", "2"]
    cmd += ["--demos-from", str(demos_dir), "--replay-from", str(replay_run)]
    cmd += ["--mode", "overfit", "--json", "--work", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sim_env, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(r.stdout)  # the table, in the test log
    assert (result["task"], result["mode"], result["demos_kept"]) == ("carrot_on_plate", "overfit", 2)
    assert result["demos_from"] == str(demos_dir) and result["expert_success"] is None  # demos_dir: 2/2 tries kept
    assert result["replay_success"] == "2/2"
    k, n = map(int, result["policy_success"].split("/"))
    assert n == 2 and k >= 1, r.stdout  # the memorising policy replays at least one demonstration to success
    # the negative control: the same model at step 0, in the same scenes with the same seeds, does worse
    k0, n0 = map(int, result["untrained_success"].split("/"))
    assert n0 == 2 and k > k0, r.stdout
    assert "Wilson 95%" in r.stdout and "policy (demos scenes)" in r.stdout and "untrained, step 0" in r.stdout
