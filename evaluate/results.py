"""The results folder of `refine-eval run`: `run.json` (what was evaluated, on what) and
`episodes.jsonl` (one line per finished episode).

Durability is per episode: a line is written, flushed and fsynced the moment its episode ends,
so a killed run loses at most the episodes in progress, and a rerun skips every key already
there. A torn last line (the process died mid-write) is ignored on reading and cut away before
the next append, so the file never holds half a record followed by a whole one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import EvalError

RESULTS_FORMAT = "refinevla.eval/1"
EPISODES_FILE = "episodes.jsonl"
RUN_FILE = "run.json"


@dataclass
class EpisodeResult:
    """One evaluated episode; `grasp` is None where the task defines no grasp metric."""

    suite: str  # widowx | google-vm | google-va | maniskill:ENV_ID
    task: str  # carrot_on_plate, pick_coke_can, ... (the ENV_ID for maniskill:)
    env_id: str  # the simulator's own task id (PutCarrotOnPlateInScene-v1, ...)
    config: int  # the task's episode configuration (ManiSkill's episode_id, SimplerEnv's grid cell)
    repeat: int  # 0..episodes-per-config - 1
    seed: int  # the env's reset seed
    instruction: str
    success: bool  # success at the last step, as SimplerEnv reports it
    success_once: bool  # success at any step
    grasp: bool | None  # WidowX: grasped for >= 5 consecutive steps at some point (SimplerEnv's "grasp")
    grasped_once: bool | None  # WidowX: grasped at any step
    steps: int
    wall_s: float
    rationales: list[str] = field(default_factory=list)  # the policy's rationale per step
    actions: list[dict[str, list[float]]] | None = None  # --log-actions: raw_action and env_action per step
    video: str | None = None  # path relative to the results folder
    info: dict[str, Any] = field(default_factory=dict)  # the env's final info (scalars), for reference

    @property
    def key(self) -> str:
        return episode_key(self.suite, self.task, self.config, self.repeat)


def episode_key(suite: str, task: str, config: int, repeat: int) -> str:
    return f"{suite}/{task}/{config}/{repeat}"


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete lines only: a torn last line is skipped (it is the episode that was in progress)."""
    if not path.is_file():
        return
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield json.loads(raw)


def read_episodes(results: Path) -> list[dict[str, Any]]:
    """Every finished episode of a results folder (dicts with EpisodeResult's keys)."""
    if not (results / EPISODES_FILE).is_file():
        if (results / RUN_FILE).is_file():
            return []  # a run that has not finished its first episode yet
        raise EvalError(f"{results}: no {EPISODES_FILE} (not a refine-eval results folder)")
    return list(read_jsonl(results / EPISODES_FILE))


def read_run(results: Path) -> dict[str, Any]:
    path = results / RUN_FILE
    if not path.is_file():
        raise EvalError(f"{results}: no {RUN_FILE} (not a refine-eval results folder)")
    run: dict[str, Any] = json.loads(path.read_text())
    return run


def write_run(results: Path, run: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / (RUN_FILE + ".partial")
    tmp.write_text(json.dumps(run, indent=2))
    tmp.replace(results / RUN_FILE)


class EpisodeLog:
    """Append-only `episodes.jsonl` with the keys already done."""

    def __init__(self, results: Path) -> None:
        results.mkdir(parents=True, exist_ok=True)
        self.path = results / EPISODES_FILE
        self._drop_torn_tail()
        self.done: set[str] = set()
        for rec in read_jsonl(self.path):
            self.done.add(episode_key(rec["suite"], rec["task"], rec["config"], rec["repeat"]))

    def _drop_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, result: EpisodeResult) -> None:
        line = json.dumps(asdict(result), separators=(",", ":")) + "\n"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add(result.key)
