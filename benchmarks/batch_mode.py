"""Batch mode's own cost for N requests, and what it saves: printed as a table.

Measured in this process (the Batch API is refinevla's OpenAI Files + Batch emulator, run
in its own process so its work is not counted), over N Bridge-layout episodes (256 x 256 frames)
written by the project's RLDS writer, with 6 keyframes each as live mode sends them:

1. submit — stream the episodes, build each request exactly as live mode does (`Engine.prepare`),
   write the JSONL input files (--batch-requests per file), record their keys, upload and create;
2. ingest — poll, download every output file, validate every answer and commit it to the store.

For each phase: CPU seconds of this process (user + system) and its peak RSS (the episodes are written
by a child process beforehand, so the peak is batch mode's alone), and the input bytes.
Then the cost of the same requests at live and at batch prices from the packaged price table,
with the tokens the fake reports per answer (1,000 prompt + 200 completion, about what a keyframe
request costs), for a few models.

    python benchmarks/batch_mode.py                       # 10,000 requests, files of 2,000
    python benchmarks/batch_mode.py --requests 1000 --batch-requests 500
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

SECRET = "sk-benchmark-not-a-real-key"
MODELS = ("gpt-4.1-mini", "gpt-4.1", "gemini-2.5-flash", "gemini-2.5-pro")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_source(work: Path, n: int, size: int) -> str:
    from refinevla.annotate.sources import specs
    from refinevla.annotate.sources.rlds_writer import write_rlds
    from refinevla.annotate.sources.specs import tiny_bridge_episode as tiny_episode

    eps = (tiny_episode(i, 10 + i % 3, size=size) for i in range(n))
    d = write_rlds(work / "src", specs.bridge_features(cameras=1, image_size=(size, size)), eps, name="bridge_orig")
    return f"rlds:{d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="episodes = requests")
    parser.add_argument("--batch-requests", type=int, default=2_000, help="requests per batch input file")
    parser.add_argument("--image-size", type=int, default=256, help="frame side (Bridge: 256)")
    opts = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = SECRET

    from refinevla.annotate.batch.emulator.openai_api import FakeOpenAIBatchProcess
    from refinevla.annotate.batch.runner import BatchOptions, BatchRunner
    from refinevla.annotate.commands.batch import make_batch_provider
    from refinevla.annotate.engine import Engine, EngineOptions
    from refinevla.annotate.pricing import PriceTable
    from refinevla.annotate.source_args import open_cli_source
    from refinevla.annotate.sources import ReadOptions
    from refinevla.annotate.store import ResultStore
    from refinevla.annotate.teachers import make_teacher

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        # written in a child process, so this process's peak RSS is batch mode's alone
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            uri = pool.apply(write_source, (work, opts.requests, opts.image_size))
        print(f"wrote {opts.requests} episodes in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        answer = "refinevla.annotate.batch.emulator.openai_api:rationale_answer"
        with FakeOpenAIBatchProcess(work / "api", api_key=SECRET, answer=answer) as server:
            teacher = make_teacher("openai", model="gpt-4.1-mini", base_url=server.base_url)
            source = open_cli_source(uri, None, "train", None, None, None, None)
            prices = PriceTable.load()
            store = ResultStore(work / "out" / ".refine" / "store.sqlite")
            engine = Engine(teacher, store, EngineOptions(), prices)
            provider = make_batch_provider(teacher)
            runner = BatchRunner(
                provider,
                engine,
                store,
                BatchOptions(poll_interval=0.2, max_requests=opts.batch_requests),
                work / "out" / ".refine" / "batches",
                progress=lambda line: None,
            )
            runner.folder.mkdir(parents=True, exist_ok=True)
            rss0, cpu0, wall0 = peak_rss_mb(), cpu_seconds(), time.monotonic()
            runner.submit_round(source.iter_episodes(ReadOptions(start=0, stop=opts.requests)))
            rss1, cpu1, wall1 = peak_rss_mb(), cpu_seconds(), time.monotonic()
            runner.wait_and_ingest()
            rss2, cpu2, wall2 = peak_rss_mb(), cpu_seconds(), time.monotonic()
            input_bytes = sum(p.stat().st_size for p in runner.folder.glob("*.jsonl"))
            counts = store.counts()
            spend = store.spend()
            provider.close()
            store.close()

    n = opts.requests
    if counts["answers"] != n:
        sys.exit(f"batch mode stored {counts['answers']} answers for {n} requests: {counts}")
    print(f"\nbatch mode, {n:,} requests in {runner.summary.batches_submitted} files of <= {opts.batch_requests:,}")
    print(f"input files: {input_bytes / 1e6:,.1f} MB ({input_bytes / n / 1e3:.1f} kB a request)\n")
    print(f"{'phase':<44}{'CPU s':>8}{'ms/request':>12}{'wall s':>9}{'peak RSS MB':>13}")
    print(f"{'(before)':<44}{'':>8}{'':>12}{'':>9}{rss0:>13.0f}")
    phases = (
        ("submit: prepare, build, write, upload, create", cpu1 - cpu0, wall1 - wall0, rss1),
        ("ingest: poll, download, validate, commit", cpu2 - cpu1, wall2 - wall1, rss2),
    )
    for name, cpu, wall, rss in phases:
        print(f"{name:<44}{cpu:>8.1f}{1000 * cpu / n:>12.2f}{wall:>9.1f}{rss:>13.0f}")
    prompt, completion = spend.prompt_tokens, spend.completion_tokens
    print(f"\ncost of these {n:,} answers ({prompt:,} prompt + {completion:,} completion tokens)\n")
    print(f"{'model':<22}{'live USD':>12}{'batch USD':>12}{'batch/live':>12}")
    for model in MODELS:
        live = prices.cost(model, prompt, completion)
        batch = prices.cost(model, prompt, completion, batch=True)
        print(f"{model:<22}{live:>12.2f}{batch:>12.2f}{batch / live:>12.2f}")


if __name__ == "__main__":
    main()
