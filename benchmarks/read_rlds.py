"""Benchmark: refinevla's TF-free RLDS reader against TFDS's `as_dataset()` with TensorFlow.

Both read the *same* shards (a Bridge-layout dataset written by the project's writer:
4 cameras at 256x256 JPEG, 7-d state/action, 512-d language embedding, like
`bridge_orig`). Two workloads, each measured for both readers in this one run:

* ``frames``: every step's action/state plus the decoded primary camera (`image_0`),
  the other cameras not decoded — what training and export read (refinevla decodes an
  episode's frames with `FrameSequence.decode_all()`, on all cores, as TF's pipeline does);
* ``numeric``: every step's action/state, no image decoded — what `stats` reads.

TFDS is given `SkipDecoding` for the images it need not decode, and steps are
flattened with `flat_map` + `prefetch(AUTOTUNE)`, the usual fast RLDS pipeline.
Output: a table of steps/s and decoded frames/s, and the ratio ours/TF (goal >= 1.0).

Run:  pip install -e ".[tf]" && python benchmarks/read_rlds.py [--episodes 96 --steps 38]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np


def make_dataset(root: str, episodes: int, steps: int, shards: int) -> str:
    from refinevla.annotate.sources import specs
    from refinevla.annotate.sources.rlds_writer import encode_jpeg, write_rlds

    rng = np.random.default_rng(0)
    # Textured frames (smooth noise) so JPEG sizes resemble real camera images (~15 KB).
    base = [
        np.clip(
            np.kron(rng.integers(0, 255, (32, 32, 3)), np.ones((8, 8, 1))) + rng.normal(0, 12, (256, 256, 3)), 0, 255
        ).astype(np.uint8)
        for _ in range(8)
    ]
    jpegs = [encode_jpeg(b, quality=90) for b in base]

    def episode(i: int) -> dict:
        state = rng.normal(0, 0.1, (steps, 7)).astype(np.float32)
        return {
            "steps": [
                {
                    "observation": {**{f"image_{c}": jpegs[(i + t + c) % 8] for c in range(4)}, "state": state[t]},
                    "action": rng.normal(0, 0.02, 7).astype(np.float32),
                    "discount": 1.0,
                    "reward": float(t == steps - 1),
                    "is_first": t == 0,
                    "is_last": t == steps - 1,
                    "is_terminal": t == steps - 1,
                    "language_instruction": "put the spoon on the towel",
                    "language_embedding": rng.normal(size=512).astype(np.float32),
                }
                for t in range(steps)
            ],
            "episode_metadata": {
                "file_path": f"/raw/{i}.pkl",
                "episode_id": i,
                **{f"has_image_{c}": True for c in range(4)},
                "has_language": True,
            },
        }

    return write_rlds(
        root,
        specs.bridge_features(cameras=4),
        (episode(i) for i in range(episodes)),
        name="bridge_orig",
        num_shards=shards,
    )


def ours(directory: str, decode: bool, workers: int) -> tuple[int, int]:
    from refinevla.annotate.sources import ReadOptions, open_source

    src = open_source(f"rlds:{directory}")
    n_steps = n_frames = 0
    acc = 0.0
    for ep in src.iter_episodes(ReadOptions(workers=workers)):
        # decode_all decodes the episode's frames on all cores (JPEG decoding releases the GIL)
        frames = ep.frames["image_0"].decode_all() if decode else None
        for t in range(len(ep)):
            acc += float(ep.actions[t, 0]) + float(ep.states[t, 0])
            if frames is not None:
                acc += float(frames[t][0, 0, 0])
                n_frames += 1
            n_steps += 1
    return n_steps, n_frames


def tensorflow(directory: str, decode: bool) -> tuple[int, int]:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    skip = {f"image_{c}": tfds.decode.SkipDecoding() for c in range(4) if not (decode and c == 0)}
    builder = tfds.builder_from_directory(directory)
    ds = builder.as_dataset(split="train", decoders={"steps": {"observation": skip}}, shuffle_files=False)
    ds = ds.flat_map(lambda ep: ep["steps"]).prefetch(tf.data.AUTOTUNE)
    n_steps = n_frames = 0
    acc = 0.0
    for step in ds.as_numpy_iterator():
        acc += float(step["action"][0]) + float(step["observation"]["state"][0])
        if decode:
            acc += float(step["observation"]["image_0"][0, 0, 0])
            n_frames += 1
        n_steps += 1
    return n_steps, n_frames


def timed(fn: Callable[[], tuple[int, int]], repeats: int) -> tuple[float, int, int]:
    best = float("inf")
    steps = frames = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        steps, frames = fn()
        best = min(best, time.perf_counter() - t0)
    return best, steps, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=96)
    parser.add_argument("--steps", type=int, default=38)  # Bridge's mean episode length
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        d = make_dataset(tmp, args.episodes, args.steps, args.shards)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1e6
        print(
            f"dataset: {args.episodes} episodes x {args.steps} steps, 4 cameras 256x256, {args.shards} shards, "
            f"{size:.0f} MB (written in {time.perf_counter() - t0:.1f} s); {cores} cores"
        )
        timed(lambda: tensorflow(d, True), 1)  # warm-up: TF graph building, file cache
        rows = []
        for workload, decode in (("frames", True), ("numeric", False)):
            tf_t, tf_steps, tf_frames = timed(lambda decode=decode: tensorflow(d, decode), args.repeats)
            results = [("tfds.as_dataset (TF)", tf_t, tf_steps, tf_frames)]
            for workers in (0, cores or 1):
                t, s, f = timed(lambda w=workers, decode=decode: ours(d, decode, w), args.repeats)
                assert s == tf_steps, (s, tf_steps)
                results.append((f"refinevla workers={workers}", t, s, f))
            for name, t, s, f in results:
                rows.append((workload, name, s / t, f / t if f else 0.0, tf_t / t))

    print(f"\n{'workload':<9} {'reader':<24} {'steps/s':>10} {'frames/s':>10} {'vs TF':>7}")
    for workload, name, sps, fps, ratio in rows:
        print(f"{workload:<9} {name:<24} {sps:>10.0f} {fps:>10.0f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()
