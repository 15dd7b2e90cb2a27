"""A real two-node Ray cluster on 127.0.0.1 for the `--backend ray` tests.

Two `ray start` nodes on this machine (a head with 1 CPU, a worker with 2), each its own raylet,
so a node can be lost with `kill -9` on its raylet. Everything binds to 127.0.0.1, and every
process is stopped by pid (its temp dir is in its arguments): `ray stop` would end every Ray
process on the machine. Token authentication is off for this private test cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MARKER = "REFINEVLA_TEST_RAY_CLUSTER"  # in the environment of every process of a test cluster


def _pids(marker: str, also: str = "") -> list[int]:
    """This cluster's processes: `MARKER=marker` in their environment (Ray's agents rename themselves, so
    their command lines do not say), and `also` in their command line."""
    out = []
    tag = f"{MARKER}={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in environ and also in cmd:
            out.append(int(proc.name))
    return out


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]

    def _ray(self, *args: str) -> None:
        r = subprocess.run(["ray", *args], capture_output=True, text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    def add_worker(self, cpus: int = 2) -> None:
        self._ray("start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus))

    def kill_worker_node(self) -> None:
        """Lose the worker node: its raylet (and with it its workers) killed with SIGKILL."""
        raylets = _pids(str(self.temp_dir), "sockets/raylet.1")
        assert raylets, "no worker raylet found"
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)

    def logs_contain(self, text: str) -> bool:
        needle = text.encode()
        return any(
            needle in f.read_bytes()
            for f in self.temp_dir.rglob("*")
            if f.is_file() and f.suffix in {".log", ".out", ".err"}
        )

    def stop(self) -> None:
        for _ in range(3):
            pids = _pids(str(self.temp_dir))
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


def start_cluster(head_cpus: int = 1, worker_cpus: int = 2) -> RayCluster:
    """Head (1 CPU) + worker node (2 CPUs), both on 127.0.0.1; no worker node with `worker_cpus=0`."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rv-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {**os.environ, **ENV, MARKER: str(temp_dir)}
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, env)
    try:
        cluster._ray(
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            str(head_cpus),
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
            "--include-dashboard",
            "false",
        )
        if worker_cpus:
            cluster.add_worker(worker_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def running_cluster(head_cpus: int = 1, worker_cpus: int = 2) -> Iterator[RayCluster]:
    """`start_cluster`, stopped (by pid) however the block ends."""
    cluster = start_cluster(head_cpus, worker_cpus)
    try:
        yield cluster
    finally:
        cluster.stop()
