"""The engine against a real HTTP server that injects faults, through the real `openai` client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.pricing import ModelPrice, PriceTable
from refinevla.annotate.records import AnnotationOutcome
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher
from refinevla.schemas import validate

PRICES = PriceTable({"fake-model": ModelPrice(input=1.0, output=2.0)})  # $0.0014 per fake answer


def run_engine(
    uri: str, server: Any, store_path: Path, model: str = "fake-model", **options: Any
) -> tuple[Engine, dict[str, AnnotationOutcome]]:
    source = open_source(uri)
    teacher = OpenAICompatTeacher.for_provider("openai-compatible", model=model, base_url=server.url)
    opts = {"concurrency": 4, "timeout": 1.0, "retry_base": 0.01, "retry_max": 0.05, "max_retries": 2, **options}
    results: dict[str, AnnotationOutcome] = {}
    with ResultStore(store_path) as store:
        engine = Engine(
            teacher, store, EngineOptions(**opts), PRICES, sink=lambda r: results.__setitem__(r.episode_id, r)
        )
        asyncio.run(engine.run(source.iter_episodes(), total=len(source)))
    return engine, results


def by_seed(results: dict[str, AnnotationOutcome]) -> dict[int, AnnotationOutcome]:
    return {int(eid.rsplit("#", 1)[-1]): r for eid, r in results.items()}


def test_every_fault_ends_annotated_or_rejected_with_its_reason(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(9)
    teacher_server.scripts = {
        1: ["429", "ok"],
        2: ["500", "ok"],
        3: ["hang", "ok"],
        4: ["badjson", "ok"],
        5: ["length", "ok"],
        6: ["schema", "schema", "schema"],
        7: ["400"],
        8: ["semantic", "ok"],
    }
    engine, results = run_engine(uri, teacher_server, tmp_path / "store.sqlite")
    res = by_seed(results)
    assert len(res) == 9
    assert {s for s, r in res.items() if r.status == "annotated"} == {0, 1, 2, 3, 4, 5, 8}
    assert res[6].status == "rejected" and "spatial_reasoning" in res[6].reason
    assert res[7].status == "rejected" and "HTTP 400" in res[7].reason
    for r in res.values():
        if r.record is not None:
            assert validate(r.record) == []

    seen = teacher_server.by_seed()
    assert len(seen[7]) == 1, "a 400 must never be retried"
    assert len(seen[6]) == 3, "re-asked up to --max-attempts, then rejected"
    # 429 with Retry-After: 1 -> the retry waits at least that long (the backoff alone is ~10 ms).
    assert seen[1][1].time - seen[1][0].time >= 0.9
    # The hang outlived the 1 s client timeout and was retried.
    assert [r.behaviour for r in seen[3]] == ["hang", "ok"]
    # Re-asks carry the previous answer and the validation errors.
    reask = seen[4][1].body["messages"]
    assert reask[-2]["role"] == "assistant" and "oops" in reask[-2]["content"]
    assert "not valid JSON" in reask[-1]["content"]
    assert "cut off" in seen[5][1].body["messages"][-1]["content"]
    assert "uncovered" in seen[8][1].body["messages"][-1]["content"]

    with ResultStore(tmp_path / "store.sqlite") as store:
        rejects = {r.episode_id.rsplit("#", 1)[-1]: r for r in store.rejects()}
        assert set(rejects) == {"6", "7"}
        assert '"extra": 1' in rejects["6"].raw and rejects["6"].attempts == 3
        # Every answer received is accounted, including invalid ones: 7 first answers, 4 re-asks, 2 extra schema.
        spend = store.spend()
        assert spend.requests == engine.counters.requests == 13
        assert spend.cost == pytest.approx(13 * 0.0014)


def test_transient_failures_that_persist_fail_for_this_run_and_are_retried_next_run(
    tiny_rlds, teacher_server, tmp_path
):
    uri = tiny_rlds(2)
    teacher_server.scripts = {0: ["500", "500", "500"]}
    _, results = run_engine(uri, teacher_server, tmp_path / "s.sqlite")
    res = by_seed(results)
    assert res[0].status == "failed" and "HTTP 500" in res[0].reason
    assert res[1].status == "annotated"
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.rejects() == []  # not given up on for good
    _, again = run_engine(uri, teacher_server, tmp_path / "s.sqlite")
    res2 = by_seed(again)
    assert res2[0].status == "annotated" and res2[1].status == "cached"


def test_rerun_pays_nothing_twice_and_a_new_model_makes_new_keys(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(3)
    store = tmp_path / "s.sqlite"
    run_engine(uri, teacher_server, store)
    assert len(teacher_server.requests) == 3
    _, again = run_engine(uri, teacher_server, store)
    assert len(teacher_server.requests) == 3
    assert {r.status for r in again.values()} == {"cached"}
    _, other = run_engine(uri, teacher_server, store, model="fake-model-2")
    assert len(teacher_server.requests) == 6
    assert {r.status for r in other.values()} == {"annotated"}


def test_interrupted_reask_sequence_resumes_from_the_stored_answers(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(1)
    store = tmp_path / "s.sqlite"
    teacher_server.scripts = {0: ["schema", "ok"]}
    # One attempt allowed, then the reject is removed: as if killed between the answer and the reject.
    run_engine(uri, teacher_server, store, max_attempts=1)
    with ResultStore(store) as s:
        s._db.execute("DELETE FROM rejects")
        assert len(s.attempts(next(iter(s._db.execute("SELECT key FROM attempts")))[0])) == 1
    _, results = run_engine(uri, teacher_server, store, max_attempts=3)
    assert next(iter(results.values())).status == "annotated"
    second = teacher_server.requests[-1].body["messages"]
    assert len(teacher_server.requests) == 2
    assert second[-2]["role"] == "assistant" and '"extra": 1' in second[-2]["content"]


def test_max_cost_stops_dispatching_and_a_higher_budget_continues(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(8)
    store = tmp_path / "s.sqlite"
    engine, results = run_engine(uri, teacher_server, store, concurrency=1, max_cost=0.01)
    assert engine.stop_reason == "max-cost"
    done = [r for r in results.values() if r.status == "annotated"]
    assert 0 < len(done) < 8
    with ResultStore(store) as s:
        assert s.spend().cost <= 0.01
    n = len(teacher_server.requests)
    engine2, results2 = run_engine(uri, teacher_server, store, concurrency=1, max_cost=1.0)
    assert engine2.stop_reason is None
    assert len(teacher_server.requests) == n + 8 - len(done)
    assert sorted(r.status for r in results2.values()).count("cached") == len(done)


def test_rpm_limit_spaces_requests(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(8)
    engine, _ = run_engine(uri, teacher_server, tmp_path / "s.sqlite", rpm=60.0, concurrency=8)
    times = sorted(r.time for r in teacher_server.requests)
    # burst capacity is 5 (5 s at 1/s): requests 6..8 wait ~1 s each
    assert times[-1] - times[0] >= 2.5
    assert engine.counters.requests == 8


def test_a_teacher_that_ignores_its_timeout_is_cut_off_by_the_engine(tiny_rlds, tmp_path, monkeypatch):
    """The client enforces --timeout; the engine's backstop (timeout + 5 s) catches a teacher that does not."""
    from refinevla.annotate import engine as engine_module
    from refinevla.annotate.teachers.rule_based import RuleBasedTeacher

    class Hangs(RuleBasedTeacher):
        calls = 0

        async def complete(self, request, timeout):
            Hangs.calls += 1
            if Hangs.calls == 1:
                await asyncio.sleep(3600)
            return await super().complete(request, timeout)

    real_within = engine_module._within
    monkeypatch.setattr(engine_module, "_within", lambda awaitable, seconds: real_within(awaitable, seconds - 4.9))
    source = open_source(tiny_rlds(1))
    results: list[AnnotationOutcome] = []
    opts = EngineOptions(timeout=0.1, retry_base=0.01, retry_max=0.01, max_retries=1)
    with ResultStore(tmp_path / "s.sqlite") as store:
        engine = Engine(Hangs(), store, opts, sink=results.append)
        asyncio.run(asyncio.wait_for(engine.run(source.iter_episodes(), total=1), 30))
    assert [r.status for r in results] == ["annotated"] and engine.counters.retries == 1
    assert Hangs.calls == 2


