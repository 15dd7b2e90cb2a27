"""`episodes.jsonl`: appended per episode, reloaded as the set of done keys, and never left
holding half a record followed by a whole one after a crash mid-write."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from refinevla.evaluate.errors import EvalError
from refinevla.evaluate.results import (
    EPISODES_FILE,
    EpisodeLog,
    EpisodeResult,
    episode_key,
    read_episodes,
    read_jsonl,
)


def episode(config: int = 0, repeat: int = 0, suite: str = "widowx", task: str = "carrot_on_plate") -> EpisodeResult:
    return EpisodeResult(
        suite=suite,
        task=task,
        env_id="PutCarrotOnPlateInScene-v1",
        config=config,
        repeat=repeat,
        seed=1000 * config + repeat,
        instruction="put carrot on plate",
        success=config % 2 == 0,
        success_once=True,
        grasp=True,
        grasped_once=True,
        steps=60,
        wall_s=1.5,
        rationales=["PLAN: reach the carrot", "MOVE: move down"],
        info={"moved_correct_obj": True},
    )


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_appended_episodes_are_done_after_reopening(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path / "run")
    assert log.done == set()
    first, second = episode(0, 0), episode(3, 1, task="spoon_on_towel")
    log.append(first)
    log.append(second)
    assert log.done == {first.key, second.key}

    reopened = EpisodeLog(tmp_path / "run")
    assert reopened.done == {"widowx/carrot_on_plate/0/0", "widowx/spoon_on_towel/3/1"}
    assert read_episodes(tmp_path / "run") == [asdict(first), asdict(second)]


def test_each_append_is_one_complete_line_on_disk(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    for i in range(3):
        log.append(episode(i))
        # durable the moment the episode ends: a reader sees it without the log being closed
        assert len(lines(tmp_path / EPISODES_FILE)) == i + 1
    assert all(line.endswith(b"\n") for line in lines(tmp_path / EPISODES_FILE))
    assert [json.loads(line)["config"] for line in lines(tmp_path / EPISODES_FILE)] == [0, 1, 2]


def test_torn_last_line_is_skipped_by_read_jsonl(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    log.append(episode(0))
    log.append(episode(1))
    whole = json.dumps(asdict(episode(2)))
    with (tmp_path / EPISODES_FILE).open("a") as fh:
        fh.write(whole[: len(whole) // 2])  # the process died mid-write: no newline
    assert [rec["config"] for rec in read_jsonl(tmp_path / EPISODES_FILE)] == [0, 1]
    assert [rec["config"] for rec in read_episodes(tmp_path)] == [0, 1]


def test_a_complete_record_without_its_newline_still_counts_as_torn(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    log.append(episode(0))
    with (tmp_path / EPISODES_FILE).open("a") as fh:
        fh.write(json.dumps(asdict(episode(1))))  # all but the newline reached the disk
    assert [rec["config"] for rec in read_jsonl(tmp_path / EPISODES_FILE)] == [0]
    assert EpisodeLog(tmp_path).done == {episode(0).key}  # so the episode is run again


def test_torn_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    log.append(episode(0))
    log.append(episode(1))
    with (tmp_path / EPISODES_FILE).open("a") as fh:
        fh.write('{"suite": "widowx", "task": "carr')

    resumed = EpisodeLog(tmp_path)  # the rerun after the crash
    assert resumed.done == {episode(0).key, episode(1).key}
    assert (tmp_path / EPISODES_FILE).read_bytes().endswith(b"}\n")
    resumed.append(episode(2))

    raw = lines(tmp_path / EPISODES_FILE)
    assert len(raw) == 3
    assert [json.loads(line)["config"] for line in raw] == [0, 1, 2]  # every line parses: valid JSONL
    assert [rec["config"] for rec in read_jsonl(tmp_path / EPISODES_FILE)] == [0, 1, 2]
    assert EpisodeLog(tmp_path).done == {episode(i).key for i in range(3)}


def test_torn_first_line_leaves_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / EPISODES_FILE).write_text('{"suite": "wid')
    log = EpisodeLog(tmp_path)
    assert log.done == set()
    assert (tmp_path / EPISODES_FILE).read_bytes() == b""
    log.append(episode(4))
    assert [json.loads(line)["config"] for line in lines(tmp_path / EPISODES_FILE)] == [4]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]
    assert list(read_jsonl(tmp_path / "missing.jsonl")) == []


def test_key_is_suite_task_config_repeat() -> None:
    base = episode(config=2, repeat=1)
    assert base.key == episode_key("widowx", "carrot_on_plate", 2, 1) == "widowx/carrot_on_plate/2/1"
    # what identifies an episode
    assert replace(base, repeat=2).key != base.key
    assert replace(base, config=3).key != base.key
    assert replace(base, task="spoon_on_towel").key != base.key
    assert replace(base, suite="maniskill:PutCarrotOnPlateInScene-v1").key != base.key
    # what does not: outcomes, seeds, logs
    assert replace(base, seed=7, success=not base.success, steps=3, instruction="x", env_id="y").key == base.key


def test_done_keys_come_from_the_records_fields(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    log.append(episode(1, 0, suite="google-vm", task="pick_coke_can"))
    log.append(episode(1, 1, suite="google-vm", task="pick_coke_can"))
    log.append(episode(1, 0, suite="google-va", task="pick_coke_can"))
    assert EpisodeLog(tmp_path).done == {
        "google-vm/pick_coke_can/1/0",
        "google-vm/pick_coke_can/1/1",
        "google-va/pick_coke_can/1/0",
    }


def test_reading_a_folder_without_episodes_is_an_eval_error(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=EPISODES_FILE):
        read_episodes(tmp_path)
