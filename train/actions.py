"""OpenVLA's action tokenizer, exactly, and the statistics it is built from.

OpenVLA normalises each action dimension with the q01/q99 bounds of the training split
(`clip(2(x - q01)/(q99 - q01) - 1, -1, 1)` where `mask` is true; dimensions whose min equals
their max carry no information and map to 0), cuts [-1, 1] into 256 uniform bins and writes
bin i as token `vocab_size - i`: the last 256 ids of the vocabulary. Decoding goes through the
bin centres. A policy trained here must produce the same ids OpenVLA would, so refine-eval and
any OpenVLA-compatible runner can un-normalise with the `dataset_statistics.json` saved next
to the checkpoint. The statistics themselves come from `refinevla.annotate.stats` — the same
function as `refine-data stats` — never from a second implementation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.episode import ACTION_DIM, Episode
from ..annotate.stats import compute_statistics
from .errors import TrainError

N_BINS = 256  # OpenVLA's bin count


def dataset_statistics(episodes: Iterable[Episode], transform: str, unnorm_key: str) -> dict[str, Any]:
    """`{unnorm_key: entry}` in OpenVLA's `dataset_statistics.json` shape, via `refine-data stats`' function."""
    return {unnorm_key: compute_statistics(episodes, transform)}


def load_statistics(path: str | Path, unnorm_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """(unnorm_key, entry) from a `dataset_statistics.json`; the key may be omitted when there is one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{p}: cannot read statistics ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise TrainError(f"{p}: not a dataset_statistics.json (expected {{unnorm_key: {{action: ...}}}})")
    if unnorm_key is None:
        if len(data) != 1:
            raise TrainError(f"{p}: holds {', '.join(sorted(data))}; say which with the dataset's unnorm key")
        unnorm_key = next(iter(data))
    entry = data.get(unnorm_key)
    if not isinstance(entry, dict) or "action" not in entry:
        raise TrainError(f"{p}: no action statistics under {unnorm_key!r} (keys: {', '.join(sorted(data))})")
    for field in ("q01", "q99", "min", "max"):
        if len(entry["action"].get(field, [])) != ACTION_DIM:
            raise TrainError(f"{p}: {unnorm_key}.action.{field} must have {ACTION_DIM} values")
    return unnorm_key, entry


@dataclass(frozen=True)
class ActionTokenizer:
    """Continuous 7-d actions <-> the last `N_BINS` token ids of a vocabulary (OpenVLA's scheme)."""

    vocab_size: int  # the tokenizer's `vocab_size` (base vocabulary, as OpenVLA uses it)
    q01: tuple[float, ...]  # lower normalisation bound per dimension
    q99: tuple[float, ...]  # upper normalisation bound per dimension
    mask: tuple[bool, ...]  # True: normalise this dimension; False: take it as is (the gripper)
    unused: tuple[bool, ...]  # min == max in the statistics: the dimension normalises to 0
    n_bins: int = N_BINS

    @classmethod
    def from_statistics(cls, entry: dict[str, Any], vocab_size: int) -> ActionTokenizer:
        """Build from one dataset entry of `dataset_statistics.json` (its `action` block)."""
        a = entry["action"]
        if vocab_size <= N_BINS:
            raise TrainError(f"the vocabulary has {vocab_size} tokens; OpenVLA's action tokens need more than {N_BINS}")
        mask = a.get("mask") or [True] * (ACTION_DIM - 1) + [False]
        unused = [float(lo) == float(hi) for lo, hi in zip(a["min"], a["max"], strict=True)]
        return cls(
            vocab_size=int(vocab_size),
            q01=tuple(float(x) for x in a["q01"]),
            q99=tuple(float(x) for x in a["q99"]),
            mask=tuple(bool(m) for m in mask),
            unused=tuple(unused),
        )

    @property
    def bins(self) -> np.ndarray:
        return np.linspace(-1.0, 1.0, self.n_bins)

    @property
    def bin_centers(self) -> np.ndarray:
        b = self.bins
        centers: np.ndarray = (b[:-1] + b[1:]) / 2.0
        return centers

    @property
    def first_id(self) -> int:
        """The smallest action token id (`vocab_size - n_bins`)."""
        return self.vocab_size - self.n_bins

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Actions (..., 7) -> [-1, 1] as OpenVLA's BOUNDS_Q99 normalisation."""
        a = np.asarray(actions, dtype=np.float64)
        lo, hi = np.asarray(self.q01), np.asarray(self.q99)
        scaled = np.clip(2.0 * (a - lo) / (hi - lo + 1e-8) - 1.0, -1.0, 1.0)
        out = np.where(np.asarray(self.mask), scaled, a)
        return np.where(np.asarray(self.unused), 0.0, out)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        n = np.asarray(normalized, dtype=np.float64)
        lo, hi = np.asarray(self.q01), np.asarray(self.q99)
        return np.where(np.asarray(self.mask), 0.5 * (n + 1.0) * (hi - lo) + lo, n)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Actions (..., 7) -> token ids (..., 7), int64."""
        n = np.clip(self.normalize(actions), -1.0, 1.0)
        ids: np.ndarray = (self.vocab_size - np.digitize(n, self.bins)).astype(np.int64)
        return ids

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (..., 7) -> actions (..., 7) through the bin centres, un-normalised."""
        idx = np.clip(self.vocab_size - np.asarray(token_ids, dtype=np.int64) - 1, 0, self.n_bins - 2)
        return self.unnormalize(self.bin_centers[idx])

    def settings(self) -> dict[str, Any]:
        """What refine-eval needs to decode this policy's action tokens (goes into refinevla_policy.json)."""
        return {
            "scheme": "openvla",
            "n_bins": self.n_bins,
            "vocab_size": self.vocab_size,
            "token_id": "vocab_size - digitize(clip(normalized, -1, 1), linspace(-1, 1, n_bins))",
            "normalization": "bounds_q99",
            "mask": list(self.mask),
        }
