"""`refine-eval run --backend ray` on a real two-node Ray cluster on 127.0.0.1: the tiny trained policy against
the local `carrot_run`, a killed driver, the one-line errors, Ctrl-C and --help.

The cluster is the session's (`tests/annotate/ray_cluster.py`, shared with the annotate tests). Each run is a
`refine-eval` process, as a user types it; on the CPU the simulator and the policy are deterministic, so a Ray
run's episodes equal the local run's field for field (wall time aside). The replay policy and a lost node are
in test_ray_eval_replay.py (beside the demos it replays: the two files go with different session fixtures).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="ray.data: needs the [ray] extra")

from refinevla.evaluate.ray_backend import JOURNAL_ENV
from refinevla.evaluate.report import write_report
from refinevla.evaluate.results import read_episodes, read_run
from tests.annotate.ray_cluster import DRIVER_ENV, LocalRayCluster, finish, free_port, wait_until
from tests.evaluate.conftest import CARROT_RUN, episodes
from tests.evaluate.test_report import cell, table

CARROT = ["--suite", "widowx", "--tasks", "carrot_on_plate"]


def start_eval(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "refinevla.evaluate", "run", *CARROT, "--no-report", *args]
    return subprocess.Popen(cmd, env={**env, **DRIVER_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def on_ray(env: dict[str, str], cluster: LocalRayCluster, *args: str) -> subprocess.Popen[str]:
    return start_eval(env, "--backend", "ray", "--ray-address", cluster.address, *args)


def by_key(results: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Each episode without its wall time, by (task, configuration, repeat); a key twice fails."""
    records = episodes(results)
    out = {(r["task"], r["config"], r["repeat"]): {k: v for k, v in r.items() if k != "wall_s"} for r in records}
    assert len(out) == len(records), [(r["config"], r["repeat"]) for r in records]
    return out


def frames(video: Path) -> list[np.ndarray]:
    """The decoded frames of an mp4, as integers."""
    import av

    with av.open(str(video)) as container:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)]


