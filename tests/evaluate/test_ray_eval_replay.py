"""`refine-eval run --backend ray` with the replay policy on the session's two-node Ray cluster on 127.0.0.1: every
episode succeeds and equals the local `replay_run`'s, with a node lost under an episode.

The node-loss test adds a third node and kills that one. What the workers did (which batch ran on which node)
is read from their journal, `evaluate.ray_backend`'s JOURNAL_ENV test hook.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.data", reason="ray.data: needs the [ray] extra")

from refinevla.evaluate.ray_backend import JOURNAL_ENV
from tests.annotate.ray_cluster import LocalRayCluster, finish, lose_node_under
from tests.evaluate.test_ray_eval import by_key, on_ray


def batches(journal: Path, event: str) -> list[dict[str, Any]]:
    path = journal / "batches.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def test_replay_on_ray_equals_the_local_run_and_a_node_lost_under_an_episode_is_repaid(
    demos_dir: Path, replay_run: Path, sim_env: dict[str, str], ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    hold = journal / "hold"
    hold.touch()  # every worker waits once it has started its batch: the node is lost under an episode
    out = tmp_path / "ray"
    replay = ("--policy", f"replay:{demos_dir}", "--episodes-from", str(demos_dir), "--out", str(out))
    env = {**sim_env, JOURNAL_ENV: str(journal)}

    def held_there(node: str) -> list[dict[str, Any]]:
        return [e for e in batches(journal, "start") if ray_cluster.node_of(e["pid"]) == node]

    def start() -> subprocess.Popen[str]:  # two workers of 2 CPUs: the session's worker node and the one lost
        return on_ray(env, ray_cluster, *replay, "--workers", "2", "--cpus-per-worker", "2")

    proc, lost, _ = lose_node_under(ray_cluster, start, held_there, hold, deadline=300)
    r = finish(proc, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "a Ray worker was lost; 1 episode(s) of carrot_on_plate go back to the queue" in r.stdout

    ray, local = by_key(out), by_key(replay_run)
    assert ray == local and len(ray) == 2 and all(e["success"] for e in ray.values())  # every key once, as locally
    done = batches(journal, "done")
    assert not [e for e in done if e["node"] == lost[0]["node"]]  # nothing finished on the lost node ...
    assert [e for e in done if e["episodes"] == lost[0]["episodes"]]  # ... its episode ran again elsewhere
    run = json.loads((out / "run.json").read_text())
    cluster = {k: run["cluster"][k] for k in ("name", "address", "nodes", "workers", "gpus")}
    assert cluster == {"name": "ray", "address": ray_cluster.address, "nodes": 3, "workers": 2, "gpus": 0.0}
    assert run["cluster"]["workers_lost"] >= 1, run["cluster"]  # more where a loaded machine misses health checks
    assert (
        run["backend"] == "maniskill3"
        and run["policy_digest"] == json.loads((replay_run / "run.json").read_text())["policy_digest"]
    )

    # the folder is held to its setup as a local one is: another seed is refused in one line, before Ray
    refused = finish(on_ray(sim_env, ray_cluster, *replay, "--seed", "1"), timeout=120)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "made with seed=0, this run has 1; use another --out" in refused.stderr
