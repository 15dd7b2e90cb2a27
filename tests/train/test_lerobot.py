"""Training on a LeRobot v3.0 dataset whose cameras are stored as video (frames decoded once, into the table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from refinevla.annotate.sources.lerobot_writer import write_lerobot
from refinevla.train.config import TrainConfig
from refinevla.train.data import decode_resize
from refinevla.train.table import build_table, open_published
from refinevla.train.trainer import train
from tests.sources.conftest import LEROBOT_FPS, lerobot_episode, lerobot_frame


@pytest.fixture(scope="module")
def lerobot_published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

    root = tmp_path_factory.mktemp("lerobot")
    eps = [lerobot_episode(i, 8 + i) for i in range(3)]
    src = write_lerobot(root / "toy", eps, version="v3.0", fps=LEROBOT_FPS, camera_storage="video", episodes_per_file=2)
    out = root / "out"
    code = run_annotate(AnnotateArgs(source=f"lerobot:{src}", out=out, progress="none", license="apache-2.0"))
    assert code == 0
    return out


def test_lerobot_video_dataset_trains_and_frames_match_the_source(lerobot_published, paligemma_dir, tmp_path):
    cache = tmp_path / "cache"
    table = build_table(open_published(str(lerobot_published)), camera="image_1", cache_dir=cache)
    assert table.meta["transform"] == "none" and len(table) == 8 + 9 + 10
    row = table.row(9)  # episode 1, step 1 (no step is dropped without the bridge transform)
    assert row["step"] == 1
    frame = decode_resize(row["frame"], (64, 64)).astype(int)
    seed = 1 * 10 + 1  # episode 1, second camera
    original = lerobot_frame(seed, 1).astype(int)
    assert np.abs(frame - original).mean() < 8  # lossy video + JPEG, yet the right frame
    assert np.abs(frame - lerobot_frame(seed, 2).astype(int)).mean() > 2 * np.abs(frame - original).mean()

    out = tmp_path / "ckpt"
    result = train(
        TrainConfig(
            dataset=str(lerobot_published),
            model=str(paligemma_dir),
            output=out,
            cache_dir=cache,
            camera="image_1",
            max_steps=2,
            batch_size=2,
            num_workers=1,
            val_fraction=0.34,
            learning_rate=1e-3,
        )
    )
    assert result.global_step == 2 and np.isfinite(result.losses).all()
    policy = json.loads((out / "refinevla_policy.json").read_text())
    assert policy["camera"] == "image_1" and policy["transform"] == "none" and policy["robot"] is None
    assert "action_token_accuracy" in result.metrics


def test_the_table_defaults_to_the_camera_annotate_read(tmp_path: Path) -> None:
    """annotate --camera image_1 (the teacher saw the second camera): refine-train learns from those frames
    without being told again (refinevla.json's source.layout), and --camera still overrides."""
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

    eps = [lerobot_episode(i, 6) for i in range(2)]
    src = write_lerobot(tmp_path / "toy", eps, version="v3.0", fps=LEROBOT_FPS, camera_storage="image")
    out = tmp_path / "out"
    args = AnnotateArgs(source=f"lerobot:{src}", out=out, progress="none", license="apache-2.0", camera=["image_1"])
    assert run_annotate(args) == 0
    ds = open_published(str(out))
    assert ds.manifest["source"]["layout"]["cameras"] == ["observation.images.image_1"]
    table = build_table(ds, cache_dir=tmp_path / "cache")
    assert table.meta["camera"] == "image_1"
    frame = decode_resize(table.row(7)["frame"], (64, 64)).astype(int)  # episode 1, step 1
    seed = 1 * 10 + 1  # episode 1, second camera
    assert np.abs(frame - lerobot_frame(seed, 1).astype(int)).mean() < 8
    first = build_table(open_published(str(out)), camera="image_0", cache_dir=tmp_path / "cache")
    assert first.meta["camera"] == "image_0"
    assert np.abs(decode_resize(first.row(7)["frame"], (64, 64)).astype(int) - frame).mean() > 8
