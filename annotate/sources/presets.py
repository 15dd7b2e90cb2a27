"""Named datasets and their exact feature mappings (`bridge`, `fractal`, `sample`).

A preset fixes *what the features mean*; where the data lives is the user's choice
(`--data-dir`, `TFDS_DATA_DIR`, or a `gs://` URL through TFDS's path layer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from ..errors import SourceError
from .remote import remote_errors
from .rlds import RldsMapping

BRIDGE_EPISODE_KEYS = ("episode_metadata/file_path", "episode_metadata/episode_id")


def bridge_mapping(dataset: str = "bridge_orig", camera: str = "image_0") -> RldsMapping:
    """BridgeData V2: `image_0` primary camera, 7-d state and action, per-step instruction."""
    return RldsMapping(
        dataset=dataset,
        cameras=(f"observation/{camera}",),
        instruction="language_instruction",
        state=("observation/state",),
        action=("action",),
        episode_keys=BRIDGE_EPISODE_KEYS,
    )


def fractal_mapping() -> RldsMapping:
    """Fractal / RT-1: dict action flattened OpenVLA-style; state = xyz, rpy, gripper-open.

    `base_pose_tool_reached` is position + quaternion (x, y, z, w); we convert the
    quaternion to roll/pitch/yaw and append `1 - gripper_closed` so every source's state
    reads `[x, y, z, roll, pitch, yaw, gripper (1 = open)]` for the motion primitives.
    """
    return RldsMapping(
        dataset="fractal20220817_data",
        cameras=("observation/image",),
        instruction="observation/natural_language_instruction",
        state=("observation/base_pose_tool_reached", "observation/gripper_closed"),
        action=("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action"),
        episode_keys=(),  # Fractal has no episode metadata: ids are "<shard>#<record>"
        state_transform="pos_quat_closed",
    )


@dataclass(frozen=True)
class Preset:
    """A dataset known by name: its TFDS builder names (first found wins) and mapping."""

    name: str
    builder_names: tuple[str, ...]
    download_hint: str

    def mapping(self, builder_name: str) -> RldsMapping:
        if self.name == "fractal":
            return fractal_mapping()
        return bridge_mapping(builder_name)


PRESETS: dict[str, Preset] = {
    "bridge": Preset(
        "bridge",
        ("bridge_orig", "bridge_dataset"),
        "download BridgeData V2 in RLDS form, e.g. `wget -r -nH --cut-dirs=4 --reject='index.html*' "
        "https://rail.eecs.berkeley.edu/datasets/bridge_release/data/tfds/bridge_dataset/` into DATA_DIR "
        "(OpenVLA renames it bridge_orig), or pass --data-dir gs://BUCKET/PATH",
    ),
    "fractal": Preset(
        "fractal",
        ("fractal20220817_data",),
        "download with `gsutil -m cp -r gs://gresearch/robotics/fractal20220817_data/0.1.0 "
        "DATA_DIR/fractal20220817_data/`, or pass --data-dir gs://gresearch/robotics",
    ),
}

SAMPLE_NAME = "refinevla_sample"


def default_data_dirs(data_dir: str | None) -> list[str]:
    """Where to look, in order: --data-dir, $TFDS_DATA_DIR, ~/tensorflow_datasets."""
    if data_dir:
        return [data_dir]
    dirs = []
    if os.environ.get("TFDS_DATA_DIR"):
        dirs.append(os.environ["TFDS_DATA_DIR"])
    dirs.append(os.path.expanduser("~/tensorflow_datasets"))
    return dirs


def find_builder_dir(preset: Preset, data_dir: str | None) -> tuple[str, str]:
    """Return (builder directory `<data_dir>/<name>/<version>`, builder name) for a preset.

    A data dir may also point straight at `<name>` or `<name>/<version>`.
    """

    looked: list[str] = []
    with remote_errors(data_dir or ""):
        return _find(preset, data_dir, looked)


def _find(preset: Preset, data_dir: str | None, looked: list[str]) -> tuple[str, str]:
    from etils import epath

    for base in default_data_dirs(data_dir):
        root = epath.Path(base)
        candidates = [root / n for n in preset.builder_names] + [root]
        for cand in candidates:
            looked.append(os.fspath(cand))
            if (cand / "features.json").exists() and (cand / "dataset_info.json").exists():
                name = cand.parent.name if cand.parent.name in preset.builder_names else preset.builder_names[0]
                return os.fspath(cand), name
            if not cand.exists() or not cand.is_dir():
                continue
            versions = sorted(
                (p for p in cand.iterdir() if (p / "dataset_info.json").exists()),
                key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
            )
            if versions:
                name = cand.name if cand.name in preset.builder_names else preset.builder_names[0]
                return os.fspath(versions[-1]), name
    raise SourceError(
        f"no {' or '.join(preset.builder_names)} dataset found (looked in: {', '.join(looked)}). "
        f"Set --data-dir or TFDS_DATA_DIR; {preset.download_hint}."
    )


def sample_dir() -> str:
    """The embedded sample's TFDS builder directory (package data; works offline)."""
    root = resources.files("refinevla.annotate.sources") / "sample" / SAMPLE_NAME
    path = str(root)
    versions = (
        sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))) if os.path.isdir(path) else []
    )
    if not versions:
        raise SourceError(f"{path}: the embedded sample is missing from this installation (reinstall refinevla)")
    return os.path.join(path, versions[-1])
