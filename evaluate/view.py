"""`refine-eval view`: each evaluated episode on Rerun's step timeline — what the policy saw, wrote and did.

The audit SimplerEnv users ask for: per episode (`episodes/<index>/`, the order of `episodes.jsonl`)
the frames (from the episode's video: `refine-eval run --video` keeps them; without one, a note
says so), the rationale the policy wrote at every step (`rationale`), its raw and env actions
(`raw_action`, `env_action`: 7 scalars each, kept by `run --log-actions`), and a document with the
task, configuration, seed, instruction, success and grasp. Where the recording goes (`--save`, the native viewer,
`--serve`) is `refine-data view`'s code (`annotate/viewer.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.viewer import Recording, ViewSummary, ViewTarget, import_rerun, log_series
from .errors import EvalError
from .results import read_episodes, read_run


def video_frames(path: Path) -> list[np.ndarray]:
    """The frames of an episode's mp4, RGB."""
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def episode_document(ep: dict[str, Any], run: dict[str, Any]) -> str:
    grasp = "-" if ep.get("grasp") is None else ("yes" if ep["grasp"] else "no")
    return (
        f"## {ep['task']} ({ep['env_id']}), configuration {ep['config']}, seed {ep['seed']}\n\n"
        f"**Instruction**: {ep['instruction']}\n\n**Success**: {'yes' if ep['success'] else 'no'} "
        f"(at any step: {'yes' if ep.get('success_once') else 'no'}) | **Grasp**: {grasp} | "
        f"**Steps**: {ep['steps']}\n\n"
        f"_policy_: {(run.get('policy') or {}).get('path', run.get('policy'))}, reasoning {run.get('reasoning')}"
    )


def view_results(results: Path, selection: str | None, target: ViewTarget, frames: bool) -> ViewSummary:
    """Log the selected episodes of a results folder; `frames` requires every one to have its video."""
    from ..annotate.source_args import parse_range

    run = read_run(results)
    episodes = read_episodes(results)
    start, stop = parse_range(selection or f"0:{len(episodes)}")
    chosen = list(enumerate(episodes))[start:stop]
    if not chosen:
        raise EvalError(f"--episodes {selection}: selects no episode of {results} (it has {len(episodes)})")
    missing = [ep for _, ep in chosen if not ep.get("video") or not (results / ep["video"]).is_file()]
    if frames and missing:
        raise EvalError(
            f"{results}: {len(missing)} of the {len(chosen)} selected episodes have no video (e.g. "
            f"{missing[0]['task']} configuration {missing[0]['config']}); rerun refine-eval run with --video to keep "
            "the frames"
        )
    rr = import_rerun()
    recording = Recording(rr, f"refine-eval-view:{results.resolve().name}", target)
    logged_frames = 0
    for index, ep in chosen:
        logged_frames += log_episode(recording.stream, rr, index, ep, run, results)
    return ViewSummary(len(chosen), recording.close(), frames=logged_frames)


def log_episode(rec: Any, rr: Any, index: int, ep: dict[str, Any], run: dict[str, Any], results: Path) -> int:
    """One episode under episodes/<index>; returns the frames logged."""
    root = f"episodes/{index}"
    rec.log(f"{root}/result", rr.TextDocument(episode_document(ep, run), media_type="text/markdown"), static=True)
    images: list[np.ndarray] = []
    if ep.get("video") and (results / ep["video"]).is_file():
        images = video_frames(results / ep["video"])
    else:
        rec.log(f"{root}/camera", rr.TextDocument("no frames: run refine-eval with --video to keep them"), static=True)
    actions = ep.get("actions") or []
    for name in ("raw_action", "env_action"):
        log_series(rec, rr, f"{root}/{name}", [a[name] for a in actions])
    rationales = ep.get("rationales") or []
    for t in range(max(len(images), len(rationales))):
        rec.set_time("step", sequence=t)
        if t < len(images):
            rec.log(f"{root}/camera", rr.Image(images[t]))
        if t < len(rationales):
            rec.log(f"{root}/rationale", rr.TextDocument(rationales[t] or "(no rationale: action-only)"))
    return len(images)
