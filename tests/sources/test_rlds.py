"""The TF-free RLDS reader: round trips through the project's writer, TFDS agreement, bad input."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest

from refinevla.annotate import episode as episode_mod
from refinevla.annotate.errors import CorruptRecordError, SourceError
from refinevla.annotate.sources import ReadOptions, SourceOverrides, open_source, specs
from refinevla.annotate.sources.rlds import _flatten_features
from refinevla.annotate.sources.rlds_writer import write_rlds
from tests.conftest import bridge_episode, fractal_episode, frame  # type: ignore[import-not-found]

# The published layouts (../shared/reference/formats.md), as data: path -> (shape, dtype).
BRIDGE_LAYOUT = {
    "episode_metadata/episode_id": ((), "int32"),
    "episode_metadata/file_path": ((), "object"),
    "episode_metadata/has_image_0": ((), "bool"),
    "episode_metadata/has_language": ((), "bool"),
    "steps/action": ((7,), "float32"),
    "steps/discount": ((), "float32"),
    "steps/reward": ((), "float32"),
    "steps/is_first": ((), "bool"),
    "steps/is_last": ((), "bool"),
    "steps/is_terminal": ((), "bool"),
    "steps/language_instruction": ((), "object"),
    "steps/language_embedding": ((512,), "float32"),
    "steps/observation/image_0": ((256, 256, 3), "uint8"),
    "steps/observation/image_3": ((256, 256, 3), "uint8"),
    "steps/observation/state": ((7,), "float32"),
}
FRACTAL_LAYOUT = {
    "steps/observation/image": ((256, 320, 3), "uint8"),
    "steps/observation/natural_language_instruction": ((), "object"),
    "steps/observation/base_pose_tool_reached": ((7,), "float32"),
    "steps/observation/gripper_closed": ((1,), "float32"),
    "steps/action/world_vector": ((3,), "float32"),
    "steps/action/rotation_delta": ((3,), "float32"),
    "steps/action/gripper_closedness_action": ((1,), "float32"),
    "steps/action/terminate_episode": ((3,), "int32"),
    "steps/is_first": ((), "bool"),
}


@pytest.mark.parametrize(
    ("features", "layout"), [(specs.bridge_features(), BRIDGE_LAYOUT), (specs.fractal_features(), FRACTAL_LAYOUT)]
)
def test_writer_specs_match_the_published_layouts(features, layout) -> None:
    flat = _flatten_features(features)
    for path, (shape, dtype) in layout.items():
        assert path in flat, path
        assert tuple(flat[path].shape) == shape, path
        assert np.dtype(flat[path].np_dtype).name == dtype, path


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record", "parquet"])
def test_round_trip_gives_back_what_was_written(write_bridge, file_format: str) -> None:
    d = write_bridge(5, shards=2, file_format=file_format)
    src = open_source(f"rlds:{d}")
    assert len(src) == 5 and src.name == "bridge_orig"
    eps = list(src.iter_episodes())
    assert len(eps) == 5
    for i, ep in enumerate(eps):
        ref = bridge_episode(i, 8 + i, 2)
        steps = ref["steps"]
        assert ep.episode_id == f"bridge_orig:/nfs/bridge/raw/scene_{i}/traj{i}.pkl#{i}"
        assert ep.instruction == f"put the spoon {i} on the towel"
        assert len(ep) == 8 + i
        np.testing.assert_array_equal(ep.actions, np.stack([s["action"] for s in steps]))
        np.testing.assert_array_equal(ep.states, np.stack([s["observation"]["state"] for s in steps]))
        assert ep.is_first.tolist() == [s["is_first"] for s in steps]
        assert ep.is_last.tolist() == [s["is_last"] for s in steps]
        assert ep.is_terminal.tolist() == [s["is_terminal"] for s in steps]
        assert ep.rewards.tolist() == [s["reward"] for s in steps]
        assert ep.metadata["file_path"] == f"/nfs/bridge/raw/scene_{i}/traj{i}.pkl"
        assert ep.cameras == ["image_0"]
        for t in (0, len(ep) - 1):
            got = ep.frames["image_0"][t].astype(int)
            assert got.shape == (64, 64, 3)
            assert np.abs(got - frame(i * 10, t)).mean() < 4  # JPEG tolerance


def test_reader_agrees_with_tfds_own_decoder_on_every_field(write_bridge) -> None:
    import tensorflow_datasets as tfds

    from refinevla.annotate.sources.rlds import iter_shard_records

    d = write_bridge(3, shards=1)
    src = open_source(f"rlds:{d}", overrides=SourceOverrides(cameras=("image_0", "image_1")))
    ours = list(src.iter_episodes())
    features = tfds.builder_from_directory(d).info.features
    task = src.builder.tasks()[0]
    for ep, (_, record) in zip(ours, iter_shard_records(task), strict=True):
        ref = features.deserialize_example_np(record)
        steps = list(ref["steps"])
        np.testing.assert_array_equal(ep.actions, np.stack([s["action"] for s in steps]))
        np.testing.assert_array_equal(ep.states, np.stack([s["observation"]["state"] for s in steps]))
        assert ep.instruction == steps[0]["language_instruction"].decode()
        for cam in ("image_0", "image_1"):
            for t, s in enumerate(steps):
                np.testing.assert_array_equal(ep.frames[cam][t], s["observation"][cam])
        assert ep.metadata["episode_id"] == int(ref["episode_metadata"]["episode_id"])


def test_frames_are_not_decoded_until_asked(write_bridge, monkeypatch) -> None:
    calls = []
    real = episode_mod.decode_image
    monkeypatch.setattr(episode_mod, "decode_image", lambda b: calls.append(1) or real(b))
    d = write_bridge(3)
    eps = list(open_source(f"rlds:{d}").iter_episodes())
    assert calls == []
    eps[1].frames["image_0"][2]
    assert len(calls) == 1


def test_episode_ranges_cross_shards_and_workers_keep_order(write_bridge) -> None:
    d = write_bridge(9, shards=3)
    src = open_source(f"rlds:{d}")
    all_ids = [e.episode_id for e in src.iter_episodes()]
    assert len(all_ids) == 9
    part = [e.episode_id for e in src.iter_episodes(ReadOptions(start=2, stop=7))]
    assert part == all_ids[2:7]
    parallel = [e.episode_id for e in src.iter_episodes(ReadOptions(start=1, stop=9, workers=2))]
    assert parallel == all_ids[1:9]


def test_fractal_preset_flattens_dict_actions_and_converts_state(fractal_dir: str) -> None:
    data_dir = str(Path(fractal_dir).parent.parent)
    src = open_source("fractal", data_dir=data_dir)
    eps = list(src.iter_episodes())
    assert [len(e) for e in eps] == [6, 7, 8]
    ep = eps[0]
    assert ep.episode_id == "fractal20220817_data:fractal20220817_data-train.tfrecord-00000-of-00002#0"
    assert ep.instruction == "pick coke can"
    assert ep.cameras == ["image"] and ep.frames["image"][0].shape == (256, 320, 3)
    assert ep.actions.shape == (6, 7) and ep.actions[3, 6] == 1.0
    # state = xyz, rpy (from the x,y,z,w quaternion), gripper open = 1 - gripper_closed
    assert ep.states.shape == (6, 7)
    np.testing.assert_allclose(ep.states[:, 5], 2 * 0.05 * np.arange(6), atol=1e-5)  # yaw of a z-rotation
    assert ep.states[0, 6] == 1.0 and ep.states[-1, 6] == 0.0
    # every episode gives back exactly what was written, field by field
    for i, got in enumerate(eps):
        steps = fractal_episode(i, 6 + i)["steps"]
        act = [
            np.concatenate([s["action"][k] for k in ("world_vector", "rotation_delta", "gripper_closedness_action")])
            for s in steps
        ]
        np.testing.assert_array_equal(got.actions, np.stack(act))
        pose = np.stack([s["observation"]["base_pose_tool_reached"] for s in steps])
        np.testing.assert_array_equal(got.states[:, :3], pose[:, :3])
        assert got.is_first.tolist() == [s["is_first"] for s in steps]
        assert got.is_last.tolist() == [s["is_last"] for s in steps]
        assert got.rewards.tolist() == [s["reward"] for s in steps]
        assert int(got.frames["image"][len(got) - 1].mean()) in range(10 * (len(got) - 1) - 3, 10 * (len(got) - 1) + 4)


def test_bridge_preset_finds_the_newest_version_under_data_dir(write_bridge, tmp_path, monkeypatch) -> None:
    root = tmp_path / "tfds"
    write_bridge(2, root=root)
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    src = open_source("bridge")
    assert src.name == "bridge_orig" and len(src) == 2


def test_missing_data_says_where_it_looked_and_how_to_download(tmp_path) -> None:
    with pytest.raises(SourceError) as err:
        open_source("bridge", data_dir=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "bridge_orig") in msg and "download" in msg
    with pytest.raises(SourceError, match="no such directory"):
        open_source(f"rlds:{tmp_path / 'nope'}")


def test_unknown_layout_lists_features_and_flags(fractal_dir: str) -> None:
    with pytest.raises(SourceError) as err:
        open_source(f"bridge:{fractal_dir}")
    msg = str(err.value)
    for needle in ("observation/image", "--camera", "--instruction-key", "--state-key", "--action-key"):
        assert needle in msg


def test_layout_flags_map_an_unknown_dataset(fractal_dir: str) -> None:
    src = open_source(
        f"rlds:{fractal_dir}",
        overrides=SourceOverrides(
            cameras=("image",),
            instruction_key="observation/natural_language_instruction",
            state_key=("observation/base_pose_tool_reached",),
            action_key=("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action"),
        ),
    )
    ep = next(iter(src.iter_episodes()))
    assert ep.states.shape == (6, 7) and ep.actions.shape == (6, 7)


def _flip_byte_in_record(shard: str, record: int) -> int:
    """Corrupt one byte inside record `record`'s payload; return that record's offset."""
    import struct

    with open(shard, "r+b") as fh:
        offset = 0
        for _ in range(record):
            (length,) = struct.unpack("<Q", fh.read(8))
            offset += 12 + length + 4
            fh.seek(offset)
        (length,) = struct.unpack("<Q", fh.read(8))
        fh.seek(offset + 12 + length // 2)
        b = fh.read(1)
        fh.seek(offset + 12 + length // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    return offset


def test_crc_mismatch_names_shard_and_offset_and_skip_corrupt_counts_it(write_bridge) -> None:
    d = write_bridge(4, shards=1)
    shard = glob.glob(os.path.join(d, "*.tfrecord-*"))[0]
    offset = _flip_byte_in_record(shard, 1)
    src = open_source(f"rlds:{d}")
    with pytest.raises(CorruptRecordError) as err:
        list(src.iter_episodes())
    assert os.path.basename(shard) in str(err.value) and f"byte offset {offset}" in str(err.value)
    ids = [e.episode_id for e in src.iter_episodes(ReadOptions(skip_corrupt=True))]
    assert len(ids) == 3 and not any(i.endswith("#1") for i in ids)  # the next records are still read
    assert len(src.counters.corrupt) == 1 and f"byte {offset}" in src.counters.corrupt[0]


def test_truncated_shard_is_an_error_naming_the_file(write_bridge) -> None:
    d = write_bridge(2, shards=1)
    shard = glob.glob(os.path.join(d, "*.tfrecord-*"))[0]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CorruptRecordError, match="truncated"):
        list(open_source(f"rlds:{d}").iter_episodes())


def test_episode_without_instruction_or_steps_is_a_clear_error(tmp_path) -> None:
    ep = bridge_episode(0, 5, 1)
    for s in ep["steps"]:
        s["language_instruction"] = ""
    d = write_rlds(tmp_path / "a", specs.bridge_features(cameras=1, image_size=(64, 64)), [ep], name="bridge_orig")
    with pytest.raises(SourceError, match=r"episode bridge_orig:/nfs/bridge/raw/scene_0/traj0.pkl#0: no language"):
        list(open_source(f"rlds:{d}").iter_episodes())
    empty = {"steps": [], "episode_metadata": ep["episode_metadata"]}
    d2 = write_rlds(tmp_path / "b", specs.bridge_features(cameras=1, image_size=(64, 64)), [empty], name="bridge_orig")
    with pytest.raises(SourceError, match="zero steps"):
        list(open_source(f"rlds:{d2}").iter_episodes())


def test_a_gs_path_without_gcsfs_is_one_clear_line(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_gcsfs(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("gcsfs"):
            raise ImportError("Please install gcsfs to access Google Storage")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    with pytest.raises(SourceError, match=r"gs://bucket/robotics: .*pip install gcsfs"):
        open_source("bridge", data_dir="gs://bucket/robotics")
    with pytest.raises(SourceError, match=r"gs://bucket/robotics/bridge_orig/1.0.0: .*gcsfs"):
        open_source("rlds:gs://bucket/robotics/bridge_orig/1.0.0")


def test_decode_all_on_threads_equals_frame_by_frame(write_bridge) -> None:
    ep = next(iter(open_source(f"rlds:{write_bridge(1)}").iter_episodes()))
    seq = ep.frames["image_0"]
    one = np.stack([seq[t] for t in range(len(seq))])
    assert one.shape == (len(ep), 64, 64, 3)
    np.testing.assert_array_equal(seq.decode_all(threads=2), one)
    np.testing.assert_array_equal(seq.decode_all(threads=1), one)
