"""A Ray cluster on this machine: a head and worker nodes on 127.0.0.1, each its own `ray start`.

For trying `--backend ray` without machines to spare, and for seeing what a run does when a node
dies: every node is its own raylet, as on separate machines, so one can be lost with SIGKILL while
the others go on (the tests do this; `benchmarks/engine_throughput.py` measures on such a head).

    with local_cluster(head_cpus=1, worker_cpus=2) as cluster:
        ...  # refine-data annotate ... --backend ray --ray-address cluster.address, env=cluster.driver_env

Everything binds to 127.0.0.1 and token authentication is off: a private cluster nobody else
reaches. Every process of a node, Ray's renamed agents and its workers included, inherits
`NODE_TAG=<temp dir>/<node>` from the node's `ray start`, so a node is killed, and the cluster
stopped, by pid: `ray stop` would end every Ray process on the machine, other people's too. The
GCS checks its nodes every second, so a lost node is marked dead within seconds rather than after
Ray's default half minute. Linux only (processes are found in /proc).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RefineError

NODE_TAG = "REFINEVLA_RAY_LOCAL_NODE"  # <temp dir>/<node name>, in the environment of each node's processes
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # what a process joining it needs
# the GCS's health checks of its nodes (Ray's defaults: every 3 s after 5 s, dead after 5 misses)
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ended(pid: int) -> bool:
    """Whether a process has ended (a zombie whose parent never reaps it has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _tag_of(pid: int) -> str | None:
    """The NODE_TAG value of a live process, or None (no tag, or ended)."""
    prefix = f"{NODE_TAG}=".encode()
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    tag = next((e[len(prefix) :].decode(errors="replace") for e in environ if e.startswith(prefix)), None)
    return None if tag is None or _ended(pid) else tag


def _tagged() -> dict[int, str]:
    """pid -> NODE_TAG value of every live process that has one (this process excluded)."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid() and (tag := _tag_of(int(proc.name))) is not None:
            found[int(proc.name)] = tag
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class LocalRayCluster:
    """A running local cluster: join it at `address` with `driver_env` as the environment."""

    address: str  # HOST:PORT of the head: what --ray-address takes
    temp_dir: Path  # Ray's session files and logs (short: Ray's socket paths are limited)
    driver_env: dict[str, str]  # this process's environment plus DRIVER_ENV
    nodes: list[str] = field(default_factory=list)  # the nodes started, "head" first

    def _ray_start(self, node: str, *args: str) -> None:
        env = {**self.driver_env, **HEALTH_CHECK_ENV, NODE_TAG: f"{self.temp_dir}/{node}"}
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--node-ip-address", "127.0.0.1", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if r.returncode != 0:
            raise RefineError(f"`ray start` of node {node} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        self.nodes.append(node)

    def add_node(self, cpus: int) -> str:
        """Start one more worker node with `cpus` CPUs; returns its name (for `node_pids`, `kill_node`)."""
        node = f"worker-{len(self.nodes)}"
        self._ray_start(node, "--address", self.address, "--num-cpus", str(cpus))
        return node

    def node_pids(self, node: str) -> list[int]:
        """The node's live processes: its raylet, its agents and its workers."""
        tag = f"{self.temp_dir}/{node}"
        return sorted(pid for pid, t in _tagged().items() if t == tag)

    def node_of(self, pid: int) -> str | None:
        """The node a live process of this cluster belongs to (a task's worker, say), else None."""
        tag = _tag_of(pid)
        prefix = f"{self.temp_dir}/"
        return tag.removeprefix(prefix) if tag is not None and tag.startswith(prefix) else None

    def kill_node(self, node: str, timeout: float = 30.0) -> list[int]:
        """Lose a node as a machine is lost: SIGKILL to all its processes. Returns their pids once all have ended."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while pids := self.node_pids(node):
            if time.monotonic() > deadline:
                raise RefineError(f"node {node}: processes {pids} still run after SIGKILL")
            _kill(pids)
            killed.update(pids)
            time.sleep(0.1)
        return sorted(killed)

    def logs_contain(self, text: str) -> bool:
        """Whether any log of the cluster's processes contains `text` (a secret that must never travel)."""
        needle = text.encode()
        return any(
            needle in f.read_bytes()
            for f in self.temp_dir.rglob("*")
            if f.is_file() and f.suffix in {".log", ".out", ".err"}
        )

    def stop(self) -> None:
        """End every process of the cluster, by pid."""
        prefix = f"{self.temp_dir}/"
        for _ in range(50):
            pids = [pid for pid, tag in _tagged().items() if tag.startswith(prefix)]
            if not pids:
                return
            _kill(pids)
            time.sleep(0.1)


def start_local_cluster(head_cpus: int = 1, worker_cpus: int = 2) -> LocalRayCluster:
    """A head with `head_cpus` CPUs and, unless `worker_cpus` is 0, a worker node with `worker_cpus`."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rv-", dir="/tmp"))
    port = free_port()
    cluster = LocalRayCluster(f"127.0.0.1:{port}", temp_dir, {**os.environ, **DRIVER_ENV})
    try:
        cluster._ray_start(
            "head",
            *("--head", "--port", str(port), "--num-cpus", str(head_cpus), "--temp-dir", str(temp_dir)),
            *("--disable-usage-stats", "--include-dashboard", "false"),
        )
        if worker_cpus:
            cluster.add_node(worker_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def local_cluster(head_cpus: int = 1, worker_cpus: int = 2, keep_logs: bool = False) -> Iterator[LocalRayCluster]:
    """`start_local_cluster`, stopped (by pid) however the block ends; its temp dir (logs, spilled objects)
    removed then unless `keep_logs`."""
    cluster = start_local_cluster(head_cpus, worker_cpus)
    try:
        yield cluster
    finally:
        cluster.stop()
        if not keep_logs:
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
