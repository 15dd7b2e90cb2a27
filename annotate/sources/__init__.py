"""Episode sources, chosen by a URI or preset name.

* `bridge`, `fractal`    presets; data from --data-dir / $TFDS_DATA_DIR / gs://
* `sample`               the embedded dataset (Bridge layout), offline
* `rlds:PATH`            any TFDS builder directory (layout detected or given by flags)
* `lerobot:PATH_OR_REPO` a LeRobot v2.1 / v3.0 dataset, local or on the Hub
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import SourceError
from .base import EpisodeSource, ReadCounters, ReadOptions, SourceOverrides

if TYPE_CHECKING:
    from .rlds import RldsMapping

__all__ = ["EpisodeSource", "ReadCounters", "ReadOptions", "SourceOverrides", "open_source"]


def open_source(
    uri: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    overrides: SourceOverrides | None = None,
) -> EpisodeSource:
    """Open a source by URI. Raises `SourceError` with a one-line, actionable message."""
    from . import presets
    from .rlds import RldsBuilder, RldsSource

    overrides = overrides or SourceOverrides()
    if uri == "sample":
        mapping = presets.bridge_mapping(presets.SAMPLE_NAME)
        return RldsSource(presets.sample_dir(), _apply(mapping, overrides), split)
    if uri in presets.PRESETS:
        preset = presets.PRESETS[uri]
        directory, name = presets.find_builder_dir(preset, data_dir)
        return RldsSource(directory, _apply(preset.mapping(name), overrides), split)
    scheme, sep, rest = uri.partition(":")
    if sep and scheme in presets.PRESETS:  # bridge:PATH / fractal:PATH
        preset = presets.PRESETS[scheme]
        directory, name = presets.find_builder_dir(preset, rest)
        return RldsSource(directory, _apply(preset.mapping(name), overrides), split)
    if sep and scheme == "rlds":
        builder = RldsBuilder(rest, split)
        flat = builder.flat_features
        if "steps/observation/base_pose_tool_reached" in flat and "steps/action/world_vector" in flat:
            mapping = replace(presets.fractal_mapping(), dataset=builder.name)
        else:
            mapping = presets.bridge_mapping(builder.name)
        return RldsSource(rest, _apply(mapping, overrides), split)
    if sep and scheme == "lerobot":
        from .lerobot import LeRobotSource

        lerobot: EpisodeSource = LeRobotSource(rest, overrides=overrides)
        return lerobot
    raise SourceError(
        f"unknown source {uri!r}: use bridge, fractal, sample, rlds:PATH (a TFDS builder directory) "
        "or lerobot:PATH_OR_REPO_ID"
    )


def _apply(mapping: RldsMapping, overrides: SourceOverrides) -> RldsMapping:
    """Apply the user's layout flags on top of a preset mapping."""

    def step_path(key: str) -> str:
        # `--camera image_1` means observation/image_1; a full path is taken as is.
        return key if "/" in key or key in ("action", "language_instruction") else f"observation/{key}"

    changes: dict[str, str | tuple[str, ...]] = {}
    if overrides.cameras:
        changes["cameras"] = tuple(step_path(c) for c in overrides.cameras)
    if overrides.instruction_key:
        changes["instruction"] = overrides.instruction_key
    if overrides.state_key:
        changes["state"] = tuple(overrides.state_key)
        changes["state_transform"] = "none"
    if overrides.action_key:
        changes["action"] = tuple(overrides.action_key)
    return replace(mapping, **changes)  # type: ignore[arg-type]
