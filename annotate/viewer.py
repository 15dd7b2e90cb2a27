"""What `refine-data view` and `refine-eval view` share: Rerun itself, the 7-d plots, the one-line summary, and
where a recording goes — a .rrd file (`--save`), the native viewer, or the web viewer (`--serve`).

Every Rerun server refinevla starts listens on 127.0.0.1 unless the user passes `--bind ADDR`: a viewer hands the
recording (frames, rationales) to whoever reaches its port, and Rerun's own defaults listen on every interface —
the SDK's `spawn()` runs `rerun --port 9876`, whose `--bind` defaults to 0.0.0.0 (measured with rerun-sdk 0.41:
the spawned viewer's gRPC server on 0.0.0.0). So refinevla starts the `rerun` binary itself, with the address and
both ports spelled out, waits until it listens, and connects the recording to it.

This module stays light (no Rerun, no numpy at import), so the command lines take their options from it and
`--help` stays instant; Rerun (`rerun-sdk`, the `[viz]` extra) is imported by `import_rerun` when a command runs.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Annotated, Any
from urllib.parse import quote

import typer

from .errors import RefineError

VIZ_EXTRA = "pip install 'refinevla[viz]'"
APP_ID = "refinevla"
DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")  # the 7 scalars of a state or an action
LOOPBACK = "127.0.0.1"
WEB_PORT = 9090  # Rerun's own default web viewer port
GRPC_PORT = 9876  # Rerun's own default gRPC (viewer / proxy) port
START_TIMEOUT_S = 30.0  # how long a starting `rerun` may take to listen (the binary starts in well under a second)
EXIT_GRACE_S = 2.0  # a `rerun` whose socket just closed is given this long to end before its port counts as taken

# The options both view commands take (Typer's Annotated reuse: declared once, the defaults are the constants above)
SaveOpt = Annotated[Path | None, typer.Option("--save", help="Write a Rerun recording (.rrd) instead.")]
ServeOpt = Annotated[
    bool,
    typer.Option(
        "--serve",
        help="Serve Rerun's web viewer and the recording's gRPC server on --bind (a remote machine: SSH-tunnel both).",
    ),
]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="--serve: the web viewer's port.")]
GrpcPortOpt = Annotated[
    int,
    typer.Option(
        "--grpc-port",
        min=1,
        max=65535,
        help="The Rerun gRPC server's port: the native viewer's, or with --serve the one the web viewer reads from.",
    ),
]
BindOpt = Annotated[
    str,
    typer.Option(
        "--bind",
        help="The address every Rerun server started here listens on (0.0.0.0 or ::: every interface, open to all).",
    ),
]


def import_rerun() -> Any:
    """The rerun module, or one line saying how to get it."""
    try:
        import rerun
    except ImportError as exc:
        raise RefineError(f"viewing needs the [viz] extra: {VIZ_EXTRA} ({exc})") from None
    return rerun


def log_series(stream: Any, rr: Any, path: str, values: Sequence[Any]) -> None:
    """Per-step 7-d vectors (a state, an action) at `path` on the `step` timeline: one plot line per name of DIMS."""
    import numpy as np

    stream.log(path, rr.SeriesLines(names=list(DIMS)), static=True)
    for t, value in enumerate(values):
        stream.set_time("step", sequence=t)
        stream.log(path, rr.Scalars(np.asarray(value, dtype=np.float64)))


@dataclass
class ViewSummary:
    """What a view command logged and where; `line()` is the line it prints (a count left None is not printed)."""

    episodes: int
    where: str
    steps: int | None = None
    frames: int | None = None
    boxes: int | None = None

    def line(self) -> str:
        counts = [f"{self.episodes} episode(s)"]
        for count, noun in ((self.steps, "steps"), (self.frames, "frames"), (self.boxes, "box(es)")):
            if count is not None:
                counts.append(f"{count} {noun}")
        return f"logged {', '.join(counts)} to {self.where}"


def connect_host(bind: str) -> str:
    """Where this machine reaches a server bound to `bind` (a wildcard address is reached on loopback)."""
    return {"0.0.0.0": LOOPBACK, "::": "::1"}.get(bind, bind)


def url_host(host: str) -> str:
    """`host` as a URL spells it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def grpc_url(bind: str, port: int) -> str:
    """The gRPC URL the SDK and the viewers use for a server bound to `bind` on `port`."""
    return f"rerun+http://{url_host(connect_host(bind))}:{port}/proxy"