def test_a_tiny_policy_on_ray_equals_the_local_run_and_a_killed_driver_resumes_what_is_missing(
    carrot_run: Path, paligemma_policy: Path, sim_env: dict[str, str], ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    """The same command as `carrot_run` (3 episodes, videos, action logs), on one worker, then two, then
    once more when it is finished."""
    out = tmp_path / "ray"
    args = ["--policy", str(paligemma_policy), "--max-episodes", "3", *CARROT_RUN]
    args += ["--video", "--log-actions", "--out", str(out)]
    proc = on_ray(sim_env, ray_cluster, *args, "--workers", "1")  # one policy loading: the first episode sooner
    log = out / "episodes.jsonl"
    try:
        wait_until(lambda: (out / "run.json").is_file() or proc.poll() is not None, "the run to start", 300)
        second = finish(on_ray(sim_env, ray_cluster, *args), timeout=120)  # the driver holds --out for the cluster
        assert second.returncode == 1 and f"is in use by pid {proc.pid} " in second.stderr, second.stderr
        wait_until(lambda: (log.is_file() and b"\n" in log.read_bytes()) or proc.poll() is not None, "an episode", 300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup at all; its workers end with it (Ray ends an owner's actors)
        proc.communicate(timeout=60)
    first = len(episodes(out))
    assert 1 <= first < 3, first

    rerun = finish(on_ray(sim_env, ray_cluster, *args, "--workers", "2"), timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{3 - first} episodes to run, {first} already done" in rerun.stdout
    ray, local = by_key(out), by_key(carrot_run)
    assert ray == local  # the same keys, outcomes, rationales, actions and video paths
    for episode in ray.values():  # each video shipped back from its worker into the driver's folder
        shipped, here = frames(out / episode["video"]), frames(carrot_run / episode["video"])
        # the CPU renderer is off by one in a few pixels from run to run, which the encoder may spread a little
        assert len(shipped) == len(here)
        assert max(np.abs(a - b).mean() for a, b in zip(shipped, here, strict=True)) < 1.0
    assert not list(out.rglob("*.partial"))
    # finished: the same command runs nothing and joins no cluster (its address is now one where nothing answers)
    nowhere = ("--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}")
    again = finish(start_eval(sim_env, *nowhere, *args), timeout=120)
    assert again.returncode == 0 and "0 episodes to run, 3 already done" in again.stdout, again.stdout + again.stderr
    assert by_key(out) == local
    # the report reads a Ray run's folder as a local run's: the same cells, and nothing flagged as not comparable
    md = write_report([carrot_run, out], out=tmp_path / "report").markdown.read_text()
    rows, name = table(md, "WidowX"), read_run(out)["policy"]["name"]
    for metric in ("success", "grasp"):
        here, there = (cell(rows, "carrot_on_plate", f"{name} ({f.name}) {metric}") for f in (carrot_run, out))
        assert here == there and "n=3" in here, (here, there)
    assert "not comparable" not in md


def test_the_trivial_policy_runs_on_ray(sim_env: dict[str, str], ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    """`--policy zero:` names no path: the driver hands it to the workers as given (it once became
    CWD/zero:, a checkpoint that does not exist); --max-steps reaches the workers' simulators."""
    args = ("--policy", "zero:", "--max-episodes", "1", "--max-steps", "3", "--log-actions")
    ray = finish(on_ray(sim_env, ray_cluster, *args, "--workers", "1", "--out", str(tmp_path / "ray")), timeout=300)
    assert ray.returncode == 0, ray.stdout + ray.stderr
    (episode,) = by_key(tmp_path / "ray").values()
    assert episode["steps"] == 3 and episode["success"] is False and episode["rationales"] == [""] * 3
    assert [a["env_action"] for a in episode["actions"]] == [[0.0] * 6 + [1.0]] * 3  # still, the gripper open


def test_a_cluster_without_the_assets_or_no_cluster_at_all_is_one_line_before_any_model_loads(
    paligemma_policy: Path, sim_env: dict[str, str], ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    policy = ("--policy", str(paligemma_policy))
    # the driver's MS_ASSET_DIR is the workers': every node a worker may use checks it first
    empty = {**sim_env, "MS_ASSET_DIR": str(tmp_path / "empty")}
    r = finish(on_ray(empty, ray_cluster, *policy, "--out", str(tmp_path / "a")), timeout=180)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "error: Ray node " in r.stderr and "download_asset bridge_v2_real2sim" in r.stderr
    assert not (tmp_path / "a" / "run.json").exists()  # stopped before any worker started

    nowhere = ("--ray-address", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "b"))
    r = finish(start_eval(sim_env, *policy, "--backend", "ray", *nowhere), timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no Ray cluster answers there" in r.stderr, r.stderr

    r = finish(start_eval(sim_env, *policy, "--workers", "2", "--out", str(tmp_path / "c")), timeout=60)
    assert r.returncode == 1 and "--workers: need --backend ray" in r.stderr, r.stderr


def test_ctrl_c_while_a_batch_runs_exits_130_with_the_resume_line_and_a_worker_never_placed_is_one_line(
    paligemma_policy: Path, sim_env: dict[str, str], ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    """Ctrl-C while a worker holds an episode (the cluster found by `--ray-address auto` from $RAY_ADDRESS); while
    it holds, another run whose worker finds no room stops at --placement-timeout."""
    journal, out = tmp_path / "journal", tmp_path / "o"
    journal.mkdir()
    (journal / "hold").touch()  # the worker waits once it has started its batch: Ctrl-C lands mid-batch
    env = {**sim_env, JOURNAL_ENV: str(journal), "RAY_ADDRESS": ray_cluster.address}
    policy = ("--policy", str(paligemma_policy))
    one = ("--workers", "1", "--cpus-per-worker", "2")  # the session cluster's only node with 2 CPUs: held by it
    proc = start_eval(env, "--backend", "ray", "--ray-address", "auto", *policy, *one, "--out", str(out))
    started = journal / "batches.log"
    try:
        wait_until(lambda: started.is_file() or proc.poll() is not None, "a batch to start", 300)
        # meanwhile its worker holds the only node with room for one of 2 CPUs: another such worker cannot be
        # placed, and that run stops at its --placement-timeout, in one line (else it waits as long as the first runs)
        other = finish(
            on_ray(env, ray_cluster, *policy, *one, "--placement-timeout", "3", "--out", str(tmp_path / "p"))
        )
        assert other.returncode == 1 and other.stderr.count("\n") == 1, other.stdout + other.stderr
        assert (
            "no Ray worker (2 CPU(s) and 0 GPU(s) each) could be placed in 3 s (--placement-timeout)" in other.stderr
        ), other.stderr
        assert "run the same command again once the cluster has room" in other.stderr
    finally:
        proc.send_signal(signal.SIGINT)
    r = finish(proc, timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "Run the same command again to continue" in r.stderr
    assert "ray: " in r.stdout, r.stdout  # joined the session's cluster (its node count, workers)
    assert read_episodes(out) == []  # the batch was in flight: nothing half-written
    # the worker's thread pools are its 2 reserved CPUs, not every core of its node (nor the driver's 1)
    (held,) = [json.loads(line) for line in started.read_text().splitlines()]
    assert set(held["threads"].values()) == {"2"} and held["torch_threads"] == 2, held
    cluster = read_run(out)["cluster"]
    # the cluster joined: its GCS's port (the GCS names its host by the machine's address, not the loopback one)
    assert (
        cluster["address"] == "auto" and cluster["gcs_address"].rpartition(":")[2] == ray_cluster.address.split(":")[1]
    )


def test_help_does_not_import_ray() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from refinevla.evaluate.cli import app; "
        "r = CliRunner().invoke(app, ['run', '--help']); assert '--backend' in r.output and '--workers' in r.output; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
