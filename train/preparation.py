"""What training and `refine-train preview` both start from: the training table, the episode split,
the action statistics and tokenizer, and the data loaders over them.

The table is built once per dataset (rank 0 builds it, the others map it); statistics come from
`--stats`, a trained policy's own (preview of a checkpoint), or the training split's episodes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .actions import ActionTokenizer, dataset_statistics, load_statistics
from .adapters import ModelAdapter, adapter_for
from .config import TrainConfig
from .data import Collator, FrameCache, StepSamples, split_episodes
from .run_guard import ignore_interrupts
from .table import TrainingTable, build_table, open_published


@dataclass
class Prepared:
    """What both training and `preview` need: the table, split, statistics, tokenizers."""

    table: TrainingTable
    adapter: ModelAdapter
    processor: Any
    train_indices: list[int]
    val_indices: list[int]
    statistics: dict[str, Any]
    unnorm_key: str
    actions: ActionTokenizer
    frames: FrameCache | None = field(default=None, repr=False)  # the run's decoded frames (make_loader's)


def prepare(cfg: TrainConfig, accelerator: Any = None, checkpoint_statistics: bool = False) -> Prepared:
    """Open (building if needed) the table; split; statistics (--stats, a checkpoint's, or the training split's)."""
    from .policy import STATS_FILE, is_policy

    ds = open_published(cfg.dataset, cfg.revision)
    ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with ctx:  # rank 0 builds the table; the others then map it
        table = build_table(
            ds,
            source=cfg.source,
            data_dir=cfg.data_dir,
            split=cfg.split,
            camera=cfg.camera,
            transform=cfg.transform,
            cache_dir=cfg.cache_dir,
        )
    adapter = adapter_for(cfg.model, cfg.trust_remote_code)
    processor = adapter.load_processor(cfg.model)
    episode_ids = table.column("episode_id")
    train_eps, val_eps = split_episodes(episode_ids, cfg.val_fraction, cfg.seed)
    train_idx = [i for i, e in enumerate(episode_ids) if e in train_eps]
    val_idx = [i for i, e in enumerate(episode_ids) if e in val_eps]
    if cfg.limit_samples is not None:
        train_idx = train_idx[: cfg.limit_samples]
    unnorm_key = cfg.unnorm_key or table.meta["source_name"]
    if cfg.stats is not None:
        unnorm_key, entry = load_statistics(cfg.stats, cfg.unnorm_key)
    elif checkpoint_statistics and is_policy(cfg.model):  # preview of a trained policy: its own bounds
        unnorm_key, entry = load_statistics(Path(cfg.model) / STATS_FILE, None)
    else:  # the training split's episodes, through refine-data stats' function
        entry = dataset_statistics(table.episodes(train_eps), table.meta["transform"], unnorm_key)[unnorm_key]
    actions = ActionTokenizer.from_statistics(entry, adapter.tokenizer(processor).vocab_size)
    return Prepared(table, adapter, processor, train_idx, val_idx, {unnorm_key: entry}, unnorm_key, actions)


def make_loader(
    p: Prepared, indices: Any, cfg: TrainConfig, *, epoch: int, train: bool, batch_size: int | None = None
) -> Any:
    from torch.utils.data import DataLoader

    collate = Collator(
        p.adapter,
        p.processor,
        p.actions,
        reasoning=cfg.reasoning,
        dropout=cfg.reasoning_dropout if train else 0.0,
        seed=cfg.seed,
        epoch=epoch,
    )
    image_size = p.adapter.image_size(p.processor)
    if p.frames is None:  # one for the whole run: each epoch's loader is new, its frames are not
        p.frames = FrameCache(len(p.train_indices) + len(p.val_indices), image_size)
    samples = StepSamples(p.table, [int(i) for i in indices], image_size, p.frames)
    workers = cfg.num_workers if len(samples) > (batch_size or cfg.batch_size) else 0
    return DataLoader(
        samples,
        worker_init_fn=ignore_interrupts if workers else None,
        batch_size=batch_size or cfg.batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
        drop_last=train,
        persistent_workers=False,
    )
