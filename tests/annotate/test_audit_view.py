"""`refine-data view OUT --episodes worst:N`: the audit's worst episodes, the truth's boxes beside the teacher's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rerun", reason="rerun: needs the [viz] extra")

from tests.annotate.audit_fixtures import SHIFT, SPOON_SIDE, SPOON_TOP, STEPS, hand_made_truth, teacher_answer
from tests.annotate.conftest import Recorded, start_annotate
from tests.annotate.test_view import one_line_error, read_rrd, view

BAD_SEED = 1  # the one episode the teacher gets wrong


def one_bad_episode(rec: Recorded) -> dict[str, Any]:
    """Boundaries on the gripper events and boxes on the objects, but for BAD_SEED: 8 steps early, whole-image boxes."""
    bad = rec.seed == BAD_SEED
    return teacher_answer(rec, -SHIFT if bad else 0, full_boxes=bad)


def test_worst_n_logs_only_the_audits_worst_with_the_truth_boxes_beside_the_teachers(
    tiny_rlds: Any, teacher_server: Any, tmp_path: Path
) -> None:
    uri = tiny_rlds(3, steps=STEPS)
    teacher_server.answer = one_bad_episode
    out = tmp_path / "out"
    proc = start_annotate(uri, teacher_server.url, out)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    hand_made_truth(Path(uri.removeprefix("rlds:")), out)  # the source is now a demos folder with its truth

    r = view(out, tmp_path / "v.rrd", "--episodes", "worst:1")
    assert r.returncode == 0, r.stderr
    assert "logged 1 episode(s)" in r.stdout
    rec = read_rrd(tmp_path / "v.rrd")
    assert {k.split("/")[2] for k in rec if k.startswith("/episodes/")} == {str(BAD_SEED)}
    (info,) = rec[f"/episodes/{BAD_SEED}/info"]
    assert "audit rank 1 of 3" in info["TextDocument:text"]
    (teacher,) = [r for r in rec[f"/episodes/{BAD_SEED}/camera/image_0/objects"] if r.get("Boxes2D:centers")]
    assert teacher["Boxes2D:labels"] == ["spoons", "cloth", "banana"]
    np.testing.assert_allclose(teacher["Boxes2D:half_sizes"], [[32.0, 32.0]] * 3)  # the whole 64-px frame
    (truth,) = [r for r in rec[f"/episodes/{BAD_SEED}/camera/image_0/truth"] if r.get("Boxes2D:centers")]
    assert truth["step"] == 0 and truth["Boxes2D:labels"] == ["spoon (truth)", "towel (truth)"]
    x = BAD_SEED % 48
    np.testing.assert_allclose(truth["Boxes2D:centers"][0], [x + SPOON_SIDE / 2, SPOON_TOP + SPOON_SIDE / 2])

    # the next worst are the others, and worst:N past the end shows them all
    r = view(out, tmp_path / "all.rrd", "--episodes", "worst:9")
    assert r.returncode == 0 and "logged 3 episode(s)" in r.stdout, r.stderr
    assert "worst:N with N >= 1" in one_line_error(view(out, tmp_path / "x.rrd", "--episodes", "worst:zero"))
