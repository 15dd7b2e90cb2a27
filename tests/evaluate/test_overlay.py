"""The rationale panel under a frame (`refine-eval run --video-rationale`)."""

from __future__ import annotations

import numpy as np

from refinevla.evaluate.overlay import PANEL_LINES, with_rationale, wrap


def test_the_rationale_is_written_in_a_panel_below_the_frame_which_stays_untouched() -> None:
    frame = np.full((48, 320, 3), 200, np.uint8)
    out = with_rationale(frame, "SUBTASK: grasp the carrot\nMOVE: move down\nMOVE REASON: the gripper is above it")
    assert out.shape == (48 + PANEL_LINES * 14 + 8, 320, 3)
    assert (out[:48] == frame).all()  # the scene the policy saw is not covered
    blank = with_rationale(frame, "")
    assert blank.shape == out.shape and (blank[48:] == 16).all()
    assert (out[48:] != 16).any(axis=-1).sum() > 200  # the text's pixels


def test_long_rationales_are_wrapped_to_the_width_and_cut_with_an_ellipsis() -> None:
    lines = wrap("OBSERVATION: " + "word " * 400 + "\nMOVE: down", 50)
    assert len(lines) == PANEL_LINES and all(len(line) <= 50 for line in lines)
    assert lines[-1].endswith("…")
    assert wrap("SUBTASK: a\nMOVE: b", 50) == ["SUBTASK: a", "MOVE: b"]  # one line per part
