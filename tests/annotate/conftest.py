"""Fixtures for the annotation tests: tiny RLDS datasets and a fault-injecting OpenAI-compatible server.

The server is a real HTTP server on 127.0.0.1 (stdlib `ThreadingHTTPServer`), so the real
`openai` client, its timeouts and its error mapping are exercised. Each episode (recognised
by the seed in its instruction, "put the spoon <seed> on the towel") can be given a script of
behaviours, consumed one per request: ok, 429, 500, 400, hang, badjson, length, schema,
semantic, smallest (the smallest instance of the request's own `response_format` schema), and the
refusals of `REFUSALS` (vLLM's "not a multimodal model", an uncompilable schema, ...).
Every request is recorded (path, headers, JSON body).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from refinevla.annotate.batch.emulator.answers import rationale_for_prompt
from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from tests.annotate.smallest import smallest_instance
from tests.conftest import tiny_episode

SEED_RE = re.compile(r"put the spoon (\d+) on the towel")

# HTTP 400 refusals by behaviour name: the error body for a request (its number on the server, its episode's seed).
REFUSALS: dict[str, Callable[[int, int | None], dict[str, Any]]] = {
    # vLLM serving a text-only model, in its error body (`ErrorResponse`): `MultiModalRegistry` raising
    # "<model> is not a multimodal model" for a request with image parts
    "not-multimodal": lambda n, seed: {
        "error": {
            "message": "Qwen/Qwen2.5-0.5B-Instruct is not a multimodal model",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    },
    # vLLM's older error body (top level), refusing a response_format schema its grammar backend cannot compile
    "uncompilable-schema": lambda n, seed: {
        "object": "error",
        "message": "The provided JSON schema contains features not supported by xgrammar.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    # a refusal refinevla knows nothing of, the same for every request but for a request id
    "refused-alike": lambda n, seed: {"error": {"message": f"request req-{n:06d} rejected by the gateway policy"}},
    # a refusal of one episode: its prompt does not fit the context window
    "too-long": lambda n, seed: {
        "error": {"message": f"prompt too long: {9000 + (seed or 0)} tokens for episode {seed}"}
    },
}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    seed: int | None
    time: float
    behaviour: str

    def user_text(self) -> str:
        for m in self.body["messages"]:
            if m["role"] == "user" and isinstance(m["content"], list):
                return next(p["text"] for p in m["content"] if p["type"] == "text")
        return ""


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class FakeTeacherServer:
    """State shared with the handler threads."""

    scripts: dict[int, list[str]] = field(default_factory=dict)  # seed -> behaviours, one per request
    default: str = "ok"
    latency: float = 0.0  # seconds before every answer
    # answers wait until this is set: a test that must see runs still going holds them here
    # instead of guessing a latency long enough for a loaded machine
    released: threading.Event = field(default_factory=lambda: _set_event())
    hang: float = 3.0  # seconds a "hang" sleeps (longer than the client timeout in tests)
    usage: tuple[int, int] = (1000, 200)  # prompt, completion tokens reported per answer
    answer: Callable[[Recorded], dict[str, Any]] | None = None  # the "ok" answer (default: rationale_for_prompt)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    # GET /v1/models and /version as `vllm serve` answers them (None: 404, as servers without them do)
    model_cards: list[dict[str, Any]] | None = None
    version: str | None = None

    def behaviour(self, seed: int | None) -> str:
        with self.lock:
            script = self.scripts.get(seed) if seed is not None else None
            return script.pop(0) if script else self.default

    def by_seed(self) -> dict[int | None, list[Recorded]]:
        out: dict[int | None, list[Recorded]] = defaultdict(list)
        for r in self.requests:
            out[r.seed].append(r)
        return out


def _handler(state: FakeTeacherServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.endswith("/v1/models") and state.model_cards is not None:
                self._send(200, {"object": "list", "data": state.model_cards})
            elif self.path == "/version" and state.version is not None:
                self._send(200, {"version": state.version})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            text = json.dumps(body["messages"])
            m = SEED_RE.search(text)
            seed = int(m.group(1)) if m else None
            kind = state.behaviour(seed)
            rec = Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body, seed, time.time(), kind)
            with state.lock:
                state.requests.append(rec)
            if not self.path.endswith("/chat/completions"):
                self._send(404, {"error": {"message": "not found"}})
                return
            state.released.wait(timeout=300)
            if state.latency:
                time.sleep(state.latency)
            if kind == "429":
                self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
                return
            if kind == "500":
                self._send(500, {"error": {"message": "internal error"}})
                return
            if kind == "404":
                self._send(404, {"error": {"message": "The model `m` does not exist"}})
                return
            if kind == "401":
                self._send(401, {"error": {"message": "invalid api key"}})
                return
            if kind == "400":
                self._send(400, {"error": {"message": "bad request: invalid image"}})
                return
            if kind in REFUSALS:
                self._send(400, REFUSALS[kind](len(state.requests), seed))
                return
            if kind == "hang":
                time.sleep(state.hang)
                self._send(200, {"error": "too late"})
                return
            answer = state.answer(rec) if state.answer is not None else rationale_for_prompt(rec.user_text())
            finish = "stop"
            if kind == "badjson":
                content = '{"observation": "a spoon", "task_plan": [ oops'
            elif kind == "length":
                content, finish = json.dumps(answer)[:-40], "length"
            elif kind == "schema":
                answer.pop("spatial_reasoning")
                answer["extra"] = 1
                content = json.dumps(answer)
            elif kind == "smallest":
                content = json.dumps(smallest_instance(body["response_format"]["json_schema"]["schema"]))
            elif kind == "semantic":
                answer["task_plan"][1]["start_step"] += 1  # leaves a gap
                content = json.dumps(answer)
            else:
                content = json.dumps(answer)
            p, c = state.usage
            self._send(
                200,
                {
                    "id": f"chatcmpl-{len(state.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                    ],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                },
                {"x-ratelimit-remaining-requests": "99"},
            )

    return Handler


@pytest.fixture
def teacher_server() -> Iterator[FakeTeacherServer]:
    """A running fault-injecting server; `.url` is its base (…/v1)."""
    with serving(FakeTeacherServer()) as state:
        yield state


@pytest.fixture
def second_teacher_server() -> Iterator[FakeTeacherServer]:
    """Another one, for tests that compare two teachers (a pilot)."""
    with serving(FakeTeacherServer()) as state:
        yield state


@contextlib.contextmanager
def serving(state: FakeTeacherServer) -> Iterator[FakeTeacherServer]:
    """Serve `state` on 127.0.0.1 for the block; `state.url` is its base (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tiny_rlds(tmp_path: Path) -> Callable[..., str]:
    """Write n Bridge-layout episodes (1 camera, 64x64) and return the `rlds:` URI."""

    def make(n: int = 4, steps: int = 10, name: str = "bridge_orig") -> str:
        eps = [tiny_episode(i, steps + (i % 3)) for i in range(n)]
        d = write_rlds(tmp_path / "src", specs.bridge_features(cameras=1, image_size=(64, 64)), eps, name=name)
        return f"rlds:{d}"

    return make


# --------------------------------------------------------------------------- real annotate processes

SECRET = "sk-test-crash-SECRET-99"  # the key the annotate processes get; never in their output


def start_annotate(uri: str, url: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "refinevla.annotate.cli",
        "annotate",
        uri,
        "--teacher",
        "openai-compatible",
        "--base-url",
        url,
        "--model",
        "fake-model",
        "--out",
        str(out),
        "--concurrency",
        "2",
        "--progress",
        "plain",
        *extra,
    ]
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def answered(out: Path) -> set[str]:
    db = out / ".refine" / "store.sqlite"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db) as conn:
            return {row[0] for row in conn.execute("SELECT episode_id FROM answers")}
    except sqlite3.OperationalError:  # tables not created yet
        return set()


def wait_for_answers(proc: subprocess.Popen[str], out: Path, n: int, deadline: float = 60.0) -> None:
    t0 = time.monotonic()
    while len(answered(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline, "the run made no progress"
        time.sleep(0.05)
