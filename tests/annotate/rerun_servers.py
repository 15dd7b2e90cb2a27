"""The Rerun servers `refine-data view` and `refine-eval view` start, as the tests see them: every listening TCP
socket of a process tree (IPv4 and IPv6), a virtual X display for the native viewer, and killing all of it.

psutil comes with the [ray] extra; Xvfb and a Vulkan driver the viewer can draw with there (Mesa's lavapipe) are apt
packages (`scripts/install_xvfb.sh`, `scripts/install_cpu_vulkan.sh`): without them the native viewer's tests skip,
saying which is missing (in CI, which installs both, REFINEVLA_REQUIRE_ALL=1 turns such a skip into a failure).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = {"127.0.0.1", "::1"}


def import_psutil() -> Any:
    """psutil, or a skip (imported per test, so a machine without it still runs the other view tests)."""
    return pytest.importorskip("psutil", reason="psutil: needs the [ray] extra")


class ProcessTree:
    """A process a test started, and every descendant it has been seen with: `kill()` kills them all (each in its
    own process group too, as refinevla's Rerun servers are), even after the root has exited."""

    def __init__(self, pid: int) -> None:
        self.psutil = import_psutil()
        self.root = self.psutil.Process(pid)
        self.seen: dict[int, Any] = {pid: self.root}

    def processes(self) -> list[Any]:
        procs = [self.root, *self.root.children(recursive=True)]
        self.seen.update((p.pid, p) for p in procs)
        return procs

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every listening TCP socket, IPv4 and IPv6, of the tree now."""
        psutil, found = self.psutil, set()
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((conn.laddr.ip, conn.laddr.port))
        return found

    def kill(self) -> None:
        psutil = self.psutil
        with contextlib.suppress(psutil.NoSuchProcess):
            self.processes()
        ours = os.getpgrp()
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                group = os.getpgid(proc.pid)
                if proc.is_running() and group != ours:  # psutil: the same process, not a reused pid
                    os.killpg(group, signal.SIGKILL)
                proc.kill()


def assert_loopback_only(tree: ProcessTree, ports: set[int]) -> set[tuple[str, int]]:
    """Every listening socket of the tree is on 127.0.0.1 or ::1, and each of `ports` is among them."""
    sockets = tree.listening()
    assert ports <= {port for _, port in sockets}, sockets
    assert {address for address, _ in sockets} <= LOOPBACK, sockets
    return sockets


def on_display(display: str) -> dict[str, str]:
    """This environment with X display `display` as the only one (no Wayland)."""
    return {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"} | {"DISPLAY": display}


def check_native_viewer(stdout: str, port: int) -> None:
    """The viewer a view command says it started (`... to the Rerun viewer (pid N) at URL`) is still open after the
    command and listens on 127.0.0.1:port and nothing else; then it is killed."""
    found = re.search(r" to the Rerun viewer \(pid (\d+)\) at (\S+)", stdout)
    assert found and found[2] == f"rerun+http://127.0.0.1:{port}/proxy", stdout
    tree = ProcessTree(int(found[1]))
    try:
        assert tree.root.is_running()  # it stays open when the command ends
        assert {p for _, p in assert_loopback_only(tree, {port})} == {port}
    finally:
        tree.kill()


@contextlib.contextmanager
def serving(cmd: list[str], logs: Path, timeout: float = 120) -> Iterator[ProcessTree]:
    """Run a view command with --serve as a user does, in its own session (a Ctrl-C reaches it alone); yield its
    process tree once it printed its serving line; then Ctrl-C it and check that nothing of the tree is left. The
    whole tree is killed whatever happens. Its output: logs/stdout, logs/stderr."""
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    tree = ProcessTree(proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while "serving" not in (logs / "stderr").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (logs / "stderr").read_text()
            time.sleep(0.2)
        yield tree
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        left = [p.pid for p in tree.seen.values() if p.is_running() and p.status() != tree.psutil.STATUS_ZOMBIE]
        assert not left, f"Ctrl-C left {left} running"
    finally:
        tree.kill()
        if proc.poll() is None:
            proc.wait(timeout=30)


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A virtual X display (`:N`, a free N that Xvfb picks), killed with every process that ran on it."""
    psutil = import_psutil()
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (scripts/install_xvfb.sh)")
    if not any(Path(d).glob("*lvp*") for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d")):
        pytest.skip("no Vulkan lavapipe ICD for the native viewer to draw with (scripts/install_cpu_vulkan.sh)")
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write)
    display = ""
    try:
        ready, _, _ = select.select([read], [], [], 30)
        number = os.read(read, 64).decode().strip() if ready else ""
        assert number.isdigit(), f"Xvfb did not report its display (exit status {xvfb.poll()})"
        display = f":{number}"
        yield display
    finally:
        os.close(read)
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if display and proc.environ().get("DISPLAY") == display:
                    ProcessTree(proc.pid).kill()
        os.killpg(xvfb.pid, signal.SIGKILL)
        xvfb.wait()
