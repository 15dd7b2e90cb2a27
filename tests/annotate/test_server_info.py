"""What a self-hosted server says of itself (`annotate/teachers/server_info.py`): the manifest names the vLLM
behind `--teacher openai-compatible` (kept by a rerun that asks nothing), and a `--max-tokens` that fills the
served model's context window stops the run before the first request.

The server here answers GET /v1/models and /version exactly as `vllm serve` does (its `ModelCard`:
`owned_by: "vllm"`, `max_model_len`); tests/vllm_cpu asks the real server the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.annotate.conftest import SECRET, start_annotate


def vllm_like(server, max_model_len: int = 32768) -> None:
    server.model_cards = [
        {"id": "other", "object": "model", "owned_by": "vllm", "max_model_len": 1},
        {
            "id": "fake-model",
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "max_model_len": max_model_len,
        },
    ]
    server.version = "0.99.1"


def run(uri: str, url: str, out: Path, *extra: str) -> tuple[int, str]:
    proc = start_annotate(uri, url, out, "--progress", "none", *extra)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_the_manifest_names_the_vllm_behind_the_url_and_a_rerun_keeps_it(tiny_rlds, teacher_server, tmp_path):
    vllm_like(teacher_server)
    uri, out = tiny_rlds(n=2), tmp_path / "out"
    rc, err = run(uri, teacher_server.url, out)
    assert rc == 0, err[-3000:]
    teacher = json.loads((out / "refinevla.json").read_text())["teacher"]
    assert teacher["server"] == {"software": "vllm", "version": "0.99.1", "max_model_len": 32768}  # fake-model's card
    posts = [r for r in teacher_server.requests if r.path.endswith("/chat/completions")]
    assert len(posts) == 2

    teacher_server.model_cards, teacher_server.version = None, None  # a rerun asks the server nothing
    rc, err = run(uri, teacher_server.url, out)
    assert rc == 0, err[-3000:]
    again = json.loads((out / "refinevla.json").read_text())
    assert again["this_run"]["requests"] == 0 and again["teacher"]["server"] == teacher["server"]


def test_a_server_that_does_not_describe_itself_is_recorded_as_unknown(tiny_rlds, teacher_server, tmp_path):
    uri, out = tiny_rlds(n=1), tmp_path / "out"
    rc, err = run(uri, teacher_server.url, out)
    assert rc == 0, err[-3000:]
    teacher = json.loads((out / "refinevla.json").read_text())["teacher"]
    assert teacher["server"] == {"software": None, "version": None, "max_model_len": None}


def test_max_tokens_that_fill_the_context_window_stop_the_run_before_any_request(tiny_rlds, teacher_server, tmp_path):
    vllm_like(teacher_server, max_model_len=2048)
    uri, out = tiny_rlds(n=2), tmp_path / "out"
    rc, err = run(uri, teacher_server.url, out, "--max-tokens", "2048")
    assert rc != 0
    last = err.strip().splitlines()[-1]
    assert "--max-tokens 2048 leaves no room for the prompt" in last and "context window of 2048 tokens" in last, err
    assert teacher_server.url in last and "Traceback" not in err and SECRET not in err
    assert not [r for r in teacher_server.requests if r.path.endswith("/chat/completions")], "nothing asked"
    assert not (out / "refinevla.json").exists()

    rc, err = run(uri, teacher_server.url, out, "--max-tokens", "1024")  # the fix: the same command runs
    assert rc == 0, err[-3000:]
