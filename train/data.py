"""Samples from the training table: split by episode, shuffled by index, decoded in workers.

`StepSamples` maps the table and decodes + resizes one frame per item; `Collator` (also run in
the DataLoader workers) applies reasoning dropout, tokenises targets and actions, calls the
model's processor and pads. `epoch_order` is the whole data order: a permutation seeded by
(seed, epoch), dealt round-robin to the ranks from a global position — so each rank sees
different samples, and a resumed run, given (epoch, position), starts on exactly the next sample
without replaying or skipping any, whatever its process count (the round-robin deal makes rank
r's micro-batch b the global positions b*B*W + r + k*W, so consumed samples are always a prefix).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .actions import ActionTokenizer
from .adapters import ModelAdapter
from .errors import TrainError
from .policy import resize_frame
from .table import TrainingTable
from .targets import ACTION, IGNORE_INDEX, PROMPT, drop_parts, loads_parts, target_ids


def split_episodes(episode_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train, validation) episode ids: a seeded shuffle of the sorted ids; whole episodes only."""
    ids = sorted(set(episode_ids))
    if not 0.0 <= val_fraction < 1.0:
        raise TrainError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in perm[:n_val]}
    return set(ids) - val, val


def epoch_order(
    indices: Sequence[int], seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0
) -> np.ndarray:
    """This rank's sample order for an epoch from global position `start`; every rank gets the same
    count (the tail is dropped)."""
    perm = np.asarray(indices)[np.random.default_rng([seed, epoch]).permutation(len(indices))][start:]
    per_rank = len(perm) // world
    return perm[rank : per_rank * world : world]


def decode_resize(data: bytes, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:  # resized as the policy contract says
        return resize_frame(opened.convert("RGB"), size)


# A run whose frames, decoded and resized, fit in this many bytes decodes each of them once per process: every
# epoch of a few demonstrations otherwise decodes and resizes the same JPEGs again, a quarter of a tiny model's
# step on the CPU (the closed loop: 4000 steps over 70 frames). A larger set is decoded per item as it streams:
# with a shuffled order over more frames than fit, a cache would hit almost never.
FRAME_CACHE_BYTES = 512 << 20


class FrameCache:
    """Decoded, resized frames by table row, kept across epochs (each epoch has a new DataLoader and dataset).

    Per process: with DataLoader workers (new processes each epoch) every epoch decodes again, in parallel;
    without (the tiny CPU runs), the training process decodes each frame once. The frames are read-only, so a
    transform that wrote into one would fail instead of changing the next epoch's sample."""

    def __init__(self, rows: int, image_size: tuple[int, int]) -> None:
        self.image_size = image_size
        fits = rows * image_size[0] * image_size[1] * 3 <= FRAME_CACHE_BYTES
        self.frames: dict[int, np.ndarray] | None = {} if fits else None

    def get(self, index: int, data: bytes) -> np.ndarray:
        if self.frames is None:
            return decode_resize(data, self.image_size)
        image = self.frames.get(index)
        if image is None:
            image = decode_resize(data, self.image_size)
            image.setflags(write=False)
            self.frames[index] = image
        return image


class StepSamples(torch.utils.data.Dataset[dict[str, Any]]):
    """Table rows by position in `indices`, frames decoded and resized (in the worker that asks), through
    `frames` (the run's, shared by its epochs; by default one for these rows alone)."""

    def __init__(
        self,
        table: TrainingTable,
        indices: Sequence[int],
        image_size: tuple[int, int],
        frames: FrameCache | None = None,
    ) -> None:
        self.table = table
        self.indices = list(indices)
        self.image_size = image_size
        self.frames = frames if frames is not None else FrameCache(len(set(self.indices)), image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = int(self.indices[k])
        row = self.table.row(index)
        return {
            "index": index,
            "episode_id": row["episode_id"],
            "step": row["step"],
            "prompt": row["prompt"],
            "parts": loads_parts(row["parts"]),
            "action": np.asarray(row["action"], np.float32),
            "image": self.frames.get(index, row["frame"]),
        }


@dataclass
class Collator:
    """Samples -> model inputs, labels and token kinds (prompt masked out), right-padded."""

    adapter: ModelAdapter
    processor: Any
    actions: ActionTokenizer
    reasoning: bool = True  # False: the target is only ACTION: + action tokens (λ = 0 baseline)
    dropout: float = 0.0  # reasoning dropout probability per part
    seed: int = 0
    epoch: int = 0

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.adapter.tokenizer(self.processor)
        prompt_ids, image_inputs = self.adapter.encode_prompts(
            self.processor, [s["prompt"] for s in samples], [s["image"] for s in samples]
        )
        seqs, kinds, prompt_lens, action_pos = [], [], [], []
        act = np.stack([s["action"] for s in samples])
        act_ids = self.actions.encode(act)
        for s, p_ids, a_ids in zip(samples, prompt_ids, act_ids, strict=True):
            parts = s["parts"] if self.reasoning else []
            if self.reasoning and self.dropout > 0:
                parts = drop_parts(parts, self.dropout, random.Random(f"{self.seed}:{self.epoch}:{s['index']}"))
            t_ids, t_kinds = target_ids(tok, parts, a_ids.tolist())
            seqs.append(list(p_ids) + t_ids)
            kinds.append([PROMPT] * len(p_ids) + t_kinds)
            prompt_lens.append(len(p_ids))
            end = len(seqs[-1]) - (1 if tok.eos_token_id is not None else 0)
            action_pos.append(list(range(end - act_ids.shape[1], end)))
        n = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long)
        kind_t = torch.full((len(seqs), n), PROMPT, dtype=torch.long)
        for i, (ids, k) in enumerate(zip(seqs, kinds, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            kind_t[i, : len(ids)] = torch.tensor(k)
            target = torch.tensor(ids)
            labels[i, : len(ids)] = torch.where(torch.tensor(k) == PROMPT, IGNORE_INDEX, target)
        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention,
            **image_inputs,
            **self.adapter.text_inputs(prompt_lens, n),
        }
        return {
            "model_inputs": model_inputs,
            "labels": labels,
            "kinds": kind_t,
            "action_positions": torch.tensor(action_pos, dtype=torch.long),
            "action_ids": torch.from_numpy(act_ids),
            "actions": torch.from_numpy(act),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }


__all__ = ["ACTION", "Collator", "FrameCache", "StepSamples", "decode_resize", "epoch_order", "split_episodes"]


def to_device(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
