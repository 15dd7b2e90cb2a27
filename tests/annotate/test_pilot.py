"""`refine-data pilot`: three teachers on the same sample, compared; counts from the fake servers' logs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.errors import RefineError
from refinevla.annotate.pilot import boundary_f1, parse_teacher_spec, teacher_specs
from refinevla.annotate.pricing import PriceTable
from tests.annotate.conftest import SECRET

PRICES = {"fake-slow": {"input": 1.0, "output": 2.0}, "fake-flaky": {"input": 0.5, "output": 4.0}}


def pilot(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["pilot", *args, "--progress", "none"], env={"OPENAI_API_KEY": SECRET})


def test_teacher_specs_parse_and_a_bad_one_is_one_line() -> None:
    assert parse_teacher_spec("gemini:gemini-2.5-flash") == ("gemini", "gemini-2.5-flash", None)
    assert parse_teacher_spec("openai-compatible:qwen2.5-vl-7b@http://127.0.0.1:8000/v1") == (
        "openai-compatible",
        "qwen2.5-vl-7b",
        "http://127.0.0.1:8000/v1",
    )
    assert parse_teacher_spec("openai-compatible:llama3:8b") == ("openai-compatible", "llama3:8b", None)
    assert parse_teacher_spec("rule-based") == ("rule-based", None, None)
    assert [s.label for s in teacher_specs(["rule-based", "rule-based", "openai:gpt-4.1"])] == [
        "rule-based",
        "rule-based-2",
        "openai-gpt-4.1",
    ]
    for bad, said in [
        ("claude", "TEACHER one of"),
        ("openai:", "an empty model"),
        ("openai-compatible:m@", "an empty base URL"),
        ("openai-compatible:m@127.0.0.1:8000", "must start with http"),
    ]:
        with pytest.raises(RefineError, match=said):
            parse_teacher_spec(bad)


def test_boundary_f1_counts_within_the_tolerance() -> None:
    assert boundary_f1([5, 10], [5, 10], 2) == 1.0
    assert boundary_f1([5, 10], [7, 13], 2) == 0.5  # 5~7 matches, 10~13 does not (both ways)
    assert boundary_f1([], [], 2) is None and boundary_f1([4], [], 2) == 0.0


def test_a_pilot_of_three_teachers_counts_what_the_servers_saw_and_its_rerun_asks_nothing(
    tiny_rlds, teacher_server, second_teacher_server, tmp_path
):
    uri = tiny_rlds(12)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    slow, flaky = teacher_server, second_teacher_server
    slow.latency = 0.15
    flaky.scripts = {s: ["schema"] for s in (0, 6)}  # half the sampled episodes: a wrong first answer
    out = tmp_path / "pilot"
    args = [uri, "--episodes", "4", "--out", str(out), "--prices", str(prices), "--json", "--concurrency", "2"]
    args += ["--teacher", "rule-based", "--teacher", f"openai-compatible:fake-slow@{slow.url}"]
    args += ["--teacher", f"openai-compatible:fake-flaky@{flaky.url}"]
    r = pilot(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    rows = {t["label"]: t for t in summary["teachers"]}
    assert list(rows) == ["rule-based", "openai-compatible-fake-slow", "openai-compatible-fake-flaky"]
    sampled = [0, 3, 6, 9]  # --episodes 4 of 12: spread evenly, the same for every teacher
    assert sorted(q.seed for q in slow.requests) == sampled
    assert sorted(q.seed for q in flaky.requests) == [0, 0, 3, 6, 6, 9]  # 0 and 6 re-asked
    s, f = rows["openai-compatible-fake-slow"], rows["openai-compatible-fake-flaky"]
    assert s["settled"] == 4 and s["valid_first_rate"] == 1.0 and s["reasks_per_episode"] == 0.0
    assert f["settled"] == 4 and f["valid_first_rate"] == 0.5 and f["reasks_per_episode"] == 0.5
    p, c = slow.usage  # tokens the fake reports per answer
    assert s["prompt_tokens_per_episode"] == p and f["prompt_tokens_per_episode"] == p * 6 / 4
    assert s["latency_p50_s"] >= 0.15 > f["latency_p95_s"]  # the slow server's answers took its latency
    table = PriceTable.load(prices)
    assert s["cost_per_episode"] == pytest.approx(table.cost("fake-slow", p, c))
    assert s["projection"]["live_usd"] == pytest.approx(round(table.cost("fake-slow", p * 12, c * 12), 2))
    assert f["projection"]["live_usd"] == pytest.approx(round(table.cost("fake-flaky", p * 18, c * 18), 2))
    assert rows["rule-based"]["audit"]["event_recall"] >= 0.9  # it splits at the gripper events
    assert {(a["a"], a["b"]) for a in summary["agreement"]} == {
        ("rule-based", "openai-compatible-fake-slow"),
        ("rule-based", "openai-compatible-fake-flaky"),
        ("openai-compatible-fake-slow", "openai-compatible-fake-flaky"),
    }
    same = next(a for a in summary["agreement"] if a["a"].endswith("slow") and a["b"].endswith("flaky"))
    assert same["boundary_f1"] == 1.0 and same["box_iou"] == 1.0  # the two fakes answer alike
    md = (out / "pilot.md").read_text()
    assert "openai-compatible-fake-flaky" in md and "source live" in md and (out / "pilot.png").stat().st_size > 0

    before = (len(slow.requests), len(flaky.requests))
    again = pilot(*args)
    assert again.exit_code == 0, again.output
    assert (len(slow.requests), len(flaky.requests)) == before  # everything was in the stores


def test_a_dry_run_prices_the_pilot_and_asks_nothing(tiny_rlds, teacher_server, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    out = tmp_path / "pilot"
    r = pilot(
        *(tiny_rlds(6), "--episodes", "3", "--out", str(out), "--prices", str(prices), "--dry-run"),
        *("--teacher", f"openai-compatible:fake-slow@{teacher_server.url}"),
    )
    assert r.exit_code == 0, r.output
    assert "estimate for 3 episodes" in r.output and not teacher_server.requests
    assert not (out / "pilot.md").exists()


def test_more_episodes_than_the_source_and_no_teacher_are_one_line(tiny_rlds, tmp_path):
    r = pilot(tiny_rlds(3), "--episodes", "5", "--out", str(tmp_path / "p"), "--teacher", "rule-based")
    assert r.exit_code != 0 and "--episodes 5: the source holds only 3 episode(s)" in r.output
    r = pilot(tiny_rlds(3), "--episodes", "2", "--out", str(tmp_path / "q"), "--teacher", "nope")
    assert r.exit_code != 0 and "--teacher 'nope'" in r.output and "Traceback" not in r.output


def test_a_teacher_that_cannot_be_reached_is_reported_and_the_others_still_run(tiny_rlds, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "pilot"
    r = pilot(
        *(tiny_rlds(4), "--episodes", "2", "--out", str(out), "--max-retries", "0", "--json"),
        *("--teacher", f"openai-compatible:fake@http://127.0.0.1:{port}/v1", "--teacher", "rule-based"),
    )
    assert r.exit_code == 1, r.output
    summary = json.loads((out / "pilot.json").read_text())
    dead, alive = summary["teachers"]
    assert dead["exit_code"] == 1 and "connection refused" in dead["audit"]["error"]
    assert alive["exit_code"] == 0 and alive["settled"] == 2 and alive["audit"]["event_recall"] >= 0.9
    assert "openai-compatible-fake" in (out / "pilot.md").read_text() and "Traceback" not in r.output
