"""refine-train's data pipeline against a training step, and its memory against dataset size.

Two questions, printed as a table:

1. Is the loader ever the bottleneck? Samples/s of the pipeline alone (table row -> JPEG decode
   -> resize -> rationale + action tokenisation -> processor -> padded batch, in 2 DataLoader
   workers) against samples/s of a training step of the tiny PaliGemma (forward, backward,
   AdamW) on the same batches. Goal: pipeline >= 3x the step rate.
2. Is memory flat in dataset size? Peak RSS of a fresh process that streams a fixed number of
   shuffled samples through the pipeline (workers included), over datasets of 100 and 1,000
   episodes. Goal: within 10% of each other (the table is memory-mapped; nothing is buffered).

Datasets are written by the project's writers (Bridge-layout RLDS, 64x64 frames, annotated by
`refine-data annotate --teacher rule-based`); the model is built from a config (nothing is
downloaded).

    python benchmarks/train_throughput.py                      # 100 and 1000 episodes, 1024 samples
    python benchmarks/train_throughput.py --episodes 100 300 --samples 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build(work: Path, episodes: int) -> Path:
    """RLDS source -> annotated OUT/ -> training table (cached under work/cache)."""
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate
    from refinevla.annotate.sources import specs
    from refinevla.annotate.sources.rlds_writer import write_rlds
    from refinevla.annotate.sources.specs import tiny_bridge_episode as tiny_episode
    from refinevla.train.table import build_table, open_published

    out = work / f"out-{episodes}"
    if not (out / "refinevla.json").is_file():
        eps = (tiny_episode(i, 12 + i % 5, size=64) for i in range(episodes))
        d = write_rlds(
            work / f"src-{episodes}",
            specs.bridge_features(cameras=1, image_size=(64, 64)),
            eps,
            name="bridge_orig",
            num_shards=4,
        )
        if run_annotate(AnnotateArgs(source=f"rlds:{d}", out=out, progress="none", license="apache-2.0")) != 0:
            sys.exit(f"refine-data annotate rlds:{d} failed")
    build_table(open_published(str(out)), cache_dir=work / "cache")
    return out


def model_dir(work: Path) -> Path:
    from refinevla.train.tiny import build_paligemma

    path = work / "paligemma"
    if not (path / "config.json").is_file():
        build_paligemma(path)
    return path


def peak_rss_mb() -> tuple[float, float]:
    """(this process, largest child) peak RSS in MB."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def bench_config(work: Path, episodes: int, batch: int, workers: int) -> Any:
    """The one training configuration both measurements use (only the worker count differs)."""
    from refinevla.train.config import TrainConfig

    return TrainConfig(
        dataset=str(work / f"out-{episodes}"),
        model=str(model_dir(work)),
        output=work / "x",
        cache_dir=work / "cache",
        batch_size=batch,
        num_workers=workers,
        val_fraction=0.0,
    )


def pipeline(work: Path, episodes: int, samples: int, batch: int, workers: int) -> dict[str, float]:
    """Stream `samples` shuffled samples through the loader; rate and peak RSS (fresh process)."""
    import numpy as np

    from refinevla.train.data import epoch_order
    from refinevla.train.preparation import make_loader, prepare

    cfg = bench_config(work, episodes, batch, workers)
    p = prepare(cfg)
    order = epoch_order(p.train_indices, 0, 0)
    reps = -(-samples // len(order))
    order = np.concatenate([order] * reps)[:samples]
    loader = make_loader(p, order, cfg, epoch=0, train=True)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), batch
    for b in it:
        n += len(b["index"])
    elapsed = time.perf_counter() - start
    own, child = peak_rss_mb()
    return {"rows": len(p.table), "samples_per_s": (n - batch) / elapsed, "rss_main_mb": own, "rss_worker_mb": child}


def train_steps(work: Path, episodes: int, steps: int, batch: int) -> float:
    """Samples/s of forward + backward + AdamW on pre-built batches (the loader not counted)."""
    import torch

    from refinevla.train.loss import joint_loss
    from refinevla.train.preparation import make_loader, prepare

    cfg = bench_config(work, episodes, batch, 0)
    p = prepare(cfg)
    loader = iter(make_loader(p, p.train_indices, cfg, epoch=0, train=True))
    batches = [next(loader) for _ in range(steps + 1)]
    model = p.adapter.load_model(cfg.model, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b: dict) -> None:
        out = model(**b["model_inputs"])
        joint_loss(out.logits, b["labels"], b["kinds"], 1.0).loss.backward()
        opt.step()
        opt.zero_grad()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--samples", type=int, default=1024, help="samples streamed per memory measurement")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="training steps timed")
    ap.add_argument("--work", type=Path, default=None, help="keep datasets here (default: a temp dir)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:  # a fresh process per measurement: its peak RSS is its own
        mode, episodes = args._child[0], int(args._child[1])
        if mode == "pipeline":
            result = pipeline(args.work, episodes, args.samples, args.batch_size, args.workers)
        else:
            result = {"samples_per_s": train_steps(args.work, episodes, args.steps, args.batch_size)}
        print(json.dumps(result))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="refinevla-train-bench-"))
    t0 = time.perf_counter()
    for n in args.episodes:
        build(work, n)
    model_dir(work)
    print(f"datasets built in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)

    def child(mode: str, n: int) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--work",
            str(work),
            "--samples",
            str(args.samples),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--steps",
            str(args.steps),
            "--_child",
            mode,
            str(n),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = {n: child("pipeline", n) for n in args.episodes}
    step_rate = child("train", args.episodes[0])["samples_per_s"]
    first = rows[args.episodes[0]]
    print(f"\n{'measure':44} {'value':>12}")
    print(f"{'training step, tiny PaliGemma (samples/s)':44} {step_rate:12.1f}")
    print(f"{f'pipeline alone, {args.workers} workers (samples/s)':44} {first['samples_per_s']:12.1f}")
    ratio = first["samples_per_s"] / step_rate
    print(f"{'pipeline / step':44} {ratio:11.1f}x  (goal >= 3x)")
    for n, r in rows.items():
        label = f"peak RSS, {n} episodes / {r['rows']} rows (MB)"
        print(f"{label:44} {r['rss_main_mb']:8.0f} main {r['rss_worker_mb']:6.0f} worker")
    if len(rows) > 1:
        a, b = rows[args.episodes[0]], rows[args.episodes[-1]]
        growth = (b["rss_main_mb"] + b["rss_worker_mb"]) / (a["rss_main_mb"] + a["rss_worker_mb"]) - 1
        print(f"{'RSS growth, smallest -> largest dataset':44} {100 * growth:11.1f}%  (goal within 10%)")


if __name__ == "__main__":
    main()
