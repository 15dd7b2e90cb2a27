"""The simulator's truth file: written and read back, and every malformed field is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinevla.schemas.truth import (
    TRUTH_FILE,
    EpisodeTruth,
    Leg,
    TruthError,
    TruthObject,
    read_truth,
    scale_box,
    write_truth,
)


def carrot(episode_id: str = "simpler_widowx:simpler/PutCarrotOnPlateInScene-v1/episode_0/seed_0") -> EpisodeTruth:
    phases = [("approach", 0, 4), ("descend", 5, 7), ("grasp", 8, 9), ("lift", 10, 12), ("transport", 13, 19)]
    phases += [("place", 20, 21), ("release", 22, 23), ("retreat", 24, 26), ("hold", 27, 29)]
    return EpisodeTruth(
        episode_id=episode_id,
        file_path="simpler/PutCarrotOnPlateInScene-v1/episode_0/seed_0",
        task="carrot_on_plate",
        instruction="put carrot on plate",
        num_steps=30,
        legs=tuple(Leg(*p) for p in phases),
        grasp_step=9,
        release_step=23,
        image_size=(256, 256),
        objects=(TruthObject("carrot", "source", (10.0, 20.0, 50.5, 40.0)), TruthObject("plate", "target", None)),
        scene_objects=("carrot", "plate"),
    )


def test_a_truth_file_reads_back_what_was_written(tmp_path: Path) -> None:
    a, b = carrot(), carrot("simpler_widowx:other")
    write_truth(tmp_path, [a, b])
    got = read_truth(tmp_path)
    assert got == {a.episode_id: a, b.episode_id: b}
    assert a.boundaries() == [5, 8, 10, 13, 20, 22, 24, 27]


def test_a_folder_without_truth_reads_as_none(tmp_path: Path) -> None:
    assert read_truth(tmp_path) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(legs=e["legs"][1:]), "does not continue at step 0"),
        (lambda e: e["legs"][0].update(phase="wiggle"), "unknown phase 'wiggle'"),
        (lambda e: e.update(grasp_step=30), "grasp_step 30 is outside the episode's 30 steps"),
        (lambda e: e["objects"][0].update(box=[5, 5, 5, 9]), "objects/0/box: [5, 5, 5, 9] is empty or inverted"),
        (lambda e: e.pop("task"), "missing field 'task'"),
        (lambda e: e.update(num_steps="30"), "num_steps: '30' is not an integer"),
    ],
)
def test_a_malformed_truth_is_one_line_naming_the_field(tmp_path: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    write_truth(tmp_path, [carrot()])
    body = json.loads((tmp_path / TRUTH_FILE).read_text())
    change(body["episodes"][0])
    (tmp_path / TRUTH_FILE).write_text(json.dumps(body))
    with pytest.raises(TruthError) as caught:
        read_truth(tmp_path)
    text = str(caught.value)
    assert message in text and str(tmp_path / TRUTH_FILE) in text and "\n" not in text


def test_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / TRUTH_FILE).write_text(json.dumps({"format": "refinevla-truth/9", "episodes": []}))
    with pytest.raises(TruthError, match="format 'refinevla-truth/9'"):
        read_truth(tmp_path)


def test_boxes_follow_the_keyframe_resize() -> None:
    assert scale_box((64.0, 32.0, 128.0, 96.0), (256, 256), (128, 128)) == (32.0, 16.0, 64.0, 48.0)
