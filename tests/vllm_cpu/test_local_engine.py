"""`--teacher vllm` for real: vLLM's CPU engine loads the tiny model in `refine-data annotate`'s own process
tree, passes the structured-output start-up check, and answers two sample episodes under their schema.

The model is random but for its preference for closing strings (`build_gemma_chat`), and the engine
writes compact JSON (`--vllm-args`: `disable_any_whitespace`; with whitespace allowed a random model
fills the budget with spaces). Its plans are arbitrary: the semantic checks may reject episodes, which
are then counted as rejects (with the sample's 33-70-step episodes, it takes a random plan length and
boundaries: most are); every answer must pass the JSON Schema.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from tests.vllm_cpu.conftest import (
    ENGINE_ARGS,
    EPISODES,
    annotate_sample,
    assert_every_answer_follows_the_schema,
    assert_settled_and_counted,
    refine_data,
)


def vllm_teacher(model: Path, engine_args: dict[str, Any]) -> tuple[str, ...]:
    return ("--teacher", "vllm", "--model", str(model), "--vllm-args", json.dumps(engine_args))


def test_the_local_engine_annotates_text_only_episodes_and_a_rerun_asks_nothing(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = annotate_sample(out, *vllm_teacher(tiny_model, ENGINE_ARGS))
    first = refine_data(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = assert_settled_and_counted(out, EPISODES)
    teacher = manifest["teacher"]
    assert teacher["name"] == "vllm" and teacher["model"] == str(tiny_model)
    assert teacher["vllm_package"] == "vllm-cpu"
    assert teacher["vllm_version"] == importlib.metadata.version("vllm-cpu")
    assert teacher["structured_output_api"] == "SamplingParams.structured_outputs"
    assert teacher["engine_args"] == ENGINE_ARGS
    attempts = assert_every_answer_follows_the_schema(out)
    asked = manifest["this_run"]["requests"]
    assert asked == len(attempts) >= EPISODES

    again = refine_data(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = assert_settled_and_counted(out, EPISODES)
    assert rerun["this_run"]["requests"] == 0, "a rerun asks nothing"
    assert rerun["teacher"] == teacher
    assert "Loading safetensors" not in again.stderr, "nor loads the model"
    assert rerun["counts"] == manifest["counts"] | {"annotated_this_run": 0, "cached": EPISODES}  # from the store
    assert len(assert_every_answer_follows_the_schema(out)) == len(attempts)


def test_an_engine_that_cannot_start_stops_the_run_in_one_line(tiny_model, tmp_path):
    out = tmp_path / "out"
    bad = {**ENGINE_ARGS, "no_such_engine_argument": 1}
    r = refine_data(*annotate_sample(out, *vllm_teacher(tiny_model, bad)))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vLLM could not start an engine for") and "no_such_engine_argument" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_max_tokens_that_fill_the_engines_context_window_stop_the_run_before_any_request(tiny_model, tmp_path):
    out = tmp_path / "out"
    small = {**ENGINE_ARGS, "max_model_len": 1024}  # annotate_sample asks --max-tokens 2048
    r = refine_data(*annotate_sample(out, *vllm_teacher(tiny_model, small)))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "--max-tokens 2048 leaves no room for the prompt" in last, r.stderr[-3000:]
    assert "context window of 1024 tokens" in last and "in-process vLLM engine" in last
    assert "Traceback" not in r.stderr and not (out / "refinevla.json").exists()