def accepts(host: str, port: int) -> bool:
    """Whether something listens on host:port (a TCP connection is accepted)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def check_port_free(bind: str, port: int, flag: str) -> None:
    """One line naming the port when `rerun` could not listen on bind:port (checked by binding it first).

    SO_REUSEADDR as servers set it: a port left in TIME_WAIT by an earlier run counts as free, one that something
    listens on (on this address or a wildcard) does not.
    """
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RefineError(
                    f"port {port} is already in use on {bind} ({flag}): stop what listens there or pick another "
                    f"port with {flag}"
                ) from None
            raise RefineError(f"--bind {bind}: cannot listen on {bind}:{port} ({exc.strerror})") from None


def rerun_executable() -> str:
    """The `rerun` binary of the installed rerun-sdk (its `rerun_cli` package), found as `python -m rerun_cli` finds it.

    Run directly, not through `python -m rerun_cli`: that wrapper drops the binary's exit status and, when it is
    terminated itself, leaves the binary running.
    """
    import importlib.util

    if os.environ.get("RERUN_CLI_PATH"):
        return os.environ["RERUN_CLI_PATH"]
    spec = importlib.util.find_spec("rerun_cli")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    if folder is not None:
        for candidate in ("Rerun.app/Contents/MacOS/Rerun", "rerun", "rerun.exe"):
            if (folder / candidate).is_file():
                return str(folder / candidate)
    raise RefineError(f"rerun-sdk's `rerun` binary is missing (in {folder}); reinstall it: {VIZ_EXTRA}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+")


@dataclass
class RerunProcess:
    """A `rerun` process refinevla started: the leader of its own process group (so stopping it stops all of it,
    and a Ctrl-C at the terminal reaches refinevla, which stops it), its output in `log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, args: list[str], host: str, ports: Sequence[int], what: str) -> RerunProcess:
        """`rerun ARGS`, returned once it listens on every port (reached on `host`).

        One line when it cannot: it exited first (its own last error line, e.g. the address it could not bind),
        another process holds one of the ports (rerun 0.41 then may hang without a word), or it is not listening
        after START_TIMEOUT_S. Its exit status says nothing: the bundled binary exits 0 on some errors.
        """
        fd, name = tempfile.mkstemp(prefix="refine-rerun-", suffix=".log")
        os.close(fd)
        log = Path(name)
        env = {**os.environ, "RERUN_APP_ONLY": "true"}  # as the SDK's own spawn: no analytics opt-in banner
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [rerun_executable(), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        server = cls(proc, log)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            where = f"{host} port{'s' if len(ports) > 1 else ''} {', '.join(str(p) for p in ports)}"
            for port in ports:
                while not server.listens(host, port):
                    if accepts(host, port) and not server.listens(host, port):
                        raise server.listener_error(host, port, what)
                    if proc.poll() is not None:
                        raise RefineError(f"{what} exited before listening on {where} ({server.last_error()})")
                    if time.monotonic() > deadline:
                        raise RefineError(
                            f"{what} is not listening on {where} after {START_TIMEOUT_S:.0f} s ({server.last_error()})"
                        )
                    time.sleep(0.1)
        except BaseException:
            server.stop()
            log.unlink(missing_ok=True)  # what it said is in the error
            raise
        return server

    def listens(self, host: str, port: int) -> bool:
        """Whether this process listens on `port`: read from /proc on Linux, since a port that someone else took
        since `check_port_free` accepts connections too; elsewhere, whether host:port accepts a connection."""
        if not Path("/proc/net/tcp").is_file():
            return accepts(host, port)
        return bool(_listening_inodes(port) & _socket_inodes(self.proc.pid))

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def listener_error(self, host: str, port: int, what: str) -> RefineError:
        """Why it is not the one listening on `port`, which accepted a connection: another process took the port
        (rerun 0.41 may then hang without a word, or exit with its own "Address already in use"), or it was
        itself, gone since. A viewer that dies at its first connection (no graphics driver it can draw with) may
        start listening just after `listens` looked, take the `accepts` probe's connection and close its socket
        before `listens` looks again; its process ends a moment later, and then nothing listens there."""
        try:
            self.proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            return RefineError(f"port {port} on {host} was taken by another process as {what} started")
        if accepts(host, port):
            return RefineError(
                f"port {port} on {host} was taken by another process as {what} started ({self.last_error()})"
            )
        return RefineError(f"{what} exited ({self.last_error()})")

    def last_error(self) -> str:
        """The last line of its log that says what went wrong (else its last line), without colours or timestamp."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        lines = [_TIMESTAMP.sub("", _ANSI.sub("", line)).strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        errors = [line for line in lines if "error" in line.lower()]
        line = (errors or lines or [f"exit status {self.proc.returncode}"])[-1]
        return line if len(line) <= 300 else line[:297] + "..."

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 10 s; nothing when it has exited."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def serve_until_stopped(self) -> int:
        """Block until it exits (its status) or refinevla is stopped — Ctrl-C or SIGTERM: it is stopped too, and 0."""
        with _sigterm_as_interrupt():
            try:
                while True:
                    # Waited in slices: the SDK's threads may take the signal, and Python runs its handler only
                    # when the main thread runs again, never while it blocks in waitpid.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        return self.proc.wait(timeout=0.2)
            except KeyboardInterrupt:
                self.stop()
                return 0
            finally:
                self.log.unlink(missing_ok=True)


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on TCP `port`, IPv4 and IPv6 (/proc/net/tcp*: local address hex:port, state 0A)."""
    inodes = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open (/proc/PID/fd: links to socket:[INODE])."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    return inodes


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A `kill` of refinevla ends like Ctrl-C, so the server in its own process group is not left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class ViewTarget:
    """Where a view command sends its recording, as its flags say."""

    save: Path | None = None  # --save: the .rrd file (with --serve, the file served; default a temporary one)
    serve: bool = False  # --serve: Rerun's web viewer and a gRPC server, instead of the native viewer
    port: int = WEB_PORT  # --port: the web viewer's HTTP port (--serve)
    grpc_port: int = GRPC_PORT  # --grpc-port: the native viewer's, or --serve's gRPC server's, port
    bind: str = LOOPBACK  # --bind: the address every Rerun server refinevla starts listens on

    def checked(self) -> ViewTarget:
        """This target once its flags hold together, each mistake one line before anything is logged: the address
        is an IP; for --serve, both ports are free and the recording has a file (a temporary one without --save)."""
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise RefineError(f"--bind {self.bind}: not an IP address (e.g. 127.0.0.1, ::1, 0.0.0.0)") from None
        if not self.serve:
            return self
        if self.port == self.grpc_port:
            raise RefineError(f"--port and --grpc-port are both {self.port}: the web viewer and gRPC need one each")
        self.check_ports()
        if self.save is not None:
            return self
        return replace(self, save=Path(tempfile.mkdtemp(prefix="refine-view-")) / "view.rrd")

    def check_ports(self) -> None:
        check_port_free(self.bind, self.port, "--port")
        check_port_free(self.bind, self.grpc_port, "--grpc-port")

    def web_viewer_url(self) -> str:
        """The page to open: the web viewer, told where its gRPC server is."""
        host = url_host(connect_host(self.bind))
        return f"http://{host}:{self.port}?url={quote(grpc_url(self.bind, self.grpc_port), safe='')}"


def start_native_viewer(target: ViewTarget) -> RerunProcess:
    """A native viewer listening on target.bind:grpc_port, detached (it stays open when the command ends)."""
    args = ["--bind", target.bind, "--port", str(target.grpc_port)]
    args += ["--memory-limit", "75%", "--expect-data-soon"]  # what the SDK's spawn passes
    try:
        return RerunProcess.start(args, connect_host(target.bind), [target.grpc_port], "the Rerun viewer")
    except RefineError as exc:
        raise RefineError(f"cannot start the Rerun viewer here: {exc}; use --save FILE.rrd or --serve") from None


def start_web_viewer(target: ViewTarget) -> RerunProcess:
    """Rerun's web viewer (HTTP, target.port) and a gRPC server (target.grpc_port) for target.save, on target.bind.

    The ports are checked again: logging may have taken minutes since `checked()`.
    """
    if target.save is None:
        raise ValueError("start_web_viewer needs the recording: ViewTarget.checked() sets it")
    target.check_ports()
    args = ["--serve-web", "--bind", target.bind, "--web-viewer-port", str(target.port)]
    args += ["--port", str(target.grpc_port), str(target.save)]
    host = connect_host(target.bind)
    return RerunProcess.start(args, host, [target.port, target.grpc_port], "Rerun's web viewer")


class Recording:
    """A Rerun recording stream opened on its target: a file (--save, and what --serve serves), else a native
    viewer — the one already listening on the gRPC port (as the SDK's spawn reuses it, so a second view adds its
    episodes beside the first's), or one refinevla starts on target.bind."""

    def __init__(self, rr: Any, recording_id: str, target: ViewTarget) -> None:
        self.stream = rr.RecordingStream(APP_ID, recording_id=recording_id)
        self.viewer: RerunProcess | None = None  # the native viewer refinevla started, if it did
        self.streams_to_viewer = target.save is None  # over gRPC, to a viewer (else into the file)
        if target.save is not None:
            target.save.parent.mkdir(parents=True, exist_ok=True)
            self.stream.save(str(target.save))
            self.where = str(target.save)
            return
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise RefineError(
                "no display to open the Rerun viewer on (DISPLAY is not set): use --save FILE.rrd, or --serve and "
                "open the web viewer through an SSH tunnel"
            )
        url = grpc_url(target.bind, target.grpc_port)
        if accepts(connect_host(target.bind), target.grpc_port):
            self.where = f"the Rerun viewer already listening at {url}"
        else:
            self.viewer = start_native_viewer(target)
            self.where = f"the Rerun viewer (pid {self.viewer.pid}) at {url}"
        self.stream.connect_grpc(url)

    def close(self) -> str:
        """Flush everything logged; where it went. A viewer that died meanwhile (e.g. no graphics driver it can
        draw with: it exits a moment after it listens) or a connection lost is one line, not a traceback or a
        silent loss. (The SDK's own log lines about the failed sends may come before it.)"""
        viewer = self.viewer
        if viewer is not None and viewer.exited():
            raise _viewer_exited(viewer)
        try:
            self.stream.flush()
        except RuntimeError as exc:  # how the SDK reports a gRPC connection that broke
            if not self.streams_to_viewer:
                raise
            if viewer is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    viewer.proc.wait(timeout=2)  # a viewer that is going away: its exit, and why
                if viewer.exited():
                    raise _viewer_exited(viewer) from None
            first = (str(exc).strip().splitlines() or [""])[0]
            raise RefineError(f"lost {self.where} ({first}); use --save FILE.rrd or --serve") from None
        if viewer is not None and viewer.exited():
            raise _viewer_exited(viewer)
        return self.where


def _viewer_exited(viewer: RerunProcess) -> RefineError:
    return RefineError(
        f"the Rerun viewer exited ({viewer.last_error()}); use --save FILE.rrd or --serve (its log: {viewer.log})"
    )


def report_and_serve(summary: ViewSummary, target: ViewTarget) -> int:
    """Print the summary; with --serve, then serve the recording until Ctrl-C. The exit status."""
    typer.echo(summary.line())
    if not target.serve:
        return 0
    server = start_web_viewer(target)
    typer.echo(
        f"serving Rerun's web viewer at {target.web_viewer_url()} (web {target.port} and gRPC {target.grpc_port} "
        f"on {target.bind}; Ctrl-C to stop)",
        err=True,
    )
    return server.serve_until_stopped()
