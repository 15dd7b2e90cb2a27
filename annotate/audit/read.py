"""What the audit reads: an annotated output's episode rows, its states, its spend, and the simulator's truth.

Only the columns the metrics need are read (a lazy Parquet scan with a projection: the step rows' texts,
actions and move labels are never loaded), and the output is opened the way `refine-data view` opens it
(`annotated.open_annotated`: a local folder or a Hub id ORG/NAME, manifest and Parquet only).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...schemas.dataset_layout import PRIVATE_DIR, episode_files, manifest_path, step_files
from ...schemas.truth import TRUTH_FILE, EpisodeTruth, TruthError, read_truth
from ..annotated import open_annotated
from ..errors import RefineError

EPISODE_COLUMNS = (
    "episode_id",
    "instruction",
    "num_steps",
    "observation",
    "task_plan",
    "objects",
    "attempts",
    "request_key",
)
STEP_COLUMNS = ("episode_id", "step", "state")


@dataclass(frozen=True)
class Spend:
    """What one request key cost, summed over its attempts (from the output's store)."""

    attempts: int
    tokens: int  # prompt + completion
    cost_usd: float


@dataclass
class AnnotatedOutput:
    """An annotated output as the audit needs it."""

    name: str  # as the user gave it (a folder or ORG/NAME)
    root: Path  # the folder read (a Hub dataset's local snapshot)
    local: bool  # a folder of the user's (False: a Hub download in the cache)
    manifest: dict[str, Any]
    episodes: list[dict[str, Any]]  # EPISODE_COLUMNS per episode, in file order
    states: np.ndarray  # (steps, 7) float32: every step's state, grouped by episode, in step order
    spans: dict[str, tuple[int, int]]  # episode_id -> [start, stop) rows of `states`
    rejects: dict[str, str]  # episode_id -> reason (.refine/rejects*.jsonl; empty for a Hub copy)
    spend: dict[str, Spend] | None  # request_key -> spend; None without a store (a Hub copy)

    def episode_states(self, episode_id: str) -> np.ndarray:
        start, stop = self.spans.get(episode_id, (0, 0))
        return self.states[start:stop]

    @property
    def max_side(self) -> int | None:
        """The longest side keyframes were sent at (`--image-size`), as the manifest records it."""
        value = (self.manifest.get("frames") or {}).get("max_side")
        return int(value) if value else None


def read_output(name: str) -> AnnotatedOutput:
    """Open OUT (a folder or ORG/NAME) and read what the audit scores. RefineError (one line) when it is
    not an annotated output: no manifest, no episode rows."""
    import polars as pl

    data = open_annotated(name)
    root = data.root
    files = episode_files(root)
    if not files:
        raise RefineError(
            f"{name}: no episode rows ({root / 'episodes'}/train-*.parquet): not an annotated output "
            f"(run refine-data annotate first)"
        )
    episodes = pl.scan_parquet(files).select(EPISODE_COLUMNS).collect()
    if episodes.height == 0:
        rejected = len(data.rejects) or (data.manifest.get("counts") or {}).get("rejected", 0)
        raise RefineError(f"{name}: no annotated episodes to audit ({rejected} rejected)")
    steps = (
        pl.scan_parquet(step_files(root)).select(STEP_COLUMNS).sort("episode_id", "step").collect()
        if step_files(root)
        else pl.DataFrame(schema={"episode_id": pl.String, "step": pl.Int64, "state": pl.Array(pl.Float32, 7)})
    )
    states = steps["state"].to_numpy().reshape(-1, 7) if steps.height else np.zeros((0, 7), np.float32)
    # sorted by episode, so each episode's rows are one contiguous run, in the order of `group_by`'s groups
    runs = steps.group_by("episode_id", maintain_order=True).len()
    spans: dict[str, tuple[int, int]] = {}
    at = 0
    for episode_id, n in zip(runs["episode_id"].to_list(), runs["len"].to_list(), strict=True):
        spans[episode_id] = (at, at + n)
        at += n
    local = Path(name).exists()
    return AnnotatedOutput(
        name=name,
        root=root,
        local=local,
        manifest=data.manifest,
        episodes=episodes.to_dicts(),
        states=states,
        spans=spans,
        rejects=data.rejects,
        spend=read_spend(root) if local else None,
    )


def read_spend(root: Path) -> dict[str, Spend] | None:
    """Attempts, tokens and cost per request key from the output's stores (`.refine/store*.sqlite`, one
    per shard), opened read-only; None when there is none (a copy without its private folder)."""
    paths = sorted((root / PRIVATE_DIR).glob("store*.sqlite"))
    if not paths:
        return None
    out: dict[str, Spend] = {}
    for path in paths:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute(
                    "SELECT key, COUNT(*), SUM(prompt_tokens + completion_tokens), SUM(cost) FROM attempts GROUP BY key"
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise RefineError(f"{path}: cannot read the annotation store ({exc})") from None
        for key, attempts, tokens, cost in rows:
            out[key] = Spend(int(attempts), int(tokens or 0), float(cost or 0.0))
    return out


def read_demos_truth(directory: Path, episodes: dict[str, int]) -> dict[str, EpisodeTruth]:
    """The truth of a `refine-eval demos` folder for OUT's episodes (episode id -> its steps in OUT).
    RefineError (one line) when the folder is not a demos folder, its truth file is malformed, it does not
    hold every episode of OUT, or an episode's length differs (another recording under the same id)."""
    episode_ids = list(episodes)
    if not directory.is_dir():
        raise RefineError(f"--truth {directory}: no such folder")
    try:
        truth = read_truth(directory)
    except TruthError as exc:
        raise RefineError(f"--truth: {exc}") from None
    if truth is None:
        raise RefineError(
            f"--truth {directory}: not a refine-eval demos folder (no {TRUTH_FILE}; refine-eval demos writes it)"
        )
    missing = [e for e in episode_ids if e not in truth]
    if missing and len(missing) == len(episode_ids):
        example = next(iter(truth), None)
        raise RefineError(
            f"--truth {directory}: holds none of the output's {len(episode_ids)} episodes (the output has "
            f"{episode_ids[0]!r}, the truth {example!r}): not the demos the output was annotated from"
        )
    if missing:
        raise RefineError(
            f"--truth {directory}: lacks {len(missing)} of the output's {len(episode_ids)} episodes "
            f"(first: {missing[0]!r}): not the demos the output was annotated from"
        )
    for e, steps in episodes.items():
        if truth[e].num_steps != steps:
            raise RefineError(
                f"--truth {directory}: episode {e!r} has {truth[e].num_steps} steps there, {steps} in the output: "
                "not the demos the output was annotated from"
            )
    return {e: truth[e] for e in episode_ids}


def output_label(out: AnnotatedOutput) -> str:
    """A short name for the output (its folder's or the Hub repo's name), for a default report folder."""
    return Path(out.name.rstrip("/")).name or manifest_path(out.root).parent.name
