"""Audit an annotated output: read it, score every episode, rank them, summarise.

`audit_output` is the one call another command needs (a future `refine-data pilot` comparing teachers
audits each teacher's output with it and reads `AuditResult.summary`); `report.write_report` writes the
files and `commands/audit.py` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompts import FrameOptions
from ..prompts.keyframes import keyframe_size
from .read import AnnotatedOutput, read_demos_truth, read_output
from .score import EpisodeAudit, audit_episode, duplicate_flags, rank, summarise

DEFAULT_TOLERANCE = 2  # steps: a subtask boundary this close to an event counts as at it


@dataclass
class AuditResult:
    """An output's audit: the episodes in rank order (worst first) and the pooled summary."""

    output: AnnotatedOutput
    episodes: list[EpisodeAudit]  # rank order: episodes[0] is the worst
    summary: dict[str, Any]  # the numbers `--json` prints (see `score.summarise` and `audit_output`)
    truth_dir: Path | None

    def worst(self, n: int) -> list[str]:
        """The ids of the n worst episodes, worst first."""
        return [a.episode_id for a in self.episodes[:n]]


def audit_output(
    out: str,
    truth: Path | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
    frame_size: tuple[int, int] | None = None,
) -> AuditResult:
    """Audit OUT (a folder or a Hub id ORG/NAME); with `truth`, against a `refine-eval demos` folder's truth.

    `frame_size` is the source frames' (width, height), for the large-box rate without truth: the first
    keyframe is that size shrunk to the manifest's `frames.max_side`; unknown, the keyframe is taken to be
    a max_side square (said in the summary: `keyframe_size_assumed`). RefineError (one line) for an OUT
    that is not annotated and a truth that is not its demos'.
    """
    from ..errors import RefineError

    if tolerance < 0:
        raise RefineError(f"--tolerance {tolerance}: must be 0 or more steps")
    data = read_output(out)
    lengths = {str(e["episode_id"]): int(e["num_steps"]) for e in data.episodes}
    truths = read_demos_truth(truth, lengths) if truth is not None else None
    max_side = data.max_side or FrameOptions().max_side
    keyframe = keyframe_size(*frame_size, max_side) if frame_size else (max_side, max_side)
    dups = duplicate_flags(data.episodes)
    audits = [
        audit_episode(
            row,
            data.episode_states(row["episode_id"]),
            tolerance,
            dups.observation[k],
            dups.plan[k],
            keyframe,
            None if data.spend is None else data.spend.get(str(row["request_key"])),
            truth=None if truths is None else truths[str(row["episode_id"])],
            max_side=max_side,
        )
        for k, row in enumerate(data.episodes)
    ]
    ordered = rank(audits)
    summary = {
        "output": out,
        "teacher": (data.manifest.get("teacher") or {}).get("name"),
        "model": (data.manifest.get("teacher") or {}).get("model"),
        "tolerance": tolerance,
        "truth": None if truth is None else str(truth),
        **summarise(ordered, truths is not None),
        **_reliability(data, ordered),
        "keyframe_size": None if truths is not None else list(keyframe),
        "keyframe_size_assumed": truths is None and frame_size is None,
    }
    return AuditResult(data, ordered, summary, truth)


def _reliability(data: AnnotatedOutput, audits: list[EpisodeAudit]) -> dict[str, Any]:
    """Rejects, tokens and cost of the whole output: the store's sums when the output has its store (rejected
    episodes' attempts included), else the manifest's."""
    counts = data.manifest.get("counts") or {}
    rejected = len(data.rejects) if data.rejects else int(counts.get("rejected") or 0)
    if data.spend is not None:
        tokens: int | None = sum(s.tokens for s in data.spend.values())
        cost: float | None = sum(s.cost_usd for s in data.spend.values())
        source = "store"
    else:
        spent = data.manifest.get("tokens") or {}
        tokens = int(spent.get("prompt") or 0) + int(spent.get("completion") or 0) if spent else None
        cost = data.manifest.get("cost_usd")
        source = "manifest"
    answered = len(audits) + rejected
    return {
        "rejected": rejected,
        "reject_rate": rejected / answered if answered else None,
        "tokens": tokens,
        "cost_usd": None if cost is None else round(float(cost), 6),
        "cost_per_episode": None if cost is None or not audits else round(float(cost) / len(audits), 6),
        "spend_from": source,
    }
