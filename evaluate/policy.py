"""A refine-train checkpoint as a SimplerEnv policy: `reset(instruction)`, `step(image) -> (raw, action)`.

SimplerEnv's contract, batched: `step` takes one frame (H, W, 3) — then it returns SimplerEnv's
unbatched dicts, so the class drops into SimplerEnv's own scripts — or a stack (B, H, W, 3)
from B parallel environments, answered by one forward pass. Frames are resized to the
checkpoint's `image_size` with the same filter the training pipeline used (Lanczos), actions
de-tokenised and un-normalised with the checkpoint's `dataset_statistics.json`, then turned into
the robot's env action (`robots.py`). The rationale each env's policy wrote at each step is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..train.policy import Generated, generate, resize_image
from .errors import EvalError
from .robots import ROBOTS, GripperState, env_actions, raw_action_dict


class RefinePolicy:
    """SimplerEnv-style policy around `refinevla.train.policy.Policy`."""

    def __init__(
        self,
        checkpoint: str | Path,
        robot: str | None = None,
        reasoning: bool = True,
        max_rationale_tokens: int | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from ..train.policy import Policy, longest_rationale_tokens, rationale_budget

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.checkpoint = Policy(checkpoint, device=device, trust_remote_code=trust_remote_code)
        self.info = self.checkpoint.info
        self.robot = robot or self.info.get("robot")
        if self.robot not in ROBOTS:
            raise EvalError(
                f"{checkpoint}: the checkpoint names no robot (transform {self.info.get('transform')!r}); "
                f"pass --robot {'|'.join(ROBOTS)}"
            )
        if reasoning and not self.info.get("reasoning", True):
            reasoning = False  # an action-only policy writes no rationale: nothing to ask for
        self.reasoning = reasoning
        self.max_rationale_tokens = rationale_budget(self.info, max_rationale_tokens)
        longest = longest_rationale_tokens(self.info)
        self.budget_warning = (
            f"--max-rationale-tokens {max_rationale_tokens} is below the {longest} tokens of the policy's longest "
            "training rationale: ACTION: will be forced before such a rationale ends"
            if self.reasoning and longest and max_rationale_tokens is not None and max_rationale_tokens < longest
            else None
        )
        self.image_size = (int(self.info["image_size"][0]), int(self.info["image_size"][1]))
        self.instructions: list[str] = []
        self.gripper = GripperState(self.robot, 1)
        self.last: list[Generated] = []

    def reset(self, instructions: str | Sequence[str]) -> None:
        """Start new episodes: one instruction, or one per parallel env."""
        self.instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        self.gripper = GripperState(self.robot, len(self.instructions))
        self.last = []

    def step(
        self, image: np.ndarray, instructions: str | Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(raw_action, env_action). A new instruction (SimplerEnv passes it every step) resets."""
        single = np.asarray(image).ndim == 3
        images = np.asarray(image)[None] if single else np.asarray(image)
        if instructions is not None:
            wanted = [instructions] if isinstance(instructions, str) else list(instructions)
            if len(wanted) == 1 and len(images) > 1:
                wanted = wanted * len(images)
            if wanted != self.instructions:
                self.reset(wanted)
        if len(images) != len(self.instructions):
            raise EvalError(f"{len(images)} frames for {len(self.instructions)} instructions (call reset first)")
        frames = [resize_image(img, self.image_size) for img in images]
        self.last = generate(self.checkpoint, frames, self.instructions, self.reasoning, self.max_rationale_tokens)
        raw = np.stack([g.action for g in self.last])
        raw_action, action = raw_action_dict(raw), env_actions(raw, self.gripper)
        if single:
            return {k: v[0] for k, v in raw_action.items()}, {k: v[0] for k, v in action.items()}
        return raw_action, action

    @property
    def rationales(self) -> list[str]:
        """What each env's policy wrote before its action at the last step."""
        return [g.rationale for g in self.last]

    def describe(self) -> dict[str, Any]:
        """The checkpoint as run.json records it."""
        info = self.info
        return {
            "path": str(self.checkpoint.path.resolve()),
            "name": self.checkpoint.path.resolve().name,
            "model_family": info.get("model_family"),
            "base_model": info.get("base_model"),
            "reasoning_trained": info.get("reasoning"),
            "reasoning_weight": info.get("training", {}).get("reasoning_weight"),
            "training": info.get("training"),
            "unnorm_key": info.get("unnorm_key"),
            "robot": self.robot,
            "image_size": list(self.image_size),
        }
