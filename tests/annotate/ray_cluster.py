"""The Ray tests' cluster: one local two-node cluster on 127.0.0.1 for the whole pytest session.

The cluster itself is `refinevla.annotate.ray_local` (the benchmark starts its own the same way).
Starting one costs ~10 s on this machine, so every Ray test shares this one (`ray_cluster`, a
session fixture registered by tests/conftest.py, so the annotate and the evaluate tests share it); a test
that loses a node adds a node of its own and kills that one. Also here: reading the preparation tasks'
journal (the `REFINEVLA_RAY_JOURNAL` test hook of `ray_backend`) and asking the GCS which nodes are alive.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refinevla.annotate.ray_local import DRIVER_ENV, LocalRayCluster, free_port, local_cluster

__all__ = [
    "DRIVER_ENV",
    "RAY_DRIVER_CHILD",
    "LocalRayCluster",
    "alive_nodes",
    "finish",
    "free_port",
    "journal",
    "lose_node_under",
    "ray_cluster",
    "wait_until",
]


# Tests marked `ray_driver` make their own process a Ray driver; the suite's run deselects them (tests/conftest.py)
# and one test (test_ray_backend.py) runs them in a pytest of their own, given the session's cluster in this variable.
RAY_DRIVER_CHILD = "REFINEVLA_RAY_DRIVER_CHILD"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A head (1 CPU) and a worker node (2 CPUs), shared by every Ray test of the session."""
    pytest.importorskip("ray.data", reason="ray.data: needs the [ray] extra")
    given = os.environ.get(RAY_DRIVER_CHILD)  # a pytest run by the suite's: its cluster
    if given:
        spec = json.loads(given)
        yield LocalRayCluster(spec["address"], Path(spec["temp_dir"]), {**os.environ, **DRIVER_ENV})
        return
    with local_cluster(head_cpus=1, worker_cpus=2) as cluster:
        yield cluster


def journal(directory: Path) -> list[dict[str, Any]]:
    """The preparation tasks' lines (`ray_backend.JOURNAL_ENV`), in the order they were written."""
    path = directory / "tasks.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def alive_nodes(cluster: LocalRayCluster) -> dict[str, bool]:
    """Node id -> alive, from the GCS's node table (what `ray.nodes()` reports), read with Ray's GCS client:
    this process does not become a driver (the in-process tests' own `ray.init` would then fail)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    nodes = GcsClient(address=cluster.address).get_all_node_info(timeout=30)
    return {node_id.hex(): info.state == GcsNodeInfo.ALIVE for node_id, info in nodes.items()}


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_until(condition: Callable[[], Any], what: str, deadline: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lose_node_under(
    cluster: LocalRayCluster,
    start: Callable[[], subprocess.Popen[str]],
    held_on: Callable[[str], list[dict[str, Any]]],
    hold: Path,
    deadline: float = 120.0,
) -> tuple[subprocess.Popen[str], list[dict[str, Any]], list[int]]:
    """Add a node of 2 CPUs, `start` a run whose work waits while `hold` exists, wait until `held_on(node)`
    lists work held there, then lose the node (SIGKILL to all its processes) and release the hold.

    Returns (the run, the work lost, the pids killed); the run is killed if anything fails before that."""
    node = cluster.add_node(cpus=2)  # the test's own third node, the one it loses
    proc = None
    try:
        proc = start()
        running = proc
        wait_until(lambda: held_on(node) or running.poll() is not None, "work held on the node to lose", deadline)
        lost = held_on(node)
        assert lost and proc.poll() is None, lost
        killed = cluster.kill_node(node)  # returns once all its processes ended
    except BaseException:
        if proc is not None:
            proc.kill()
        raise
    finally:
        cluster.kill_node(node)
        hold.unlink()
    return proc, lost, killed
