"""Request keys and request bodies pinned to the values the code produced before the speed work (issue 32).

A store written by any earlier run must settle the same episodes again: if a key changed, a rerun over
an old output would ask (and pay for) every episode a second time. The expected keys below were
computed by the code as it was before the command's preparation path was reworked, from fixed
inputs: three 32 px JPEGs embedded here (not made by Pillow at test time, whose encoder may change
between releases) and numbers built with numpy alone. The body digest pins what is sent too.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from refinevla.annotate.batch.emulator.answers import rationale
from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.episode import Episode, FrameSequence
from refinevla.annotate.prompts import FrameOptions, default_template
from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from refinevla.annotate.store import Attempt, ResultStore
from refinevla.annotate.teacher_requests import teacher_request
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher
from refinevla.schemas import default_detail
from tests.annotate.conftest import start_annotate

JPEGS = [
    base64.b64decode(s)
    for s in (
        "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeX"
        "BkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAg"
        "ACADASIAAhEBAxEB/8QAFwABAQEBAAAAAAAAAAAAAAAAAAYFBP/EACsQAAADBgIKAwAAAAAAAAAAAAAREgECBQYTFANhBBUWIiQxQlFUo2XR4v"
        "/EABgBAAMBAQAAAAAAAAAAAAAAAAADBAIF/8QAHREAAgICAwEAAAAAAAAAAAAAAAIBAwQxESJx4f/aAAwDAQACEQMRAD8Al5fgOu7jiaFFPQoz"
        "PNnYbOwnyXo/Q45PiuhQy8vcalUQndeeMlHyZmwUu1UF831P/Q5WRbkrZMV88efClFrle2yNmCA6kt+Jr1ldCSIs29xjilnCK6FE7OyxqtNat1"
        "50jSXNmTRNC7HZ2ribNiXiIbroAAB5gAAAA//Z",
        "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeX"
        "BkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAg"
        "ACADASIAAhEBAxEB/8QAFwAAAwEAAAAAAAAAAAAAAAAAAAUGB//EACsQAAAFAQQJBQAAAAAAAAAAAAABBRETEgMEFGEGFRYiJDFCUaMCVGTR4v"
        "/EABcBAQEBAQAAAAAAAAAAAAAAAAIDAQT/xAAaEQEBAQEBAQEAAAAAAAAAAAABAgARAxIE/9oADAMBAAIRAxEAPwDPwCg0VTbooYrF2UkdFO8Z"
        "M7vyPIg/2bSfaeT1/YlXqS8d0R+ern6NAAFBpUm3RPwuEso5K6t4zdmbmeZifDmvo6aVwxXy5qhrWqJ+Hmlp66WZ8j7hrtn8DzfkSoBj5yvXKf"
        "a5ODmq4ta3g4eGKrrqd2yLsFQABABwwqmnrv/Z",
        "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeX"
        "BkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAg"
        "ACADASIAAhEBAxEB/8QAGAABAQEBAQAAAAAAAAAAAAAAAAYEBQf/xAAnEAABAgIJBQEAAAAAAAAAAAAABBIBEQMGFCJEYXGCwgIFFVSj0f/EABcB"
        "AQEBAQAAAAAAAAAAAAAAAAADBAX/xAAZEQADAQEBAAAAAAAAAAAAAAAAAQMCEQT/2gAMAwEAAhEDEQA/APPwAAAAAUlUMXs5FIQCNepQvs1Kx8"
        "nXYRnLWGZp8/3P2fn0/hbNElw6MPXic1lpnSrfhN/EmzSsXqVzLTSvZNt2EJT0hkZien19Ml6KlHpH/9k=",
    )
]
STEPS = (12, 13, 14)  # episode i has STEPS[i] steps


def _numbers(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """States and actions: reach forward, close the gripper, lift, open it (two gripper events)."""
    t = np.arange(steps)
    states = np.zeros((steps, 7), np.float32)
    states[:, 0] = np.linspace(0.2, 0.35, steps)
    states[:, 1] = 0.01 * seed
    states[:, 2] = np.where(t < steps // 2, 0.05, np.linspace(0.05, 0.2, steps))
    states[:, 6] = np.where((t >= steps // 3) & (t < steps - 2), 0.0, 1.0)
    actions = np.zeros((steps, 7), np.float32)
    actions[:-1, :6] = states[1:, :6] - states[:-1, :6]
    actions[:, 6] = states[:, 6]
    return states, actions


def _frames(seed: int, steps: int) -> list[bytes]:
    return [JPEGS[(seed + t) % len(JPEGS)] for t in range(steps)]


def _episode(seed: int) -> Episode:
    """Episode `seed` as the RLDS reader yields it from `_write_source`'s shards."""
    steps = STEPS[seed]
    states, actions = _numbers(seed, steps)
    t = np.arange(steps)
    return Episode(
        episode_id=f"bridge_orig:/data/raw/traj{seed}.pkl#{seed}",
        dataset="bridge_orig",
        instruction=f"put the spoon {seed} on the towel",
        actions=actions,
        states=states,
        frames={"image_0": FrameSequence(_frames(seed, steps))},
        is_first=t == 0,
        is_last=t == steps - 1,
        is_terminal=t == steps - 1,
        rewards=(t == steps - 1).astype(np.float32),
    )


def _write_source(root: Path) -> str:
    examples = []
    for seed, steps in enumerate(STEPS):
        states, actions = _numbers(seed, steps)
        examples.append(
            specs.bridge_example(
                seed,
                states,
                actions,
                {"image_0": _frames(seed, steps)},
                file_path=f"/data/raw/traj{seed}.pkl",
                instruction=f"put the spoon {seed} on the towel",
            )
        )
    return write_rlds(root, specs.bridge_features(cameras=1, image_size=(32, 32)), examples, name="bridge_orig")


