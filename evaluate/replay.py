"""`--policy replay:DIR`: a perfect imitator of the training view of a demos folder.

For each episode the runner starts, it plays the recorded episode of the same (configuration, seed)
as refine-train would have taught it: the actions after the transform `--transform auto` picks for
the folder (what it declares), then through the action tokenizer's round trip with the folder's own
statistics (q01/q99 bounds, 256 bins). Its success is what a policy that learned the training data
exactly can reach — a bound that exposes a convention mismatch (transform, frames, gripper) before
anyone spends GPU time on training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.stats import auto_transform, compute_statistics, transform_episode
from ..train.policy import ActionTokenizer
from .demos import Scene, demo_episodes, open_demos
from .errors import EvalError
from .robots import ROBOTS
from .scripted import ScriptedPolicy

PREFIX = "replay:"
TOKENIZER_VOCAB = 32_000  # any vocabulary above the 256 bins gives the same round trip


def is_replay(policy: str | Path) -> bool:
    return str(policy).startswith(PREFIX)


class ReplayPolicy(ScriptedPolicy):
    """Plays each episode's training view; the runner tells it which episodes it starts (`begin`)."""

    def __init__(self, spec: str | Path, robot: str | None = None) -> None:
        from ..annotate.errors import RefineError

        self.folder = Path(str(spec)[len(PREFIX) :])
        what = f"--policy {spec}"
        source = open_demos(self.folder, what)
        scenes = list(demo_episodes(source, what))
        episodes = [episode for _, episode in scenes]
        try:
            self.transform = auto_transform(source)
        except RefineError as exc:
            raise EvalError(f"{what}: {exc}") from None
        chosen = robot or getattr(source, "declared", {}).get("robot") or "widowx"
        if chosen not in ROBOTS:
            raise EvalError(f"--policy {spec}: unknown robot {chosen!r}")
        super().__init__(chosen)
        tokenizer = ActionTokenizer.from_statistics(compute_statistics(episodes, self.transform), TOKENIZER_VOCAB)
        self.views: dict[Scene, np.ndarray] = {}
        for scene, episode in scenes:
            actions, _ = transform_episode(episode, self.transform)
            self.views[scene] = tokenizer.decode(tokenizer.encode(actions))
        self.playing: list[np.ndarray] = []
        self.t = 0

    def begin(self, env_id: str, scenes: Sequence[tuple[int, int]]) -> None:
        """The (configuration, seed) of each env of the episodes about to start."""
        missing = [s for s in scenes if (env_id, *s) not in self.views]
        if missing:
            raise EvalError(
                f"--policy replay:{self.folder} has no episode of {env_id} configuration {missing[0][0]} seed "
                f"{missing[0][1]}; run it with --episodes-from {self.folder}"
            )
        self.playing = [self.views[(env_id, *s)] for s in scenes]
        self.t = 0

    def step(self, image: np.ndarray, instructions: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if not self.playing:
            raise EvalError("replay: no episode begun (the runner calls begin before each batch)")
        rows = []
        for view in self.playing:
            if self.t < len(view):
                rows.append(view[self.t])
            else:  # after its last recorded step an episode holds still, the gripper as it was
                rows.append(np.concatenate([np.zeros(6), view[-1][6:]]))
        raw = np.stack(rows)
        self.t += 1
        return self.act(raw)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.folder.resolve()),
            "name": f"replay:{self.folder.name}",
            "robot": self.robot,
            "transform": self.transform,
            "reasoning_trained": False,
        }

    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.folder.glob("*")):
            if path.is_file():
                h.update(f"{path.name}:{path.stat().st_size}".encode())
        return h.hexdigest()
