"""What the Batch API emulators (`openai_api`, `gemini_api`) share: a recorded, persisted,
steerable fake served on 127.0.0.1 (`FakeBatchAPI`), the same fake served by another process
(`FakeBatchProcess`), and the command line that serves it (`serve`).

A provider's fake subclasses `FakeBatchAPI` with its own controls and routes; all the rest is here:
every request is recorded; files, batches, `submitted` and `answered` are saved to a state dir after
every change (so a server killed with -9 and restarted carries on, and a test reads the state with
`load`); controls are steered from another process through `state_dir/controls.json`
(`write_controls`); `Fault`s lose, cut or refuse the next matching requests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, NamedTuple, TypeVar, cast

ROOT = Path(__file__).resolve().parents[2]

# answer(line id, request body) -> a response body (billed) or (HTTP status, message) (a failed line)
Answer = Callable[[str, dict[str, Any]], "dict[str, Any] | tuple[int, str]"]


NOT_JSON: Final = object()  # what `jsonl_lines` gives for a line that is not JSON


def jsonl_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    """Each non-blank line of a JSONL file: (its number, from 1; its JSON value, or `NOT_JSON`)."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = NOT_JSON
        yield number, value


def resolve_answer(answer: Answer | str) -> Answer:
    """`answer` itself, or the function a "module:function" string names."""
    if callable(answer):
        return answer
    module, _, name = answer.partition(":")
    fn: Answer = getattr(importlib.import_module(module), name)
    return fn


@dataclass
class RecordedRequest:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Fault:
    """Answer the next `times` requests matching method and path prefix with an HTTP error; or (status 0)
    do the work and then drop the connection without a response: a response lost on the way back; or
    (status -1) do the work and send only the first half of the response body: a download cut short."""

    method: str
    path: str
    status: int = 500
    message: str = "The server had an error while processing your request."
    times: int = 1


class Reply(NamedTuple):
    """What the fake answers one request with."""

    status: int
    payload: Any  # a JSON value, or bytes sent as they are
    headers: dict[str, str] = {}  # noqa: RUF012 (never mutated)
    cut: int | None = None  # a Fault's status 0 (the response is lost) or -1 (its body is cut short)


Fake = TypeVar("Fake", bound="FakeBatchAPI")
Process = TypeVar("Process", bound="FakeBatchProcess[Any]")