# (teacher, temperature, max_tokens, frames, image size) -> the keys of episodes 0, 1, 2 (computed before issue 32)
OPTION_SETS: dict[str, tuple[tuple[str, float, int, int, int], list[str]]] = {
    # the command's defaults with a self-hosted server: 6 keyframes, stored JPEGs sent as they are, episode detail
    "openai-compatible, 6 keyframes": (
        ("openai-compatible", 0.2, 4096, 6, 256),
        [
            "0f154cf82f2ec9b789403644c21865a0b3298d980591e13dff5f6632aeb9c053",
            "3aa31411485891dd989042b40c03e34d94e5c76408184af9a4400fb04d5ae064",
            "8b68c189dafb3e27d8e69e4f0821868c0fa6c3165e7e78653b46945e9624f0ad",
        ],
    ),
    # a hosted API (static detail), 3 keyframes shrunk to 16 px (decoded and re-encoded), other sampling
    "openai, 3 keyframes at 16 px": (
        ("openai", 0.7, 1000, 3, 16),
        [
            "f17950d54f8de8ad4951ceb2cd317d600c3bb9ae6907ad9fa4339dec5787af89",
            "61b33cd20152e2d8fb723b44bd4382e0c053cea7004523537cf661b4e0464951",
            "ffdac6cccf1d4ee12a56c0b8f0d6607553cc8a636d2692535a1d53928fa2adf1",
        ],
    ),
    # text only: no keyframe, another template
    "openai-compatible, text only": (
        ("openai-compatible", 0.2, 4096, 0, 256),
        [
            "21ecbc9bcf595a9bee237446cf8e523d4dd8105ba07b6ba1d81938dd3041c25c",
            "8794f1ee1cc1569bbb571f279762686b2857b516d8389fe15ca15fd6e8940145",
            "edff96efd98c942a5096c789c9e99b16a2f42b7731e813fffc7baad78ab5ac76",
        ],
    ),
}
# sha256 of the first request's body bytes for episode 0 under each option set whose keyframes are sent as stored
BODY_DIGESTS = {
    "openai-compatible, 6 keyframes": "59224c0c85596e808920c155d5de55f465516c4116f373fe95e37cc8df1ba239",
    "openai-compatible, text only": "742b6159d436985610ae705181772bd237cc3e54f4fceb8852ccded86435bf6e",
}


def _engine(teacher_name: str, temperature: float, max_tokens: int, frames: int, size: int) -> Engine:
    teacher = OpenAICompatTeacher.for_provider(
        teacher_name,
        model="pinned-model",
        base_url="http://127.0.0.1:9/v1",
        temperature=temperature,
        max_tokens=max_tokens,
        require_key=False,
    )
    options = EngineOptions(
        schema_detail=default_detail(teacher_name),  # type: ignore[arg-type]
        template=default_template(frames),
        frames=FrameOptions(count=frames, max_side=size),
    )
    return Engine(teacher, ResultStore(":memory:"), options)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_request_keys_and_bodies_are_those_of_the_code_before_the_speed_work(name: str) -> None:
    setting, expected = OPTION_SETS[name]
    engine = _engine(*setting)
    prepared = [engine.prepare(_episode(seed)) for seed in range(len(STEPS))]
    assert [p.key for p in prepared] == expected
    if name in BODY_DIGESTS:
        first = prepared[0]
        body = engine.teacher.encode(teacher_request(first, list(first.bundle.messages), 1))  # type: ignore[attr-defined]
        assert hashlib.sha256(body).hexdigest() == BODY_DIGESTS[name]


def _old_output(out: Path, keys: list[str]) -> None:
    """An output's store as a run before the speed work left it: a valid answer under each pinned key."""
    with ResultStore(out / ".refine" / "store.sqlite") as store:
        for seed, key in enumerate(keys):
            # the fixture's episodes have two gripper events: three motion segments
            answer: dict[str, Any] = rationale(STEPS[seed], _segments(seed))
            raw = json.dumps(answer)
            attempt = Attempt(1, raw, "stop", [], 1000, 200, 0.0, 0.2)
            store.record_answer(key, _episode(seed).episode_id, "pinned-model", attempt, answer)


def _segments(seed: int) -> int:
    from refinevla.annotate.prompts import episode_facts

    return len(episode_facts(_episode(seed)).segments)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_rerun_over_an_output_made_before_the_speed_work_asks_nothing(
    teacher_server: Any, tmp_path: Path, processes: str
) -> None:
    source = _write_source(tmp_path / "src")
    keys = OPTION_SETS["openai-compatible, 6 keyframes"][1]
    out = tmp_path / "old"
    _old_output(out, keys)
    proc = start_annotate(
        f"rlds:{source}", teacher_server.url, out, "--model", "pinned-model", "--processes", processes
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert teacher_server.requests == []  # nothing asked, nothing paid
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["cached"] == len(STEPS) and manifest["this_run"]["requests"] == 0
    written = pl.read_parquet(out / "episodes").sort("episode_id")
    assert written["request_key"].to_list() == keys


def test_a_new_run_writes_the_pinned_keys(teacher_server: Any, tmp_path: Path) -> None:
    source = _write_source(tmp_path / "src")
    out = tmp_path / "new"
    proc = start_annotate(f"rlds:{source}", teacher_server.url, out, "--model", "pinned-model")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sorted(r.seed for r in teacher_server.requests) == [0, 1, 2]
    written = pl.read_parquet(out / "episodes").sort("episode_id")
    assert written["request_key"].to_list() == OPTION_SETS["openai-compatible, 6 keyframes"][1]
