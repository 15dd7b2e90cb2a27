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

DIGEST_SAMPLE = 1 << 20  # bytes read from each end of a weight file for the checkpoint digest


class PolicySetup:
    """How `refine-eval run` runs a refine-train checkpoint, read from its refinevla_policy.json alone (no
    weights loaded): the robot's conventions, the reasoning mode, the rationale budget and what run.json
    records. A `--backend ray` driver needs no more than this; its workers load the weights."""

    def __init__(
        self,
        checkpoint: str | Path,
        robot: str | None = None,
        reasoning: bool = True,
        max_rationale_tokens: int | None = None,
    ) -> None:
        from ..train.policy import longest_rationale_tokens, rationale_budget, read_policy_info

        self.path = Path(checkpoint)
        self.info = read_policy_info(self.path)
        chosen = robot or self.info.get("robot")
        if not isinstance(chosen, str) or chosen not in ROBOTS:
            raise EvalError(
                f"{checkpoint}: the checkpoint names no robot (transform {self.info.get('transform')!r}); "
                f"pass --robot {'|'.join(ROBOTS)}"
            )
        self.robot = chosen
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

    def describe(self) -> dict[str, Any]:
        """The checkpoint as run.json records it."""
        info = self.info
        return {
            "path": str(self.path.resolve()),
            "name": self.path.resolve().name,
            "model_family": info.get("model_family"),
            "base_model": info.get("base_model"),
            "reasoning_trained": info.get("reasoning"),
            "reasoning_weight": info.get("training", {}).get("reasoning_weight"),
            "training": info.get("training"),
            "unnorm_key": info.get("unnorm_key"),
            "robot": self.robot,
            "image_size": list(self.image_size),
        }

    def digest(self) -> str:
        """What identifies a checkpoint: its description, statistics, and each weight file's name, size
        and first and last MiB (a retrained model differs there; hashing gigabytes of weights would not
        pay for itself on every rerun)."""
        import hashlib

        from ..train.policy import POLICY_FILE, STATS_FILE

        h = hashlib.sha256()
        for name in (POLICY_FILE, STATS_FILE):
            h.update((self.path / name).read_bytes())
        for weights in sorted(self.path.glob("*.safetensors")) + sorted(self.path.glob("*.bin")):
            size = weights.stat().st_size
            h.update(f"{weights.name}:{size}".encode())
            with weights.open("rb") as fh:
                h.update(fh.read(DIGEST_SAMPLE))
                fh.seek(max(size - DIGEST_SAMPLE, 0))
                h.update(fh.read(DIGEST_SAMPLE))
        return h.hexdigest()


def torch_device(device: str | None) -> str:
    """--device as torch takes it: by default cuda where torch sees one, else cpu.

    A device torch cannot use here is one line before the checkpoint is read; torch's own error would be
    an AssertionError ("Torch not compiled with CUDA enabled") from deep inside `.to()`, after the loading.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        wanted = torch.device(device)
    except RuntimeError as exc:
        raise EvalError(f"--device {device}: not a torch device ({exc})") from None
    if wanted.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (wanted.index is not None and wanted.index >= count):
            raise EvalError(f"--device {device}: torch sees {count} CUDA device(s) on this machine")
    return device


class RefinePolicy(PolicySetup):
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
        from ..train.policy import Policy

        super().__init__(checkpoint, robot, reasoning, max_rationale_tokens)  # before minutes of loading
        self.checkpoint = Policy(checkpoint, device=torch_device(device), trust_remote_code=trust_remote_code)
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
