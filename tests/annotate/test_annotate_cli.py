"""`refine-data annotate` end to end: outputs, reruns, dry runs, budgets, request shapes, key hygiene."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.schemas import teacher_schema, validate

SECRET = "sk-test-DO-NOT-LEAK-4f9a1c"


def annotate(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["annotate", *args, "--progress", "none"], env=env)
    return result


def test_rule_based_run_writes_the_published_layout_and_a_rerun_is_cached(tiny_rlds, tmp_path):
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    r = annotate(uri, "--out", str(out))
    assert r.exit_code == 0, r.output
    steps = pl.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    episodes = pl.read_parquet(out / "episodes" / "train-00000-of-00001.parquet")
    assert episodes.height == 3 and steps.height == 10 + 11 + 12
    assert steps.columns[:3] == ["episode_id", "step", "instruction"]
    assert {"subtask", "subtask_reason", "move", "move_reason", "gripper", "action", "state"} <= set(steps.columns)
    assert set(steps["gripper"]) == {"open", "closed"}
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["teacher"]["written_by_model"] is False and "no model" in manifest["teacher"]["note"]
    assert manifest["counts"]["episodes"] == 3 and manifest["schema"]["id"] == "refinevla.rationale/1"
    assert len(manifest["prompt"]["sha256"]) == 64
    # Rows rebuild into schema-valid records.
    ep = episodes.row(0, named=True)
    rows = steps.filter(pl.col("episode_id") == ep["episode_id"]).sort("step")
    record = {
        k: ep[k]
        for k in (
            "schema_id",
            "episode_id",
            "instruction",
            "num_steps",
            "observation",
            "situation_analysis",
            "spatial_reasoning",
            "task_plan",
            "objects",
            "move_reasons",
        )
    }
    record["steps"] = rows.select("step", "subtask", "subtask_reason", "move", "move_reason", "gripper").to_dicts()
    assert validate(record) == []

    again = annotate(uri, "--out", str(out))
    assert again.exit_code == 0
    manifest2 = json.loads((out / "refinevla.json").read_text())
    assert manifest2["counts"]["cached"] == 3 and manifest2["counts"]["annotated_this_run"] == 0
    assert pl.read_parquet(out / "data").height == steps.height
    assert not list(out.rglob(".*.partial"))


def test_dry_run_prints_the_first_request_and_an_estimate_and_asks_nothing(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    r = annotate(
        uri,
        "--teacher",
        "gemini",
        "--base-url",
        teacher_server.url,
        "--out",
        str(out),
        "--dry-run",
        env={"GEMINI_API_KEY": SECRET},
    )
    assert r.exit_code == 0, r.output
    assert teacher_server.requests == [] and not out.exists()
    body = json.loads(r.output[: r.output.rindex("}") + 1])
    assert body["request"]["model"] == "gemini-2.5-flash"
    assert body["request"]["response_format"]["json_schema"]["schema"] == teacher_schema(backend="gemini")
    assert "estimate for 3 episodes" in r.output and "$" in r.output
    assert SECRET not in r.output


def test_max_cost_stops_cleanly_with_a_message(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fake-model": {"input": 1.0, "output": 2.0}}))
    out = tmp_path / "out"
    r = annotate(
        uri,
        "--teacher",
        "openai-compatible",
        "--base-url",
        teacher_server.url,
        "--model",
        "fake-model",
        "--out",
        str(out),
        "--concurrency",
        "1",
        "--max-cost",
        "0.008",
        "--prices",
        str(prices),
    )
    assert r.exit_code == 0, r.output
    assert "--max-cost" in r.output
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["stop_reason"] == "max-cost" and manifest["complete"] is False
    assert manifest["cost_usd"] <= 0.008
    assert 0 < manifest["counts"]["episodes"] < 6


def test_max_cost_without_a_price_is_refused(tiny_rlds, teacher_server, tmp_path):
    r = annotate(
        tiny_rlds(1),
        "--teacher",
        "openai",
        "--base-url",
        teacher_server.url,
        "--model",
        "unpriced-x",
        "--max-cost",
        "1",
        "--out",
        str(tmp_path / "o"),
        env={"OPENAI_API_KEY": SECRET},
    )
    assert r.exit_code == 1 and "no price for model 'unpriced-x'" in r.output
    assert teacher_server.requests == []


def test_missing_key_is_one_clear_error(tiny_rlds, tmp_path):
    r = annotate(tiny_rlds(1), "--teacher", "gemini", "--out", str(tmp_path / "o"), env={"GEMINI_API_KEY": ""})
    assert r.exit_code == 1 and "GEMINI_API_KEY" in r.output and "Traceback" not in r.output


def test_gemini_request_shape_and_the_key_never_leaks(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(4)
    teacher_server.scripts = {1: ["400"], 2: ["schema", "schema", "schema"], 3: ["429", "ok"]}
    out = tmp_path / "out"
    base = teacher_server.url.replace("/v1", "/v1beta/openai/")
    r = annotate(
        uri,
        "--teacher",
        "gemini",
        "--base-url",
        base,
        "--out",
        str(out),
        "--retry-base",
        "0.01",
        env={"GEMINI_API_KEY": SECRET},
    )
    assert r.exit_code == 0, r.output
    first = teacher_server.requests[0]
    assert first.path == "/v1beta/openai/chat/completions"
    assert first.headers["authorization"] == f"Bearer {SECRET}"
    assert first.headers["content-type"] == "application/json"
    body = first.body
    assert body["model"] == "gemini-2.5-flash" and body["max_tokens"] == 4096 and body["temperature"] == 0.2
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == teacher_schema(backend="gemini")
    assert body["messages"][0]["role"] == "system"
    parts = body["messages"][1]["content"]
    assert parts[0]["type"] == "text" and "put the spoon" in parts[0]["text"]
    images = [p["image_url"]["url"] for p in parts[1:]]
    assert images and all(u.startswith("data:image/jpeg;base64,") for u in images)

    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["rejected"] == 2 and manifest["counts"]["episodes"] == 2
    rejects = [json.loads(line) for line in (out / ".refine" / "rejects.jsonl").read_text().splitlines()]
    assert {r["episode_id"].rsplit("#")[-1] for r in rejects} == {"1", "2"}
    # Nothing written anywhere, nor printed, carries the key.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in r.output


def test_openai_request_shape(tiny_rlds, teacher_server, tmp_path):
    r = annotate(
        tiny_rlds(1),
        "--teacher",
        "openai",
        "--base-url",
        teacher_server.url,
        "--out",
        str(tmp_path / "o"),
        env={"OPENAI_API_KEY": SECRET},
    )
    assert r.exit_code == 0, r.output
    req = teacher_server.requests[0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.body["model"] == "gpt-4.1-mini" and req.body["max_completion_tokens"] == 4096
    assert "max_tokens" not in req.body
    assert req.body["response_format"]["json_schema"]["name"] == "refinevla_rationale_v1"


def test_shards_split_the_episodes_deterministically(tiny_rlds, tmp_path):
    uri = tiny_rlds(5)
    out = tmp_path / "out"
    ids = []
    for i in range(2):
        r = annotate(uri, "--out", str(out), "--shard", f"{i}/2")
        assert r.exit_code == 0, r.output
        ids.append(set(pl.read_parquet(out / "episodes" / f"train-{i:05d}-of-00002.parquet")["episode_id"]))
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 5
    assert (out / ".refine" / "store-00000-of-00002.sqlite").exists()


def test_bad_shard_flag_is_a_user_error(tiny_rlds, tmp_path):
    r = annotate(tiny_rlds(1), "--shard", "2/2", "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "--shard" in r.output


def test_unknown_source_license_is_refused_before_anything_runs_and_the_card_records_a_given_one(tiny_rlds, tmp_path):
    from huggingface_hub import DatasetCard

    uri = tiny_rlds(2, name="mystery_robot")
    out = tmp_path / "out"
    r = annotate(uri, "--out", str(out))
    assert r.exit_code == 1 and "--license" in r.output and "Traceback" not in r.output
    assert not (out / ".refine").exists()  # refused before the store was even opened
    ok = annotate(uri, "--out", str(out), "--license", "cc-by-sa-4.0")
    assert ok.exit_code == 0, ok.output
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-sa-4.0"
    assert card.data.source_datasets == ["mystery_robot"]
    # a rerun inherits the license from the card already in OUT
    assert annotate(uri, "--out", str(out)).exit_code == 0


def test_dry_run_needs_no_key_but_a_real_run_does(tiny_rlds, tmp_path):
    uri = tiny_rlds(2)
    env = {"GEMINI_API_KEY": ""}
    dry = annotate(uri, "--teacher", "gemini", "--out", str(tmp_path / "o"), "--dry-run", env=env)
    assert dry.exit_code == 0, dry.output
    assert "estimate for 2 episodes" in dry.output
    real = annotate(uri, "--teacher", "gemini", "--out", str(tmp_path / "o"), env=env)
    assert real.exit_code == 1 and "GEMINI_API_KEY" in real.output


def test_a_state_that_is_not_7d_is_a_clear_error_naming_the_episode_and_flag(tmp_path):
    import numpy as np

    from refinevla.annotate.episode import Episode, FrameSequence
    from refinevla.annotate.sources.lerobot_writer import write_lerobot

    steps = 12
    idx = np.arange(steps)
    episode = Episode(
        episode_id="x:0",
        dataset="x",
        instruction="pick the cup",
        actions=np.zeros((steps, 7), np.float32),
        states=np.zeros((steps, 6), np.float32),  # joint angles, say: not an end-effector pose
        frames={"image_0": FrameSequence(loader=lambda k: np.zeros((32, 32, 3), np.uint8), length=steps)},
        is_first=idx == 0,
        is_last=idx == steps - 1,
        is_terminal=idx == steps - 1,
        rewards=np.zeros(steps, np.float32),
    )
    write_lerobot(tmp_path / "lr", [episode], version="v3.0", fps=5)
    r = annotate(f"lerobot:{tmp_path / 'lr'}", "--out", str(tmp_path / "out"), "--license", "mit")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "lr:episode_0" in r.output and "(12, 6)" in r.output and "--state-key" in r.output


def test_a_refused_key_stops_the_run_with_one_line_and_rejects_nothing(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    out = tmp_path / "out"
    teacher_server.default = "401"
    args = ("--teacher", "openai-compatible", "--base-url", teacher_server.url, "--model", "m", "--out", str(out))
    r = annotate(uri, *args, "--concurrency", "2", env={"OPENAI_API_KEY": SECRET})
    assert r.exit_code == 1, r.output
    assert "refused the credentials" in r.output and SECRET not in r.output
    assert len(teacher_server.requests) <= 3  # stops at the first refusal (plus what was already in flight)
    assert not (out / ".refine" / "rejects.jsonl").exists() or (out / ".refine" / "rejects.jsonl").read_text() == ""
    # With a working key the rerun annotates everything: nothing was recorded as rejected.
    teacher_server.default = "ok"
    again = annotate(uri, *args, env={"OPENAI_API_KEY": SECRET})
    assert again.exit_code == 0, again.output
    assert json.loads((out / "refinevla.json").read_text())["counts"]["episodes"] == 6


def test_an_unknown_model_stops_the_run_instead_of_rejecting_every_episode(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(5)
    out = tmp_path / "out"
    teacher_server.default = "404"
    args = ("--teacher", "openai-compatible", "--base-url", teacher_server.url, "--model", "m", "--out", str(out))
    r = annotate(uri, *args, "--concurrency", "1")
    assert r.exit_code == 1 and "no model 'm'" in r.output and "--model" in r.output
    assert len(teacher_server.requests) == 1
    teacher_server.default = "ok"
    assert annotate(uri, *args).exit_code == 0  # nothing was cached as rejected
    assert json.loads((out / "refinevla.json").read_text())["counts"]["episodes"] == 5


def test_the_summary_rate_is_over_the_run_and_the_manifest_says_how_long_it_took(tiny_rlds, tmp_path):
    import re

    out = tmp_path / "out"
    r = annotate(tiny_rlds(4), "--out", str(out), "--rpm", "30")  # a burst of 2.5, then one per 2 s: ~3 s
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "refinevla.json").read_text())
    seconds = manifest["this_run"]["seconds"]
    assert manifest["this_run"]["requests"] == 4 and 1.5 < seconds < 30
    rate = float(re.search(r"\| (\d+) req/min \|", r.output).group(1))
    assert rate == pytest.approx(4 * 60 / seconds, rel=0.2) and rate <= 160


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once to get it, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_teacher_that_cannot_be_reached_is_named_with_its_url_and_no_empty_dataset_is_written(tiny_rlds, tmp_path):
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{closed_port()}/v1"
    args = ("--teacher", "openai-compatible", "--base-url", url, "--model", "m", "--out", str(out))
    r = annotate(uri, *args, "--max-retries", "2", "--retry-base", "0.01")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if "nothing annotated" in ln]
    assert len(lines) == 1, r.output
    assert f"cannot reach {url}: connection refused (3)" in lines[0], lines[0]
    assert "rate limit" not in r.output and "timed out" not in r.output
    assert not (out / "refinevla.json").exists() and not (out / "README.md").exists()


def test_episodes_that_fail_after_retries_are_counted_with_their_reason(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"
    teacher_server.scripts = {1: ["500", "500", "500"]}
    args = ("--teacher", "openai-compatible", "--base-url", teacher_server.url, "--model", "m", "--out", str(out))
    r = annotate(uri, *args, "--max-retries", "2", "--retry-base", "0.01")
    assert r.exit_code == 1, r.output
    line = next(ln for ln in r.output.splitlines() if "failed after retries" in ln)
    assert line.startswith("1 episodes failed after retries: HTTP 500: internal error (1); rerun to retry them:"), line
    assert "cannot reach" not in r.output
    assert json.loads((out / "refinevla.json").read_text())["counts"]["episodes"] == 3
