"""The audit's arithmetic: pure functions of steps, boxes and texts, each small enough to check by hand.

Conventions (the rationale schema's and `schemas.truth`'s):
- a step matches another within tolerance K when |a - b| <= K (so ±K counts, ±(K+1) does not);
- a box is [x_min, y_min, x_max, y_max] with continuous edges: its area is (x_max - x_min) * (y_max - y_min);
- an empty denominator gives None ("not measurable here"), never 0 or 1: an episode without gripper
  events has no event recall, and it must not pull a mean either way.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Box = Sequence[float]

_NOT_LETTER = re.compile(r"[^a-z\s]+")
_SPACE = re.compile(r"\s+")


def box_area(box: Box) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when disjoint or when both are empty)."""
    w = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    h = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    inter = max(0.0, w) * max(0.0, h)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def area_fraction(box: Box, size: tuple[int, int]) -> float:
    """The part of a (width, height) image a box covers, the box clipped to the image."""
    w, h = size
    clipped = (
        max(0.0, float(box[0])),
        max(0.0, float(box[1])),
        min(float(w), float(box[2])),
        min(float(h), float(box[3])),
    )
    return box_area(clipped) / (w * h) if w * h > 0 else 0.0


def teacher_boundaries(task_plan: Iterable[Mapping[str, Any]]) -> list[int]:
    """The steps where the teacher's plan changes subtask: the start_step of every subtask after the
    first (in the plan's order), sorted and deduplicated."""
    starts = [int(s["start_step"]) for s in task_plan]
    return sorted(set(starts[1:]))


def segment_changes(segment_starts: Iterable[int]) -> list[int]:
    """The steps where a new motion segment starts (the first segment's start, step 0, excluded)."""
    return sorted({s for s in segment_starts if s > 0})


def nearest_distance(step: int, targets: Sequence[int]) -> int | None:
    """|step - the nearest target| (targets sorted); None when there are no targets."""
    if not targets:
        return None
    i = bisect_left(targets, step)
    near = [abs(targets[k] - step) for k in (i - 1, i) if 0 <= k < len(targets)]
    return min(near)


def count_within(points: Iterable[int], targets: Sequence[int], tolerance: int) -> int:
    """How many points have a target within ±tolerance steps (targets sorted)."""
    return sum(1 for p in points if (d := nearest_distance(p, targets)) is not None and d <= tolerance)


def ratio(numerator: int | float, denominator: int | float) -> float | None:
    """numerator / denominator; None when the denominator is 0 (nothing to measure)."""
    return numerator / denominator if denominator else None


def normalise_text(text: str) -> str:
    """Lowercase, digits and punctuation dropped, whitespace collapsed: texts that differ only in
    numbers ("spoon 3" / "spoon 4", "step 12" / "step 14") or punctuation become equal."""
    return _SPACE.sub(" ", _NOT_LETTER.sub(" ", text.lower())).strip()


def template_text(text: str, instruction: str) -> str:
    """`normalise_text` with the instruction's own words removed as well: one template filled in with
    each episode's instruction ("The robot must put the carrot on the plate." / "... the spoon on the
    towel.") becomes one text."""
    own = set(normalise_text(instruction).split())
    return " ".join(w for w in normalise_text(text).split() if w not in own)


def shared(keys: Sequence[str]) -> list[bool]:
    """For each key, whether another position holds the same key (empty keys are never shared). O(n)."""
    counts = Counter(k for k in keys if k)
    return [bool(k) and counts[k] > 1 for k in keys]


def combined_score(penalties: Iterable[float | None]) -> float:
    """The rank's badness of an episode: the mean of its measurable penalties (each in [0, 1], 1 = worst);
    0 when nothing was measurable."""
    known = [min(1.0, max(0.0, p)) for p in penalties if p is not None]
    return sum(known) / len(known) if known else 0.0


def histogram(
    values: Iterable[float], bins: int = 10, lo: float | None = None, hi: float | None = None
) -> list[tuple[float, float, int]]:
    """(left edge, right edge, count) of `bins` equal bins over [lo, hi] (default: the values' range);
    the last bin includes its right edge. Empty when there are no values."""
    vals = [float(v) for v in values]
    if not vals:
        return []
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        k = min(bins - 1, max(0, int((v - lo) / width)))
        counts[k] += 1
    return [(lo + k * width, lo + (k + 1) * width, counts[k]) for k in range(bins)]
