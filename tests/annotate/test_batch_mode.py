"""`refine-data annotate --batch` end to end against a fake OpenAI Files + Batch API on 127.0.0.1,
through the real `openai` client: same rows as live mode, kill -9 and lost responses without paying
twice, failed / expired lines, invalid answers re-asked with their errors, the budget, and the key.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from refinevla.annotate.batch.emulator.openai_api import (
    FakeOpenAIBatch,
    FakeOpenAIBatchProcess,
    chat_completion,
    rationale_answer,
)
from refinevla.annotate.cli import app

SECRET = "sk-batch-test-NEVER-LEAK-5e1d"
MODEL = "gpt-4.1-mini"  # priced in the packaged table: live 0.40 / 1.60, batch 0.20 / 0.80 USD per 1M tokens
ROOT = Path(__file__).resolve().parents[2]


def annotate(uri: str, out: Path, url: str, *extra: str) -> Any:
    args = ["annotate", uri, "--teacher", "openai", "--model", MODEL, "--base-url", url, "--out", str(out)]
    args += ["--progress", "none", "--license", "apache-2.0", *extra]
    return CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})


def batch_flags(*extra: str) -> list[str]:
    return ["--batch", "--poll-interval", "0.01", *extra]


def rows(out: Path, folder: str) -> pl.DataFrame:
    return pl.read_parquet(out / folder / "train-00000-of-00001.parquet").sort(
        ["episode_id", "step"] if folder == "data" else ["episode_id"]
    )


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "refinevla.json").read_text())


def text_of(body: dict[str, Any]) -> str:
    user = next(m for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list))
    return next(p["text"] for p in user["content"] if p["type"] == "text")


def seed_of(body: dict[str, Any]) -> int:
    import re

    return int(re.search(r"put the spoon (\d+) on the towel", text_of(body)).group(1))  # type: ignore[union-attr]


def test_a_batch_run_writes_the_rows_a_live_run_writes_at_half_the_cost(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    live = annotate(uri, tmp_path / "live", teacher_server.url)
    assert live.exit_code == 0, live.output
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake:
        result = annotate(uri, tmp_path / "batch", fake.base_url, *batch_flags("--batch-requests", "4"))
        assert result.exit_code == 0, result.output
        assert len(fake.batches) == 2  # 6 requests in files of at most 4
        lines = {line["custom_id"]: line["body"] for b in fake.batches for line in fake.batch_lines(b)}
        assert fake.leaks(SECRET) == []
    for folder in ("data", "episodes"):
        assert rows(tmp_path / "batch", folder).equals(rows(tmp_path / "live", folder))
    # the same requests: each batch line's body is the body live mode posted for that episode
    live_bodies = {seed_of(r.body): r.body for r in teacher_server.requests}
    assert len(lines) == 6 and {seed_of(b): b for b in lines.values()} == live_bodies
    m_live, m_batch = manifest(tmp_path / "live"), manifest(tmp_path / "batch")
    assert m_batch["counts"] == m_live["counts"] and m_batch["tokens"] == m_live["tokens"]
    assert m_batch["batch"]["pricing"] == "batch" and m_batch["batch"]["this_run"]["batches_submitted"] == 2
    assert m_batch["cost_usd"] == pytest.approx(m_live["cost_usd"] / 2)
    assert m_batch["cost_usd"] == pytest.approx(6 * (1000 * 0.20 + 200 * 0.80) / 1e6)
    card = (tmp_path / "batch" / "README.md").read_text()
    assert "Batch API at batch prices" in card and "(batch prices)" in card
    for path in (tmp_path / "batch").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output
    # a rerun asks nothing: everything is in the store
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake2:
        again = annotate(uri, tmp_path / "batch", fake2.base_url, *batch_flags())
        assert again.exit_code == 0, again.output
        assert fake2.batches == {} and fake2.files == {}


def test_dry_run_estimates_at_batch_prices(tiny_rlds, tmp_path):
    uri = tiny_rlds(2)
    live = annotate(uri, tmp_path / "o", "http://127.0.0.1:9/v1", "--dry-run")
    batch = annotate(uri, tmp_path / "o", "http://127.0.0.1:9/v1", "--dry-run", "--batch")
    assert live.exit_code == 0 and batch.exit_code == 0, batch.output

    def dollars(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("estimate for"))
        return float(line.split("~$")[1].split()[0])

    assert "at batch prices" in batch.output and dollars(batch.output) == pytest.approx(dollars(live.output) / 2, 0.02)


def counting(answer: Callable[[int, int, dict[str, Any]], Any]) -> Callable[[str, dict[str, Any]], Any]:
    """An answer function told how many times its episode (by seed) was asked before."""
    seen: Counter[int] = Counter()

    def fn(custom_id: str, body: dict[str, Any]) -> Any:
        seed = seed_of(body)
        seen[seed] += 1
        return answer(seed, seen[seed], body)

    return fn


def test_failed_lines_expiry_and_invalid_answers_end_as_described(tiny_rlds, tmp_path):
    """seed 0: a 500 line, then answered; seed 1: a 400 (rejected, never resent); seed 2: invalid JSON once,
    re-asked with the errors in the next batch; seed 3: invalid three times (rejected with the reason);
    seed 4, 5: in the expired part of the first batch, resubmitted."""

    def answer(seed: int, n: int, body: dict[str, Any]) -> Any:
        if seed == 0 and n == 1:
            return (500, "The server had an error")
        if seed == 1:
            return (400, "Invalid image")
        if (seed == 2 and n == 1) or seed == 3:
            return chat_completion("{not json", model=MODEL)
        return rationale_answer("", body)

    uri = tiny_rlds(6)
    out = tmp_path / "out"
    with FakeOpenAIBatch(api_key=SECRET, answer=counting(answer), expire_after_lines=4) as fake:
        result = annotate(uri, out, fake.base_url, *batch_flags())
        # the first batch expires after 4 lines; later batches are not cut (controls apply per batch)
        batches = list(fake.batches.values())
        fake_lines = [fake.batch_lines(b["id"]) for b in batches]
    assert result.exit_code == 0, result.output
    assert batches[0]["status"] == "expired"
    submitted = Counter(line["custom_id"] for lines in fake_lines for line in lines)
    by_seed = {seed_of(line["body"]): line["custom_id"] for lines in fake_lines for line in lines}
    assert submitted[by_seed[1]] == 1  # a 400 is never sent again
    assert submitted[by_seed[3]] == 3  # asked, then re-asked twice (--max-attempts 3)
    assert submitted[by_seed[0]] == 2 and submitted[by_seed[2]] == 2
    # seed 2's re-ask carries its invalid answer and the validation error
    reask = next(line["body"] for lines in fake_lines[1:] for line in lines if line["custom_id"] == by_seed[2])
    assert reask["messages"][-2] == {"role": "assistant", "content": "{not json"}
    assert "not valid JSON" in json.dumps(reask["messages"][-1])
    m = manifest(out)
    assert m["counts"]["episodes"] == 4 and m["counts"]["rejected"] == 2
    errors = m["batch"]["this_run"]["line_errors"]
    assert errors.get("HTTP 500") == 1 and errors.get("HTTP 400") == 1 and errors.get("batch_expired", 0) >= 1
    rejects = {
        json.loads(x)["episode_id"].rsplit("#", 1)[-1]: json.loads(x)["reason"]
        for x in (out / ".refine" / "rejects.jsonl").read_text().splitlines()
    }
    assert "refused the request" in rejects["1"] and "HTTP 400" in rejects["1"]
    assert rejects["3"].startswith("invalid after 3 attempt(s)")


def store_outcomes(out: Path) -> tuple[set[str], dict[str, str]]:
    """Seeds answered, and seed -> reason of each reject, as the store holds them."""
    with sqlite3.connect(out / ".refine" / "store.sqlite") as conn:
        answers = {e.rsplit("#", 1)[-1] for (e,) in conn.execute("SELECT episode_id FROM answers")}
        rejects = {e.rsplit("#", 1)[-1]: r for e, r in conn.execute("SELECT episode_id, reason FROM rejects")}
    return answers, rejects


def test_a_batch_the_model_refuses_for_its_images_stops_the_run_and_rejects_nothing(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"
    text_only = lambda custom_id, body: (400, f"{MODEL} is not a multimodal model")  # noqa: E731
    with FakeOpenAIBatch(api_key=SECRET, answer=text_only) as fake:
        result = annotate(uri, out, fake.base_url, *batch_flags())
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "takes no images" in errors[0] and "vision-language model" in errors[0], errors
    assert "Traceback" not in result.output and not (out / "refinevla.json").exists()
    assert store_outcomes(out) == (set(), {})
    # fixed: every episode is submitted again (the refused lines do not count against --max-resubmits) and answered
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake:
        again = annotate(uri, out, fake.base_url, *batch_flags("--max-resubmits", "0"))
        assert again.exit_code == 0, again.output
        assert sum(len(fake.batch_lines(b)) for b in fake.batches) == 4
    assert manifest(out)["counts"]["episodes"] == 4


def test_retry_rejected_submits_the_refused_lines_again_once(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"

    def refusing_2(seed: int, n: int, body: dict[str, Any]) -> Any:
        return (400, f"prompt too long: {9000 + seed} tokens") if seed == 2 else rationale_answer("", body)

    too_long = counting(refusing_2)
    with FakeOpenAIBatch(api_key=SECRET, answer=too_long) as fake:
        assert annotate(uri, out, fake.base_url, *batch_flags()).exit_code == 0
    assert set(store_outcomes(out)[1]) == {"2"}
    with FakeOpenAIBatch(api_key=SECRET, answer=too_long) as fake:  # still refused: resubmitted once, not per round
        result = annotate(uri, out, fake.base_url, *batch_flags("--retry-rejected"))
        assert result.exit_code == 0, result.output
        assert [seed_of(line["body"]) for b in fake.batches for line in fake.batch_lines(b)] == [2]
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake:  # answered: the reject goes
        result = annotate(uri, out, fake.base_url, *batch_flags("--retry-rejected"))
        assert result.exit_code == 0, result.output
        assert [seed_of(line["body"]) for b in fake.batches for line in fake.batch_lines(b)] == [2]
    assert store_outcomes(out) == ({"0", "1", "2", "3"}, {})
    assert manifest(out)["counts"]["episodes"] == 4 and manifest(out)["counts"]["rejected"] == 0


def store_batches(out: Path) -> list[tuple[str, str | None]]:
    db = out / ".refine" / "store.sqlite"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return list(conn.execute("SELECT state, batch_id FROM batches"))
    except sqlite3.OperationalError:
        return []


def start(uri: str, out: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "refinevla.annotate.cli", "annotate", uri, "--teacher", "openai", "--model", MODEL]
    cmd += ["--base-url", url, "--out", str(out), "--progress", "none", "--license", "apache-2.0", *extra]
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], deadline: float = 60.0) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline, "the run made no progress"
        time.sleep(0.05)


def test_kill_9_while_batches_are_in_flight_then_rerun_pays_nothing_twice(tiny_rlds, tmp_path):
    uri = tiny_rlds(6)
    out = tmp_path / "out"
    flags = ["--batch", "--poll-interval", "0.2", "--batch-requests", "2"]
    answer = "refinevla.annotate.batch.emulator.openai_api:rationale_answer"
    # each batch stays in progress for 20 looks (4 s at this poll interval): the kill comes long before
    with FakeOpenAIBatchProcess(tmp_path / "api", api_key=SECRET, answer=answer, in_progress_polls=20) as server:
        proc = start(uri, out, server.base_url, *flags)
        wait_for(proc, lambda: len([b for b in store_batches(out) if b[1]]) == 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert not any(b["status"] == "completed" for b in server.records().batches.values())
        rerun = start(uri, out, server.base_url, *flags)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        fake = server.records()
    assert len(fake.batches) == 3
    assert sorted(Counter(fake.submitted).values()) == [1] * 6  # nothing submitted twice
    assert sorted(Counter(fake.answered).values()) == [1] * 6  # nothing paid twice
    assert manifest(out)["counts"]["episodes"] == 6 and SECRET not in err


def test_a_batch_created_just_before_a_crash_is_found_by_its_tag_not_created_again(tiny_rlds, tmp_path):
    """The create call reaches the provider but its answer is lost and the lookup fails too: the run
    stops with one line; the store has the batch without its id. The rerun finds it by its tag."""
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake:
        fake.fail_next("POST", "/v1/batches", status=0, times=3)  # created, answer dropped (and on retries)
        fake.fail_next("GET", "/v1/batches", status=500, times=100)  # and the lookup by tag fails
        first = annotate(uri, out, fake.base_url, *batch_flags())
        assert first.exit_code == 1 and "Traceback" not in first.output
        assert [state for state, _ in store_batches(out)] == ["written"]
        created = len(fake.batches)
        assert created >= 1
        fake.faults.clear()
        second = annotate(uri, out, fake.base_url, *batch_flags())
        assert second.exit_code == 0, second.output
        assert len(fake.batches) == created  # found again, not created again
        assert sorted(Counter(fake.answered).values()) == [1] * 3
    assert manifest(out)["counts"]["episodes"] == 3


def test_max_cost_stops_submitting_new_batches(tiny_rlds, tmp_path):
    uri = tiny_rlds(6)
    out = tmp_path / "out"
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer) as fake:
        # one request is estimated at well under $0.002 at batch prices: room for some, not all 6
        result = annotate(uri, out, fake.base_url, *batch_flags("--batch-requests", "2", "--max-cost", "0.002"))
        submitted = len(fake.submitted)
    assert 0 < submitted < 6
    m = manifest(out)
    assert m["counts"]["episodes"] == submitted and m["complete"] is False
    assert "--max-cost" in result.output and result.exit_code == 1


def test_interrupted_wait_leaves_batches_running_and_batches_lists_and_cancels_them(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"
    flags = ["--batch", "--poll-interval", "0.2"]
    answer = "refinevla.annotate.batch.emulator.openai_api:rationale_answer"
    with FakeOpenAIBatchProcess(tmp_path / "api", api_key=SECRET, answer=answer, in_progress_polls=1000) as server:
        proc = start(uri, out, server.base_url, *flags)
        wait_for(proc, lambda: any(b[1] for b in store_batches(out)))
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "keep running" in err and "refine-data annotate" in err and SECRET not in err
        listed = CliRunner().invoke(app, ["batches", str(out), "--json"], env={"OPENAI_API_KEY": SECRET})
        assert listed.exit_code == 0, listed.output
        (row,) = [json.loads(x) for x in listed.output.splitlines()]
        assert row["state"] == "running" and row["requests"] == 4 and row["batch_id"].startswith("batch_")
        cancel = CliRunner().invoke(app, ["batches", str(out), "--cancel"], env={"OPENAI_API_KEY": SECRET})
        assert cancel.exit_code == 0 and "cancel requested" in cancel.output
        assert server.records().batches[row["batch_id"]]["status"] in ("cancelling", "cancelled")


def test_gemini_batch_through_google_genai_writes_the_rows_live_mode_writes(tiny_rlds, teacher_server, tmp_path):
    """`--teacher gemini --batch`: the native Batch API through google-genai (its base-URL option points
    at the fake; live mode's OpenAI-compatible path `/v1beta/openai/` is dropped for it)."""
    from refinevla.annotate.batch.emulator.gemini_api import FakeGeminiBatch
    from refinevla.annotate.batch.emulator.gemini_api import rationale_answer as gemini_rationale

    uri = tiny_rlds(4)
    key = "AIza-batch-test-NEVER-LEAK-77"
    env = {"GEMINI_API_KEY": key}
    common = ["--teacher", "gemini", "--model", "gemini-2.5-flash", "--progress", "none", "--license", "apache-2.0"]
    live = CliRunner().invoke(
        app, ["annotate", uri, *common, "--base-url", teacher_server.url, "--out", str(tmp_path / "live")], env=env
    )
    assert live.exit_code == 0, live.output
    with FakeGeminiBatch(api_key=key, answer=gemini_rationale) as fake:
        url = f"{fake.base_url}/v1beta/openai/"
        args = ["annotate", uri, *common, "--base-url", url, "--out", str(tmp_path / "batch"), *batch_flags()]
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert sorted(Counter(fake.answered).values()) == [1] * 4 and fake.leaks(key) == []
    for folder in ("data", "episodes"):
        assert rows(tmp_path / "batch", folder).equals(rows(tmp_path / "live", folder))
    m = manifest(tmp_path / "batch")
    assert m["batch"]["provider"] == "gemini" and m["counts"]["episodes"] == 4
    assert m["cost_usd"] == pytest.approx(4 * (1000 * 0.15 + 200 * 1.25) / 1e6)  # gemini-2.5-flash batch prices
    assert key not in result.output


def test_polling_carries_on_through_a_provider_hiccup(tiny_rlds, tmp_path):
    uri = tiny_rlds(2)
    out = tmp_path / "out"
    with FakeOpenAIBatch(api_key=SECRET, answer=rationale_answer, in_progress_polls=2) as fake:
        # 4 failures: the client's own 3 retries, then one poll that fails through to batch mode
        fake.fail_next("GET", "/v1/batches/batch_", status=503, times=4)
        result = annotate(uri, out, fake.base_url, *batch_flags())
        retrieves = [r for r in fake.requests if r.method == "GET" and r.path.startswith("/v1/batches/batch_")]
    assert result.exit_code == 0, result.output
    assert "polling again" in result.output and len(retrieves) >= 5
    assert manifest(out)["counts"]["episodes"] == 2


def test_kill_9_right_after_a_batch_is_created_then_the_rerun_finds_it_by_its_tag(tiny_rlds, tmp_path):
    """The provider has created the batch but the client is killed before it learns (and stores) the id."""
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    flags = ["--batch", "--poll-interval", "0.2"]
    answer = "refinevla.annotate.batch.emulator.openai_api:rationale_answer"
    with FakeOpenAIBatchProcess(tmp_path / "api", api_key=SECRET, answer=answer, create_delay_ms=4000) as server:
        proc = start(uri, out, server.base_url, *flags)
        wait_for(proc, lambda: len(server.records().batches) == 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        (state,) = store_batches(out)
        assert state == ("written", None)  # recorded with its keys, id never stored
        server.set(create_delay_ms=0)
        rerun = start(uri, out, server.base_url, *flags)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        fake = server.records()
    assert len(fake.batches) == 1  # found again by its tag, not created twice
    assert sorted(Counter(fake.submitted).values()) == [1] * 3
    assert sorted(Counter(fake.answered).values()) == [1] * 3
    assert manifest(out)["counts"]["episodes"] == 3


def test_reask_live_sends_the_reasks_to_the_live_endpoint_with_their_errors(tiny_rlds, tmp_path):
    def answer(seed: int, n: int, body: dict[str, Any]) -> Any:
        if seed == 1 and n == 1:
            return chat_completion("{not json", model=MODEL)
        return rationale_answer("", body)

    uri = tiny_rlds(3)
    out = tmp_path / "out"
    with FakeOpenAIBatch(api_key=SECRET, answer=counting(answer)) as fake:
        result = annotate(uri, out, fake.base_url, *batch_flags("--reask", "live"))
        assert result.exit_code == 0, result.output
        assert len(fake.batches) == 1 and len(fake.live) == 1  # one batch round, the re-ask asked live
        reask = json.loads(fake.live[0])
    assert seed_of(reask) == 1
    assert reask["messages"][-2] == {"role": "assistant", "content": "{not json"}
    assert "not valid JSON" in json.dumps(reask["messages"][-1])
    m = manifest(out)
    assert m["counts"]["episodes"] == 3 and m["batch"]["reask"] == "live"
    live, batch = (1000 * 0.40 + 200 * 1.60) / 1e6, (1000 * 0.20 + 200 * 0.80) / 1e6
    assert m["cost_usd"] == pytest.approx(3 * batch + live)  # the live re-ask at live prices
