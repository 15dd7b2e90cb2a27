"""Write RLDS datasets in TFDS form without TensorFlow.

Used for the embedded sample, test fixtures and conversions. Examples are serialized
by TFDS itself (`FeaturesDict.serialize_example`, images given as encoded bytes), and
framed as TFRecord with our own CRC writer, or handed to TFDS's array_record / parquet
adapters. Metadata (`features.json`, `dataset_info.json`) is written by
`tfds.folder_dataset.write_metadata`, so `tfds.builder_from_directory` — and therefore
TensorFlow users — read the result like any downloaded RLDS dataset.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import tfrecord


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """HxWx3 uint8 -> JPEG bytes (what RLDS stores)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_rlds(
    directory: str | os.PathLike[str],
    features: Any,
    episodes: Iterable[Mapping[str, Any]],
    *,
    name: str,
    version: str = "1.0.0",
    split: str = "train",
    num_shards: int = 1,
    file_format: str = "tfrecord",
    description: str = "",
    extra_splits: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
) -> str:
    """Write episodes (TFDS example dicts) as `directory/<name>/<version>/` and return that path.

    Episodes are distributed round-robin-free: contiguously, shard i holding episodes
    [i*n/num_shards, (i+1)*n/num_shards), like TFDS. Images may be encoded bytes or
    uint8 arrays (arrays are JPEG-encoded here).
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    out = os.path.join(os.fspath(directory), name, version)
    os.makedirs(out, exist_ok=True)
    image_keys = _image_paths(features)
    splits = {split: episodes, **(dict(extra_splits) if extra_splits else {})}
    split_infos = []
    for split_name, split_episodes in splits.items():
        serialized = [
            _deterministic(features.serialize_example(_encode_images(ep, image_keys))) for ep in split_episodes
        ]
        n = len(serialized)
        shards = max(1, min(num_shards, n)) if n else 1
        bounds = [round(i * n / shards) for i in range(shards + 1)]
        template = tfds.core.ShardedFileTemplate(
            data_dir=out, dataset_name=name, split=split_name, filetype_suffix=file_format
        )
        lengths = []
        for i in range(shards):
            path = template.sharded_filepath(shard_index=i, num_shards=shards)
            chunk = serialized[bounds[i] : bounds[i + 1]]
            if file_format == "tfrecord":
                with open(path, "wb") as fh:
                    tfrecord.write_records(fh, chunk)
            else:
                adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat(file_format)]
                adapter.write_examples(path, ((str(j).encode(), r) for j, r in enumerate(chunk)))
            lengths.append(len(chunk))
        split_infos.append(
            tfds.core.SplitInfo(
                name=split_name,
                shard_lengths=lengths,
                num_bytes=sum(len(r) for r in serialized),
                filename_template=template,
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=out,
        features=features,
        split_infos=split_infos,
        version=version,
        filename_template=None,  # TFDS's default '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
        check_data=False,  # TFDS's check calls as_dataset(), which needs TensorFlow
        description=description or f"{name}, written by refinevla",
    )
    return out


def _deterministic(record: bytes) -> bytes:
    """Re-serialise with protobuf's deterministic map order.

    TFDS serialises without `deterministic=True`, so the order of the Example's feature
    map (not its content) changes between runs; committed data (the sample) must be
    byte-identical when regenerated.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    return bytes(tf_example_pb2.Example.FromString(record).SerializeToString(deterministic=True))


def _image_paths(features: Any) -> list[tuple[str, ...]]:
    import tensorflow_datasets as tfds

    paths: list[tuple[str, ...]] = []

    def walk(f: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(f, tfds.features.FeaturesDict):
            for k, sub in f.items():
                walk(sub, (*prefix, k))
        elif isinstance(f, tfds.features.Dataset):
            walk(f.feature, prefix)
        elif isinstance(f, tfds.features.Image):
            paths.append(prefix)

    walk(features, ())
    return paths


def _encode_images(episode: Mapping[str, Any], image_paths: list[tuple[str, ...]]) -> Mapping[str, Any]:
    """Replace uint8 image arrays by JPEG bytes (TFDS encodes arrays only with TF)."""

    def fix(node: Any, path: tuple[str, ...]) -> Any:
        if not path:
            return encode_jpeg(node) if isinstance(node, np.ndarray) else node
        if isinstance(node, list):
            return [fix(item, path) for item in node]
        if isinstance(node, Mapping) and path[0] in node:
            return {**node, path[0]: fix(node[path[0]], path[1:])}
        return node

    out: Mapping[str, Any] = episode
    for p in image_paths:
        out = fix(out, p)
    return out
