"""Which frames a teacher sees, and how they are encoded.

K frames evenly spaced over the episode show its course; the steps where the gripper
closes or opens are added because that is where subtasks change and the teacher's
plan boundaries must land. Stored JPEGs that are already small enough are sent as
they are (no decode, no re-encode): at hundreds of requests per second, re-encoding
would cost more CPU than everything else the engine does.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..episode import FrameSequence


@dataclass(frozen=True)
class Keyframe:
    step: int
    jpeg: bytes
    size: tuple[int, int]  # (width, height) of the image sent


def select_keyframes(num_steps: int, event_steps: Iterable[int], k: int) -> list[int]:
    """K evenly spaced steps (first and last included) plus the gripper-event steps, sorted, unique."""
    if num_steps <= 0:
        return []
    chosen = set()
    if k == 1:
        chosen.add(0)
    elif k > 1:
        chosen.update(round(float(x)) for x in np.linspace(0, num_steps - 1, min(k, num_steps)))
    chosen.update(s for s in event_steps if 0 <= s < num_steps)
    return sorted(chosen)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a 3-component (colour) JPEG from its frame header, else None.

    Walks the marker segments up to the SOF header instead of opening the image with PIL:
    this runs for every keyframe of every request, and PIL's open costs ~10x more.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            components = data[i + 9]
            return (width, height) if components == 3 and width and height else None
        i += 2 + length
    return None


def keyframe_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size `encode_keyframe` sends a width x height frame at: as it is up to `max_side`, else PIL's
    thumbnail of it (aspect kept). The teacher's boxes are in these pixels (`refine-data view` scales them)."""
    from PIL import Image

    if max(width, height) <= max_side:
        return width, height
    img = Image.new("L", (width, height))
    img.thumbnail((max_side, max_side))
    return img.size


def encode_keyframe(frames: FrameSequence, step: int, max_side: int, quality: int = 85) -> Keyframe:
    """The step's frame as JPEG no larger than `max_side` on its longest side."""
    from PIL import Image

    stored = frames.encoded(step)
    if stored is not None:
        size = _jpeg_size(stored)
        if size is not None and max(size) <= max_side:
            return Keyframe(step, stored, size)
    img = Image.fromarray(np.asarray(frames[step], dtype=np.uint8))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Keyframe(step, buf.getvalue(), img.size)
