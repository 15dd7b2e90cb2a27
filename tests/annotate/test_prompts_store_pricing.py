"""Keyframes, prompt templates, request keys, the result store and the price table."""

from __future__ import annotations

import io
import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from refinevla.annotate.episode import FrameSequence
from refinevla.annotate.errors import RefineError
from refinevla.annotate.pricing import PriceTable
from refinevla.annotate.prompts import build_prompt, load_template, select_keyframes
from refinevla.annotate.prompts.keyframes import encode_keyframe
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import Attempt, ResultStore
from refinevla.annotate.teacher_requests import request_key


def jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_keyframes_are_evenly_spaced_plus_gripper_events():
    assert select_keyframes(40, [13, 27], 4) == [0, 13, 26, 27, 39]
    assert select_keyframes(3, [], 6) == [0, 1, 2]
    assert select_keyframes(10, [99], 1) == [0]


def test_small_stored_jpegs_pass_through_and_large_ones_are_resized():
    small, large = jpeg(64, 64), jpeg(300, 400)
    frames = FrameSequence([small, large])
    kept = encode_keyframe(frames, 0, max_side=256)
    assert kept.jpeg is small and kept.size == (64, 64)
    resized = encode_keyframe(frames, 1, max_side=256)
    assert resized.size == (256, 192)
    assert Image.open(io.BytesIO(resized.jpeg)).format == "JPEG"


def test_prompt_lists_the_numbered_motion_segments_and_the_keyframes(tiny_rlds):
    episode = next(open_source(tiny_rlds(1)).iter_episodes())
    bundle = build_prompt(episode)
    text = bundle.messages[1]["content"][0]["text"]
    assert f"{len(episode)} steps" in text and "put the spoon 0 on the towel" in text
    for i, seg in enumerate(bundle.facts.segments):
        assert f"{i}. steps {seg.start}..{seg.end}: {seg.move}" in text
    assert [e.step for e in bundle.facts.events] == [3, 8]
    assert {3, 8} <= set(bundle.frame_key["steps"])
    assert len(bundle.messages[1]["content"]) == 1 + len(bundle.keyframes)
    assert bundle.image_size == (64, 64)


def test_request_key_changes_with_model_prompt_schema_frames_and_sampling():
    base = dict(
        content_digest="abc",
        frame_key={"steps": [0, 5]},
        template_version="rationale-v1",
        template_digest=load_template().digest,
        schema_id="refinevla.rationale/1",
        teacher="gemini",
        model="gemini-2.5-flash",
        sampling={"temperature": 0.2},
    )
    key = request_key(**base)
    assert key == request_key(**base)
    for field, value in [
        ("content_digest", "abd"),
        ("frame_key", {"steps": [0, 6]}),
        ("template_version", "rationale-v2"),
        ("template_digest", "0" * 64),
        ("model", "gemini-2.5-pro"),
        ("teacher", "openai"),
        ("sampling", {"temperature": 0.3}),
    ]:
        assert request_key(**{**base, field: value}) != key, field
    with pytest.raises(ValueError, match="unknown schema id"):
        request_key(**{**base, "schema_id": "refinevla.rationale/9"})