def test_concurrency_bounds_requests_in_flight_including_reasks(tiny_rlds, tmp_path):
    """A slot is a request in flight: never more than --concurrency, and all of them used."""
    from refinevla.annotate.teachers.rule_based import RuleBasedTeacher

    class Counting(RuleBasedTeacher):
        in_flight = peak = calls = 0

        async def complete(self, request, timeout):
            Counting.calls += 1
            Counting.in_flight += 1
            Counting.peak = max(Counting.peak, Counting.in_flight)
            try:
                await asyncio.sleep(0.02)
                if request.attempt == 1 and int(request.episode_id.rsplit("#", 1)[-1]) % 2:  # odd: re-asked
                    return TeacherResponse(text="{}", finish_reason="stop")
                return await super().complete(request, timeout)
            finally:
                Counting.in_flight -= 1

    from refinevla.annotate.teachers.base import TeacherResponse

    source = open_source(tiny_rlds(12))
    results: list[AnnotationOutcome] = []
    with ResultStore(tmp_path / "s.sqlite") as store:
        engine = Engine(Counting(), store, EngineOptions(concurrency=3), sink=results.append)
        asyncio.run(engine.run(source.iter_episodes(), total=len(source)))
    assert sorted(r.status for r in results) == ["annotated"] * 12
    assert engine.counters.reasks == 6 and Counting.calls == 18
    assert Counting.peak == 3


class SlowDiskStore(ResultStore):
    """A store whose commits take 0.1 s (fsyncs on a disk another process floods) and which notes, as each
    commit starts, how many answers the teacher had sent by then against how many were already on disk."""

    def __init__(self, path: Path, server: Any) -> None:
        super().__init__(path)
        self.server = server
        self.committed = 0
        self.unkept: list[int] = []  # paid for and not yet on disk, as each commit starts

    def record_answer(self, *args: Any) -> None:
        self.unkept.append(len(self.server.requests) - self.committed)
        time.sleep(0.1)
        super().record_answer(*args)
        self.committed += 1


def test_a_store_slower_than_the_teacher_holds_the_asks_back(tiny_rlds, teacher_server, tmp_path):
    """What a kill can lose is bounded whatever the disk does: at most --concurrency requests in flight and
    --concurrency answers waiting for their commit. (A request's slot is given back when its answer arrives;
    unbounded, the asks ran ahead of a slow store, and a driver killed in CI lost 13 answers of 16.)"""
    source = open_source(tiny_rlds(12))
    teacher = OpenAICompatTeacher.for_provider("openai-compatible", model="fake-model", base_url=teacher_server.url)
    results: dict[str, AnnotationOutcome] = {}
    with SlowDiskStore(tmp_path / "s.sqlite", teacher_server) as store:
        engine = Engine(
            teacher, store, EngineOptions(concurrency=2), PRICES, sink=lambda r: results.__setitem__(r.episode_id, r)
        )
        asyncio.run(engine.run(source.iter_episodes(), total=len(source)))
    assert {r.status for r in results.values()} == {"annotated"} and len(results) == 12
    assert store.committed == 12 and len(store.unkept) == 12
    assert max(store.unkept) <= 2 * 2, store.unkept