class FakeBatchAPI:
    """A fake Batch API's state and behaviour; `start()` (or `with`) serves it on 127.0.0.1 from a thread.

    A subclass names its `CONTROLS` (the attributes `write_controls` may set) and implements `_respond`
    (authentication and routes), `_error_body`, `_input_file` and `_is_upload`.
    """

    CONTROLS: ClassVar[tuple[str, ...]]  # the attributes controls.json may set
    BASE_PATH: ClassVar[str] = ""  # what `base_url` ends in, after host and port
    KEY_HEADER: ClassVar[tuple[str, str]]  # (header, "{}" pattern) in which a client should send its key
    JSON_TYPE: ClassVar[str] = "application/json"  # the Content-Type of JSON answers

    def __init__(
        self,
        *,
        api_key: str | None,  # the key accepted; None: any non-empty key
        answer: Answer | str,  # how each line is answered (or "module:function")
        page_size: int | None,  # the most items a list page holds (forces pagination)
        state_dir: Path | str | None,  # where the state is saved (and loaded from, if there)
        host: str,
        port: int,
    ) -> None:
        self.api_key = api_key
        self.answer: Answer | str = answer
        self.page_size = page_size
        self.faults: list[Fault] = []
        self.files: dict[str, dict[str, Any]] = {}  # file id -> file object, in creation order
        self.batches: dict[str, dict[str, Any]] = {}  # batch id -> batch object, in creation order
        self.submitted: list[str] = []  # the id of every line of every batch created
        self.answered: list[str] = []  # the id of every line answered with a response (billed)
        self.requests: list[RecordedRequest] = []
        self._contents: dict[str, bytes] = {}  # file id -> bytes, when there is no state dir
        self._runs: dict[str, dict[str, Any]] = {}  # batch id -> the fake's own bookkeeping
        self._lock = threading.RLock()
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._controls_text: str | None = None  # controls.json as last applied
        self._host, self._port = host, port
        self._server: ThreadingHTTPServer | None = None
        self.base_url = ""
        if self._state_dir is not None:
            (self._state_dir / "files").mkdir(parents=True, exist_ok=True)
            (self._state_dir / "requests").mkdir(exist_ok=True)
            self._load()

    # ------------------------------------------------------------------ serving
    def start(self: Fake) -> Fake:
        server = ThreadingHTTPServer((self._host, self._port), _handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        self.base_url = f"http://{self._host}:{server.server_address[1]}{self.BASE_PATH}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self: Fake) -> Fake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test helpers
    @classmethod
    def load(cls: type[Fake], state_dir: Path | str) -> Fake:
        """The state another process's server saved in `state_dir` (not served)."""
        return cls(state_dir=state_dir)  # type: ignore[call-arg]  # a fake's own arguments all have defaults

    @classmethod
    def write_controls(cls, state_dir: Path | str, **controls: Any) -> None:
        """Steer a server running in another process on `state_dir` (names as the fake's arguments;
        `answer` as "module:function"). Controls stay until written again, except `faults` (a list of `Fault`
        or dicts): armed by the write that gives them (and again by a server started before the next write)."""
        path = Path(state_dir) / "controls.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.pop("faults", None)
        for name, value in controls.items():
            if name not in cls.CONTROLS:
                raise ValueError(f"unknown control {name!r}")
            if name == "faults":
                value = [asdict(f) if isinstance(f, Fault) else f for f in value]
            current[name] = value
        current["written"] = time.time_ns()  # a new text each time, so equal controls written again re-arm faults
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        os.replace(tmp, path)

    def fail_next(
        self, method: str, path: str, status: int = 500, *, times: int = 1, message: str | None = None
    ) -> None:
        """Fail the next `times` requests to `method` `path...` with `status` (0: do the work, then drop the
        response; -1: do it, then cut the body short). `path` is matched as a prefix."""
        fault = Fault(method.upper(), path, status, times=times)
        fault.message = message if message is not None else self._fault_message(status)
        with self._lock:
            self.faults.append(fault)

    def content(self, file_id: str) -> bytes:
        """The bytes of a file."""
        with self._lock:
            if file_id in self._contents:
                return self._contents[file_id]
        if self._state_dir is not None and self._stored(file_id).exists():
            return self._stored(file_id).read_bytes()
        raise KeyError(file_id)

    def leaks(self, secret: str) -> list[str]:
        """Where the client sent `secret` other than in its API key header (paths, other headers, bodies,
        uploaded files): [] when nowhere."""
        found = []
        needle = secret.encode()
        key_header, key_value = self.KEY_HEADER
        for i, r in enumerate(self.requests):
            if secret in r.path:
                found.append(f"request {i} path")
            for name, value in r.headers.items():
                if secret in value and not (name == key_header and value == key_value.format(secret)):
                    found.append(f"request {i} header {name}")
            if needle in r.body:
                found.append(f"request {i} body")
        uploaded = [file_id for file_id, file in self.files.items() if self._is_upload(file)]
        found += [f"file {file_id}" for file_id in uploaded if needle in self.content(file_id)]
        return found

    def batch_lines(self, batch_id: str) -> list[dict[str, Any]]:
        """The parsed lines of a batch's input file."""
        data = self.content(self._input_file(self.batches[batch_id]))
        return [json.loads(line) for line in data.split(b"\n") if line.strip()]

    # ------------------------------------------------------------- the API
    def _answer(self, line_id: str, request: dict[str, Any]) -> dict[str, Any] | tuple[int, str]:
        """How `answer` (as the controls now have it) answers one line of a batch."""
        return resolve_answer(self.answer)(line_id, request)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """One request -> its reply: recorded, then answered (or refused, lost or cut by a `Fault`)."""
        with self._lock:
            self._record(RecordedRequest(method, path, headers, body))
            self._reload_controls()
            fault = next((f for f in self.faults if f.method == method and path.startswith(f.path)), None)
            if fault is None:
                return self._respond(method, path, headers, body)
            fault.times -= 1
            if fault.times <= 0:
                self.faults.remove(fault)
            if fault.status > 0:
                return Reply(fault.status, self._error_body(fault.status, fault.message))
            return self._respond(method, path, headers, body)._replace(cut=fault.status)

    def _respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """Authenticate and answer one request (faults are handled already)."""
        raise NotImplementedError

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        """The provider's error payload for an HTTP error."""
        raise NotImplementedError

    def _headers(self, path: str) -> dict[str, str]:
        """Headers every response to `path` carries (a reply's own override them)."""
        return {}

    def _fault_message(self, status: int) -> str:
        """What `fail_next` says when not told."""
        return Fault.message

    def _input_file(self, batch: dict[str, Any]) -> str:
        """The id of a batch's input file."""
        raise NotImplementedError

    def _is_upload(self, file: dict[str, Any]) -> bool:
        """Whether the client uploaded this file (rather than the fake writing it)."""
        raise NotImplementedError

    # ------------------------------------------------------------ persistence
    def _stored(self, file_id: str) -> Path:
        assert self._state_dir is not None
        return self._state_dir / "files" / file_id.removeprefix("files/")  # Gemini's ids are "files/..."

    def _store_file(self, file_id: str, data: bytes) -> None:
        """Keep a new file's bytes (on disk when there is a state dir)."""
        if self._state_dir is None:
            self._contents[file_id] = data
            return
        tmp = self._stored(file_id).with_name(self._stored(file_id).name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self._stored(file_id))

    def _delete_file(self, file_id: str) -> None:
        del self.files[file_id]
        self._contents.pop(file_id, None)
        if self._state_dir is not None:
            self._stored(file_id).unlink(missing_ok=True)
        self._save()

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        if self._state_dir is None:
            return
        number = len(self.requests)
        (self._state_dir / "requests" / f"{number:06d}.body").write_bytes(request.body)
        entry = {"method": request.method, "path": request.path, "headers": request.headers, "n": number}
        with open(self._state_dir / "requests.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _save(self) -> None:
        if self._state_dir is None:
            return
        state = {
            "files": self.files,
            "batches": self.batches,
            "runs": self._runs,
            "submitted": self.submitted,
            "answered": self.answered,
        }
        tmp = self._state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_dir / "state.json")

    def _load(self) -> None:
        assert self._state_dir is not None
        path = self._state_dir / "state.json"
        if path.exists():
            state = json.loads(path.read_text())
            self.files, self.batches, self._runs = state["files"], state["batches"], state["runs"]
            self.submitted, self.answered = state["submitted"], state["answered"]
        log = self._state_dir / "requests.jsonl"
        if log.exists():
            for _, entry in jsonl_lines(log.read_bytes()):
                if entry is NOT_JSON:  # the last line may be half written by a running server
                    continue
                body = (self._state_dir / "requests" / f"{entry['n']:06d}.body").read_bytes()
                self.requests.append(RecordedRequest(entry["method"], entry["path"], entry["headers"], body))
        self._reload_controls()

    def _reload_controls(self) -> None:
        """Apply `state_dir/controls.json` when it changed (how a test steers a server in another process).

        Its `faults` are armed each time the file changes, and again by a server started on the state dir.
        """
        if self._state_dir is None:
            return
        try:
            text = (self._state_dir / "controls.json").read_text()
        except FileNotFoundError:
            return
        if text == self._controls_text:
            return
        self._controls_text = text
        for name, value in json.loads(text).items():
            if name == "written":
                continue
            if name not in self.CONTROLS:
                raise ValueError(f"unknown control {name!r} in {self._state_dir / 'controls.json'}")
            setattr(self, name, [Fault(**f) for f in value] if name == "faults" else value)


def _handler(fake: FakeBatchAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _serve(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                reply = fake.handle(self.command, self.path, headers, self._body())
            except Exception as exc:  # a bug in the fake or a test's answer(): say so loudly
                traceback.print_exc()
                reply = Reply(500, fake._error_body(500, f"fake server error: {exc!r}"))
            if reply.cut == 0:  # the response is lost
                self.close_connection = True
                return
            if isinstance(reply.payload, bytes):
                data, kind = reply.payload, "application/octet-stream"
            else:
                data, kind = json.dumps(reply.payload).encode(), fake.JSON_TYPE
            self.send_response(reply.status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for name, value in {**fake._headers(self.path), **reply.headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.cut == -1:  # the body is cut short: half of it, then the connection closes
                data = data[: len(data) // 2]
                self.close_connection = True
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

    return Handler


class FakeBatchProcess(Generic[Fake]):
    """A fake served by another process on `state_dir`: it outlives a kill -9 of the client under test.

    A subclass names the fake (`FAKE`), whose module serves it with `python -m`. `with
    Process(tmp_path / "api", api_key=KEY, answer="module:function") as server:` then `server.base_url`,
    `server.records()`, `server.set(...)`. Options are the fake's arguments (`answer` as "module:function");
    `kill()` then `start()` restarts the server on the same state (on a new port: read `base_url` again).
    """

    FAKE: ClassVar[type[FakeBatchAPI]]

    def __init__(self, state_dir: Path | str, **options: Any) -> None:
        self.state_dir = Path(state_dir)
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self: Process, timeout: float = 30.0) -> Process:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ready = self.state_dir / "server.json"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", self.FAKE.__module__, "--state-dir", str(self.state_dir)]
        for name, value in self.options.items():
            flag = f"--{name.replace('_', '-')}"
            if value is True:
                args.append(flag)
            elif value is not None and value is not False:
                args += [flag, str(value)]
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake {self.FAKE.__name__} did not start (exit code {self.process.poll()})")
            time.sleep(0.02)
        self.base_url = json.loads(ready.read_text())["base_url"]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        """kill -9 the server (its state stays in `state_dir`)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def records(self) -> Fake:
        """What the server has recorded so far (files, batches, submitted, answered, requests)."""
        return cast(Fake, self.FAKE.load(self.state_dir))

    def set(self, **controls: Any) -> None:
        """Change the server's controls (see `FakeBatchAPI.write_controls`)."""
        self.FAKE.write_controls(self.state_dir, **controls)

    def __enter__(self: Process) -> Process:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    fake: type[FakeBatchAPI],
    argv: list[str] | None,
    description: str,
    *,
    numbers: tuple[str, ...] = (),
    switches: tuple[str, ...] = (),
) -> None:
    """The command line of a fake's module: serve it on `--state-dir` until killed, saying where in
    `state_dir/server.json`. Besides the shared options it takes the fake's `numbers` and `switches`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--answer", help="module:function (default: the fake's echo_answer)")
    parser.add_argument("--fail-batch")
    for name in (*numbers, "page_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in switches:
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=None)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("port", "state_dir")}
    server = fake(state_dir=args.state_dir, port=args.port, **options).start()
    tmp = args.state_dir / "server.json.tmp"
    tmp.write_text(json.dumps({"base_url": server.base_url, "pid": os.getpid()}))
    os.replace(tmp, args.state_dir / "server.json")
    print(f"ready {server.base_url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