def test_store_is_wal_and_commits_survive_reopening(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    store.record_attempt("k", "ep", "m", Attempt(1, "{bad", "stop", ["not JSON"], 10, 5, 0.5))
    store.commit_answer("k", "ep", {"a": 1}, 2, "m")
    store.commit_reject("k2", "ep2", "invalid", "raw!", 3)
    # Read from a second connection before closing: the writes are committed, not buffered.
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1
    store.close()
    with ResultStore(path) as again:
        assert again.answer("k").answer == {"a": 1}
        assert again.attempts("k")[0].errors == ["not JSON"]
        assert again.reject("k2").raw == "raw!"
        assert again.spend().cost == 0.5 and again.answer("missing") is None


def test_price_table_is_packaged_and_overridable(tmp_path, monkeypatch):
    table = PriceTable.load()
    assert table.get("gemini-2.5-flash") is not None
    assert table.cost("gemini-2.5-flash", 1_000_000, 0) == pytest.approx(table.get("gemini-2.5-flash").input)
    assert table.get("models/gemini-2.5-flash") == table.get("gemini-2.5-flash")
    override = tmp_path / "p.json"
    override.write_text(json.dumps({"gemini-2.5-flash": {"input": 9, "output": 9}, "mine": {"input": 1, "output": 1}}))
    assert PriceTable.load(override).cost("gemini-2.5-flash", 1_000_000, 1_000_000) == pytest.approx(18)
    monkeypatch.setenv("REFINEVLA_PRICES", str(override))
    assert PriceTable.load().get("mine") is not None
    override.write_text(json.dumps({"bad": {"input": "x"}}))
    with pytest.raises(RefineError, match="'bad'"):
        PriceTable.load(override)


def test_rule_based_names_the_phase_after_a_grasp_from_the_moves_made() -> None:
    from refinevla.annotate.teachers.rule_based import _held_phase

    assert _held_phase(["stop", "stop"], "pick up the cube")[0] == "hold the object in place"
    assert _held_phase(["move up", "move forward up", "stop"], "pick up the cube")[0] == "lift the object"
    sub, why = _held_phase(["move left", "move left", "move forward"], "push it")
    assert sub == "move the object left" and "push it" in why


_OPEN_AT = """
import sys, time
from refinevla.annotate.store import ResultStore
at = float(sys.argv[2])
time.sleep(max(0.0, at - time.time() - 0.05))
while time.time() < at:  # every process opens the store at the same instant
    pass
ResultStore(sys.argv[1]).close()
"""


def test_processes_opening_one_new_store_together_all_succeed(tmp_path):
    """Switching a new file to WAL is exclusive; SQLite refuses a concurrent switch without waiting."""
    import subprocess
    import sys
    import time

    for round_ in range(8):
        path = str(tmp_path / f"store-{round_}.sqlite")
        at = str(time.time() + 0.8)  # after every interpreter has started
        procs = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AT, path, at], stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_data_url_pickles_once_and_comes_back_whole() -> None:
    """Prepared requests travel pickled from Ray tasks: the image once, not as its text and its JSON too."""
    import pickle

    from refinevla.annotate.prompts import DataURL

    url = DataURL.jpeg(bytes(range(256)) * 40)
    back = pickle.loads(pickle.dumps(url))
    assert isinstance(back, DataURL) and back == url and back.json == url.json
    assert len(pickle.dumps(url)) < 1.1 * len(url)


def test_an_attempt_keeps_its_latency_and_an_older_store_gains_the_column(tmp_path):
    db = tmp_path / "store.sqlite"
    with sqlite3.connect(db) as conn:  # a store written before attempts had a latency
        conn.execute(
            "CREATE TABLE attempts (key TEXT NOT NULL, attempt INTEGER NOT NULL, episode_id TEXT NOT NULL, "
            "raw TEXT NOT NULL, finish_reason TEXT, errors TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
            "completion_tokens INTEGER NOT NULL, cost REAL NOT NULL, model TEXT NOT NULL, created REAL NOT NULL, "
            "PRIMARY KEY (key, attempt))"
        )
        conn.execute("INSERT INTO attempts VALUES ('old', 1, 'e0', '{}', 'stop', '[]', 10, 2, 0.5, 'm', 0)")
    with ResultStore(db) as store:
        store.record_attempt("new", "e1", "m", Attempt(1, "{}", "stop", ["bad"], 10, 2, 0.5, latency=1.25))
        assert store.attempts("new")[0].latency == 1.25
        assert store.attempts("old")[0].latency is None and store.attempts("old")[0].prompt_tokens == 10


def test_a_live_run_stores_each_answers_latency(tiny_rlds, teacher_server, tmp_path):
    from typer.testing import CliRunner

    from refinevla.annotate.cli import app
    from tests.annotate.conftest import SECRET

    teacher_server.latency = 0.2
    out = tmp_path / "out"
    args = [*("annotate", tiny_rlds(2), "--out", str(out), "--progress", "none", "--teacher", "openai-compatible")]
    args += ["--base-url", teacher_server.url, "--model", "fake-model"]
    r = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
    assert r.exit_code == 0, r.output
    with sqlite3.connect(out / ".refine" / "store.sqlite") as conn:
        latencies = [row[0] for row in conn.execute("SELECT latency FROM attempts")]
    assert len(latencies) == 2 and all(0.2 <= x < 5.0 for x in latencies)
