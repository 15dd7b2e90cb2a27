"""Per-episode and per-run summaries for `refine-data inspect`.

Named for what it holds, not for the command: a module called `inspect` would shadow the
standard library's wherever this folder is on the import path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .episode import Episode


def episode_summary(ep: Episode) -> dict[str, Any]:
    """What a user checks first about an episode: id, length, task, cameras, action range."""
    actions = np.asarray(ep.actions, dtype=np.float64)
    return {
        "episode_id": ep.episode_id,
        "steps": len(ep),
        "instruction": ep.instruction,
        "cameras": ep.cameras,
        "action_min": [round(float(v), 6) for v in actions.min(0)],
        "action_max": [round(float(v), 6) for v in actions.max(0)],
    }


def run_summary(dataset: str, rows: list[dict[str, Any]], corrupt: list[str]) -> dict[str, Any]:
    """The selection at a glance, from the `episode_summary` rows: episode and step counts, distinct tasks, skips."""
    steps = [int(r["steps"]) for r in rows]
    return {
        "dataset": dataset,
        "episodes": len(rows),
        "steps": sum(steps),
        "mean_steps": float(np.mean(steps)) if steps else 0.0,
        "min_steps": min(steps, default=0),
        "max_steps": max(steps, default=0),
        "instructions": len({r["instruction"] for r in rows}),
        "corrupt_skipped": len(corrupt),
    }
