"""LeRobot v2.1 / v3.0 source: round trips through the project's writer, ranges, overrides,
Hub downloads limited to what a read needs, and one-line errors for bad input."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinevla.annotate.errors import SourceError
from refinevla.annotate.sources import ReadOptions, SourceOverrides, open_source
from refinevla.annotate.sources.lerobot import META_PATTERNS, LeRobotSource
from refinevla.annotate.sources.lerobot_writer import ExtraColumn

VERSIONS = ["v2.1", "v3.0"]
CODEC_TOLERANCE = 8.0  # mean abs difference (0-255) allowed for a lossy-decoded frame


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _read_all(path: Path, options: ReadOptions | None = None, **overrides) -> list:
    return list(open_source(f"lerobot:{path}", overrides=SourceOverrides(**overrides)).iter_episodes(options))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_keeps_numbers_instructions_ids_lengths_and_flags(write_lerobot_dataset, version):
    path, originals = write_lerobot_dataset(version)
    source = open_source(f"lerobot:{path}")
    assert isinstance(source, LeRobotSource)
    assert source.name == "toy_robot" and len(source) == 3 and source.version == version
    episodes = list(source.iter_episodes())
    assert [e.episode_id for e in episodes] == [f"toy_robot:episode_{i}" for i in range(3)]
    for got, want in zip(episodes, originals, strict=True):
        assert len(got) == len(want) and got.dataset == "toy_robot"
        assert got.instruction == want.instruction
        np.testing.assert_allclose(got.states, want.states, rtol=0, atol=0)
        np.testing.assert_allclose(got.actions, want.actions, rtol=0, atol=0)
        assert got.states.dtype == np.float32 and got.actions.dtype == np.float32
        np.testing.assert_array_equal(got.is_first, want.is_first)
        np.testing.assert_array_equal(got.is_last, want.is_last)
        np.testing.assert_array_equal(got.is_terminal, want.is_last)
        np.testing.assert_array_equal(got.rewards, want.rewards)
        assert got.cameras == ["image_0"]  # default: the first camera feature only
        assert got.metadata["episode_index"] == int(got.episode_id.rsplit("_", 1)[1])


@pytest.mark.parametrize("version", VERSIONS)
def test_video_frames_decode_close_to_the_originals_at_the_right_step(write_lerobot_dataset, version):
    path, originals = write_lerobot_dataset(version)
    for got, want in zip(_read_all(path), originals, strict=True):
        frames = got.frames["image_0"]
        assert len(frames) == len(want)
        assert frames.encoded(0) is None  # video-backed: decoded on demand
        truth = [want.frames["image_0"][t] for t in range(len(want))]
        for t in range(len(frames)):
            decoded = frames[t]
            assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
            distances = [_mad(decoded, ref) for ref in truth]
            assert distances[t] < CODEC_TOLERANCE
            assert int(np.argmin(distances)) == t  # no off-by-one from seeking into a shared file


@pytest.mark.parametrize("version", VERSIONS)
def test_image_stored_cameras_round_trip_losslessly_as_png_bytes(write_lerobot_dataset, version):
    path, originals = write_lerobot_dataset(version, camera_storage="image")
    info = json.loads((path / "meta/info.json").read_text())
    assert info["features"]["observation.images.image_0"]["dtype"] == "image"
    assert not (path / "videos").exists()
    for got, want in zip(_read_all(path, cameras=("image_0", "image_1")), originals, strict=True):
        assert got.cameras == ["image_0", "image_1"]
        for cam in got.cameras:
            assert got.frames[cam].encoded(0)[:4] == b"\x89PNG"
            for t in range(len(got)):
                np.testing.assert_array_equal(got.frames[cam][t], want.frames[cam][t])


def test_frames_of_an_episode_are_decoded_once_for_sequential_access(write_lerobot_dataset, monkeypatch):
    path, _ = write_lerobot_dataset("v3.0")
    episode = _read_all(path, ReadOptions(start=1, stop=2))[0]
    frames = episode.frames["image_0"]
    first = [frames[t] for t in range(len(frames))]
    import av

    monkeypatch.setattr(av, "open", lambda *a, **k: pytest.fail("frames were decoded twice"))
    again = [frames[t] for t in reversed(range(len(frames)))]
    assert all(np.array_equal(a, b) for a, b in zip(first, reversed(again), strict=True))


def test_written_layouts_follow_the_published_file_names(write_lerobot_dataset):
    v21, _ = write_lerobot_dataset("v2.1")
    assert (v21 / "data/chunk-000/episode_000002.parquet").is_file()
    assert (v21 / "videos/chunk-000/observation.images.image_1/episode_000002.mp4").is_file()
    for name in ("info.json", "episodes.jsonl", "tasks.jsonl", "episodes_stats.jsonl"):
        assert (v21 / "meta" / name).is_file()
    v30, _ = write_lerobot_dataset("v3.0")
    assert (v30 / "data/chunk-000/file-001.parquet").is_file()  # two episodes per file: 3 episodes -> 2 files
    assert (v30 / "videos/observation.images.image_0/chunk-000/file-001.mp4").is_file()
    for name in ("info.json", "stats.json", "tasks.parquet", "episodes/chunk-000/file-000.parquet"):
        assert (v30 / "meta" / name).is_file()
    info = json.loads((v30 / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 6 + 9 + 12
    assert info["features"]["observation.images.image_0"]["info"]["video.codec"] in ("av1", "h264", "mpeg4")
    table = pq.read_table(v30 / "meta/episodes/chunk-000/file-000.parquet")
    assert table["dataset_from_index"].to_pylist() == [0, 6, 15]
    assert table["videos/observation.images.image_0/from_timestamp"].to_pylist() == [0.0, 0.6, 0.0]


def test_extra_columns_pass_list_of_struct_values_through(write_lerobot_dataset, lerobot_episodes):
    episodes = lerobot_episodes(2)
    row = pa.struct(
        [
            ("role", pa.string()),
            ("content", pa.string()),
            ("style", pa.string()),
            ("timestamp", pa.float32()),
            ("camera", pa.string()),
            ("tool_calls", pa.list_(pa.string())),
        ]
    )
    plan = [
        {
            "role": "assistant",
            "content": "reach, grasp",
            "style": "plan",
            "timestamp": 0.0,
            "camera": None,
            "tool_calls": None,
        }
    ]
    persistent = ExtraColumn([[plan] * len(e) for e in episodes], pa.list_(row))
    path, _ = write_lerobot_dataset(
        "v3.0", episodes=episodes, extra_columns={"language_persistent": persistent}, episodes_per_file=None
    )
    table = pq.read_table(path / "data/chunk-000/file-000.parquet")
    assert table.schema.field("language_persistent").type == pa.list_(row)
    assert table["language_persistent"][0].as_py() == plan
    info = json.loads((path / "meta/info.json").read_text())
    assert info["features"]["language_persistent"]["dtype"] == "language"
    assert len(_read_all(path)) == 2  # readers ignore columns they do not use


# --------------------------------------------------------------------------- ranges and overrides


@pytest.mark.parametrize("version", VERSIONS)
def test_start_stop_yields_only_that_range(write_lerobot_dataset, version):
    path, originals = write_lerobot_dataset(version, n=4)
    got = _read_all(path, ReadOptions(start=1, stop=3))
    assert [e.episode_id for e in got] == ["toy_robot:episode_1", "toy_robot:episode_2"]
    np.testing.assert_array_equal(got[1].states, originals[2].states)
    assert [e.episode_id for e in _read_all(path, ReadOptions(start=3))] == ["toy_robot:episode_3"]
    assert _read_all(path, ReadOptions(start=4)) == []


def test_camera_override_accepts_the_suffix_or_the_full_feature_name(write_lerobot_dataset):
    path, originals = write_lerobot_dataset("v3.0")
    by_suffix = _read_all(path, ReadOptions(stop=1), cameras=("image_1",))[0]
    by_name = _read_all(path, ReadOptions(stop=1), cameras=("observation.images.image_1",))[0]
    for got in (by_suffix, by_name):
        assert got.cameras == ["image_1"]
        assert _mad(got.frames["image_1"][2], originals[0].frames["image_1"][2]) < CODEC_TOLERANCE


def test_instruction_key_override_reads_a_text_column(write_lerobot_dataset, lerobot_episodes):
    episodes = lerobot_episodes(2)
    said = ExtraColumn([[f"custom {i}"] * len(e) for i, e in enumerate(episodes)])
    path, _ = write_lerobot_dataset("v2.1", episodes=episodes, extra_columns={"language_instruction": said})
    got = _read_all(path, instruction_key="language_instruction")
    assert [e.instruction for e in got] == ["custom 0", "custom 1"]


def test_state_key_override_concatenates_features(write_lerobot_dataset):
    path, originals = write_lerobot_dataset("v3.0", n=1)
    got = _read_all(path, state_key=("observation.state", "next.reward"))[0]
    assert got.states.shape == (len(originals[0]), 8)
    np.testing.assert_array_equal(got.states[:, 7], originals[0].rewards)


# --------------------------------------------------------------------------- Hub


class FakeHub:
    """Stands in for `huggingface_hub.snapshot_download`: copies the files matching the patterns."""

    def __init__(self, repo: Path, cache: Path) -> None:
        self.repo, self.cache, self.calls = repo, cache, []

    def __call__(self, repo_id, *, repo_type=None, revision=None, allow_patterns=None):
        self.calls.append(
            {"repo_id": repo_id, "repo_type": repo_type, "revision": revision, "allow_patterns": list(allow_patterns)}
        )
        for file in self.repo.rglob("*"):
            rel = file.relative_to(self.repo).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (self.cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, self.cache / rel)
        return str(self.cache)

    def fetched(self) -> set[str]:
        return {f.relative_to(self.cache).as_posix() for f in self.cache.rglob("*") if f.is_file()}


@pytest.mark.parametrize("version", VERSIONS)
def test_hub_repo_downloads_metadata_then_only_the_range_and_selected_camera(
    write_lerobot_dataset, tmp_path, monkeypatch, version
):
    import huggingface_hub

    repo, originals = write_lerobot_dataset(version, episodes_per_file=1)
    hub = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)

    source = open_source("lerobot:acme/toy_robot")
    assert source.name == "acme/toy_robot" and len(source) == 3
    assert hub.calls[0]["allow_patterns"] == META_PATTERNS and hub.calls[0]["repo_type"] == "dataset"
    assert all(f.startswith("meta/") for f in hub.fetched())

    (episode,) = source.iter_episodes(ReadOptions(start=1, stop=2))
    assert episode.episode_id == "acme/toy_robot:episode_1"
    assert _mad(episode.frames["image_0"][0], originals[1].frames["image_0"][0]) < CODEC_TOLERANCE
    requested = hub.calls[1]["allow_patterns"]
    if version == "v2.1":
        assert requested == [
            "data/chunk-000/episode_000001.parquet",
            "videos/chunk-000/observation.images.image_0/episode_000001.mp4",
        ]
    else:
        assert requested == [
            "data/chunk-000/file-001.parquet",
            "videos/observation.images.image_0/chunk-000/file-001.mp4",
        ]
    assert not any("image_1" in f or "episodes_stats" in f for f in hub.fetched())

    assert len(list(source.iter_episodes())) == 3  # a full read asks with globs, still one camera
    assert hub.calls[2]["allow_patterns"][0] == "data/*"
    assert all("image_1" not in p for p in hub.calls[2]["allow_patterns"])


def test_hub_errors_become_a_source_error_naming_the_repo(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SourceError, match=r"acme/missing: cannot download .*network unreachable"):
        open_source("lerobot:acme/missing")


def test_revision_is_passed_to_the_hub(write_lerobot_dataset, tmp_path, monkeypatch):
    import huggingface_hub

    repo, _ = write_lerobot_dataset("v3.0")
    hub = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    LeRobotSource("acme/toy_robot", revision="v1.2")
    assert hub.calls[0]["revision"] == "v1.2"


# --------------------------------------------------------------------------- bad input


def test_a_folder_without_info_json_is_not_a_lerobot_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"meta/info\.json: not found"):
        open_source(f"lerobot:{tmp_path / 'empty'}")


def test_a_missing_local_path_is_named(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        open_source(f"lerobot:{tmp_path / 'nope'}")


def test_an_unsupported_codebase_version_is_named(write_lerobot_dataset):
    path, _ = write_lerobot_dataset("v3.0")
    info = json.loads((path / "meta/info.json").read_text())
    info["codebase_version"] = "v2.0"
    (path / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(SourceError, match=r"info\.json: codebase_version 'v2\.0' is not supported.*v2\.1, v3\.0"):
        open_source(f"lerobot:{path}")


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        ({"state_key": ("observation.joints",)}, "--state-key"),
        ({"action_key": ("action.joints",)}, "--action-key"),
        ({"instruction_key": "prompt"}, "--instruction-key"),
    ],
)
def test_a_missing_feature_lists_the_features_found_and_the_flag(write_lerobot_dataset, override, flag):
    path, _ = write_lerobot_dataset("v2.1")
    with pytest.raises(SourceError, match=rf"no feature .* \({flag}\)\. Features found: .*observation\.state") as err:
        open_source(f"lerobot:{path}", overrides=SourceOverrides(**override))
    assert "\n" not in str(err.value)


def test_an_unknown_camera_lists_the_camera_features(write_lerobot_dataset):
    path, _ = write_lerobot_dataset("v3.0")
    with pytest.raises(SourceError, match=r"no camera feature 'wrist' \(--camera\).*observation\.images\.image_1"):
        open_source(f"lerobot:{path}", overrides=SourceOverrides(cameras=("wrist",)))


@pytest.mark.parametrize(
    ("version", "victim"),
    [("v2.1", "data/chunk-000/episode_000001.parquet"), ("v3.0", "data/chunk-000/file-000.parquet")],
)
def test_a_missing_data_file_is_named(write_lerobot_dataset, version, victim):
    path, _ = write_lerobot_dataset(version)
    (path / victim).unlink()
    with pytest.raises(SourceError, match=rf"{victim}: missing data file for episode 1"):
        _read_all(path, ReadOptions(start=1, stop=2))


@pytest.mark.parametrize(
    ("version", "victim"),
    [
        ("v2.1", "videos/chunk-000/observation.images.image_0/episode_000002.mp4"),
        ("v3.0", "videos/observation.images.image_0/chunk-000/file-001.mp4"),
    ],
)
def test_a_missing_video_file_is_named(write_lerobot_dataset, version, victim):
    path, _ = write_lerobot_dataset(version)
    (path / victim).unlink()
    assert len(_read_all(path, ReadOptions(stop=2))) == 2  # episodes before it still read
    with pytest.raises(SourceError, match=rf"{victim}: missing video file .* episode 2"):
        _read_all(path, ReadOptions(start=2))


def _rewrite_v30_episodes(path: Path, column: str, index: int, value) -> None:
    meta = path / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(meta)
    values = table[column].to_pylist()
    values[index] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), meta)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_episode_with_zero_frames_is_named(write_lerobot_dataset, version):
    path, _ = write_lerobot_dataset(version)
    if version == "v2.1":
        lines = (path / "meta/episodes.jsonl").read_text().splitlines()
        row = json.loads(lines[1])
        row["length"] = 0
        lines[1] = json.dumps(row)
        (path / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    else:
        _rewrite_v30_episodes(path, "length", 1, 0)
    with pytest.raises(SourceError, match=r"episode 1: episode has zero frames"):
        _read_all(path)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_episode_without_a_task_is_named(write_lerobot_dataset, version):
    path, _ = write_lerobot_dataset(version, n=1)
    if version == "v2.1":
        (path / "meta/tasks.jsonl").write_text("")
        (path / "meta/episodes.jsonl").write_text(json.dumps({"episode_index": 0, "tasks": [], "length": 6}) + "\n")
    else:
        pq.write_table(
            pa.table({"task_index": pa.array([], pa.int64()), "task": pa.array([], pa.string())}),
            path / "meta/tasks.parquet",
        )
        _rewrite_v30_episodes(path, "tasks", 0, [])
    with pytest.raises(SourceError, match=r"episode 0: no task .*--instruction-key"):
        _read_all(path)


def test_episode_offsets_that_disagree_with_the_data_file_are_caught(write_lerobot_dataset):
    path, _ = write_lerobot_dataset("v3.0")
    _rewrite_v30_episodes(path, "dataset_from_index", 1, 3)  # points into episode 0's rows
    with pytest.raises(
        SourceError, match=r"file-000\.parquet episode 1: rows \[3, 12\) belong to episode\(s\) \[0, 1\]"
    ):
        _read_all(path, ReadOptions(start=1, stop=2))


def test_an_undecodable_video_is_named_when_its_frames_are_read(write_lerobot_dataset):
    path, _ = write_lerobot_dataset("v3.0")
    (path / "videos/observation.images.image_0/chunk-000/file-000.mp4").write_bytes(b"not an mp4" * 8)
    episode = _read_all(path, ReadOptions(stop=1))[0]  # opening is lazy: numbers still read
    with pytest.raises(SourceError, match=r"file-000\.mp4 episode 0: cannot decode video"):
        episode.frames["image_0"][0]
