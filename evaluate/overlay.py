"""The policy's rationale written under a frame, as Embodied-CoT shows its reasoning beside the image.

The text goes in a panel below the frame (never over the scene the policy looked at), wrapped to the
frame's width; a rationale longer than the panel is cut with an ellipsis. The panel's height is fixed
per frame size, so every frame of a video has the same size.
"""

from __future__ import annotations

import textwrap

import numpy as np

LINE_PX = 14  # the default bitmap font's line height, with spacing
CHAR_PX = 6  # its advance per character
PANEL_LINES = 12


def with_rationale(frame: np.ndarray, text: str) -> np.ndarray:
    """`frame` (H, W, 3) with a panel of PANEL_LINES text lines below it: (H + panel, W, 3)."""
    from PIL import Image, ImageDraw

    h, w = frame.shape[:2]
    panel = PANEL_LINES * LINE_PX + 8
    canvas = Image.new("RGB", (w, h + panel), (16, 16, 16))
    canvas.paste(Image.fromarray(np.asarray(frame, dtype=np.uint8)), (0, 0))
    lines = wrap(text, max(10, (w - 8) // CHAR_PX))
    ImageDraw.Draw(canvas).multiline_text((4, h + 4), "\n".join(lines), fill=(235, 235, 235), spacing=3)
    return np.asarray(canvas)


def wrap(text: str, width: int) -> list[str]:
    """The rationale's lines (one per TAG: part) wrapped to `width` characters, at most PANEL_LINES."""
    lines: list[str] = []
    for part in text.strip().splitlines() or [""]:
        lines.extend(textwrap.wrap(part, width) or [""])
    if len(lines) > PANEL_LINES:
        lines = [*lines[: PANEL_LINES - 1], lines[PANEL_LINES - 1][: max(0, width - 1)] + "…"]
    return lines
