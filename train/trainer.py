"""The training loop: accelerate (DDP / FSDP / one CPU), the joint loss, selective transfer.

One `Accelerator` carries the run — under `torchrun` or `accelerate launch` each process is one
rank; on a CPU-only machine it uses gloo. The data order is ours (`epoch_order`), not a prepared
DataLoader's: it is a pure function of (seed, epoch, global position, rank, processes), so
`--resume` restarts on exactly the next sample — with the same process count, or another one —
and ranks never see the same sample. Gradient accumulation is explicit (`no_sync` on all but the
last micro-batch) so the optimizer steps a fixed count per epoch. The scheduler is stepped once
per optimizer step (not wrapped: accelerate's wrapper would step it once per process) and
registered so `save_state` keeps it. Under FSDP, `prepare` replaces the parameters with sharded
ones, so everything after it (clipping) asks the prepared model for its parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .actions import ActionTokenizer, dataset_statistics, load_statistics
from .adapters import ModelAdapter, adapter_for
from .checkpoint import (
    TrainerState,
    latest_checkpoint,
    policy_description,
    read_trainer_state,
    save_policy,
    write_trainer_state,
)
from .config import TrainConfig
from .data import Collator, StepSamples, epoch_order, split_episodes
from .errors import TrainError
from .loss import joint_loss
from .run_guard import StopRequest, hold_training_output, ignore_interrupts, interrupted
from .table import TrainingTable, build_table, open_published


@dataclass
class TrainResult:
    output: Path
    global_step: int
    trainable_parameters: int
    total_parameters: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run
    model: Any = None  # the trained (unwrapped) model
    processor: Any = None
    actions: ActionTokenizer | None = None
    train_indices: list[int] = field(default_factory=list)


def log(message: str, accelerator: Any = None) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- parameters


def configure_trainable(model: Any, adapter: ModelAdapter, cfg: TrainConfig) -> Any:
    """Freeze per the flags (ReFineVLA's selective transfer, or LoRA); returns the model to train."""
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=2 * cfg.lora_rank,
            lora_dropout=0.0,
            target_modules=adapter.lora_target_modules(),
        )
        model = get_peft_model(model, lora)
        if cfg.train_vision:
            for module in adapter.vision_modules(model.get_base_model()):
                module.requires_grad_(True)
        return model
    if cfg.trainable_layers is not None:
        model.requires_grad_(False)
        layers = adapter.decoder_layers(model)
        k = min(cfg.trainable_layers, len(layers))
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        adapter.final_norm(model).requires_grad_(True)
        adapter.lm_head(model).requires_grad_(True)
    else:
        model.requires_grad_(True)
    for module in adapter.vision_modules(model):
        module.requires_grad_(cfg.train_vision)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- evaluation


def to_device(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    adapter: ModelAdapter,
    loader: Any,
    actions: ActionTokenizer,
    reasoning_weight: float,
    device: Any,
    accelerator: Any = None,
) -> dict[str, float]:
    """Validation loss, action-token accuracy (teacher-forced argmax) and L1 of the decoded actions."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss*n, n batches, correct, action tokens, |err| sum
    for batch in loader:
        logits = adapter.logits(model, to_device(batch["model_inputs"], device))
        jl = joint_loss(logits, batch["labels"].to(device), batch["kinds"].to(device), reasoning_weight)
        pos = batch["action_positions"].to(device)
        pred = logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1).cpu()
        truth = batch["action_ids"]
        decoded = torch.from_numpy(actions.decode(pred.numpy()))
        sums += torch.tensor(
            [
                float(jl.loss),
                1.0,
                float((pred == truth).sum()),
                float(truth.numel()),
                float((decoded - batch["actions"].double()).abs().sum()),
            ],
            dtype=torch.float64,
        )
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    model.train(was_training)
    n_tok = max(float(sums[3]), 1.0)
    return {
        "val_loss": float(sums[0] / max(float(sums[1]), 1.0)),
        "action_token_accuracy": float(sums[2]) / n_tok,
        "action_l1": float(sums[4]) / n_tok,
    }


def predict_action_ids(model: Any, adapter: ModelAdapter, batch: dict[str, Any]) -> torch.Tensor:
    """Teacher-forced argmax at the action positions (what the model would write there)."""
    with torch.no_grad():
        logits = adapter.logits(model, batch["model_inputs"])
    pos = batch["action_positions"] - 1
    ids: torch.Tensor = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
    return ids


# --------------------------------------------------------------------------- the run


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


def prepare(cfg: TrainConfig, accelerator: Any = None, checkpoint_statistics: bool = False) -> Prepared:
    """Open (building if needed) the table; split; statistics (--stats, a checkpoint's, or the training split's)."""
    from .checkpoint import STATS_FILE, is_policy

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
    adapter = adapter_for(cfg.model)
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
    samples = StepSamples(p.table, [int(i) for i in indices], p.adapter.image_size(p.processor))
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


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured; returns the final state (and the model, for callers in-process)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed_precision(cfg.bf16, cuda))
    with hold_training_output(cfg, accelerator), StopRequest() as stop:
        return _train_held(cfg, accelerator, stop)


def _train_held(cfg: TrainConfig, accelerator: Any, stop: StopRequest) -> TrainResult:
    """The run proper, while rank 0 holds --output and a signal asks for a checkpoint, not a traceback."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    p = prepare(cfg, accelerator)
    if len(p.train_indices) < cfg.batch_size * world:
        raise TrainError(
            f"{cfg.dataset}: {len(p.train_indices)} training samples, fewer than --batch-size {cfg.batch_size} "
            f"x {world} processes"
        )
    model = p.adapter.load_model(cfg.model, torch.float32)
    model = configure_trainable(model, p.adapter, cfg)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    n_train, n_total = count_parameters(model)
    log(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / max(n_total, 1):.2f}%)", accelerator)

    per_rank = len(epoch_order(p.train_indices, cfg.seed, 0, rank, world))
    steps_per_epoch = usable_batches(per_rank, cfg) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrainError(
            f"{cfg.dataset}: {per_rank} samples per process make no optimizer step of "
            f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
        )
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = TrainerState(processes=world, batch_size=cfg.batch_size)
    output = cfg.output
    if cfg.resume:
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise TrainError(f"--resume: no complete checkpoint under {output / 'checkpoints'}")
        check_resumable(ckpt, accelerator)
        accelerator.load_state(str(ckpt / "state"))
        state = read_trainer_state(ckpt, cfg.batch_size, world)
        log(
            f"resumed from {ckpt} (step {state.global_step}, epoch {state.epoch}, sample {state.position})",
            accelerator,
        )
        if (state.processes, state.batch_size) != (world, cfg.batch_size):
            log(
                f"the checkpoint ran {state.processes} process(es) x --batch-size {state.batch_size}, this run "
                f"{world} x {cfg.batch_size}: the data order continues at the same sample; the optimizer steps see "
                "the same samples only if --batch-size x --grad-accum x processes is unchanged",
                accelerator,
            )
        state.processes, state.batch_size = world, cfg.batch_size
    writer = _summary_writer(output, accelerator)
    log_path = output / "train_log.jsonl"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    family = p.adapter.family
    image_size = p.adapter.image_size(p.processor)

    def policy(step: int) -> dict[str, Any]:
        return policy_description(
            family=family,
            base_model=cfg.model,
            table_meta=p.table.meta,
            actions=p.actions,
            unnorm_key=p.unnorm_key,
            image_size=image_size,
            reasoning=cfg.reasoning,
            config=cfg.as_dict(),
            step=step,
        )

    def save(directory: Path, with_state: bool) -> None:
        try:
            save_now(directory, with_state)
        except BaseException:  # a full disk: no incomplete checkpoint is left to mistake for one
            if with_state and accelerator.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    def save_now(directory: Path, with_state: bool) -> None:
        accelerator.wait_for_everyone()
        full = accelerator.get_state_dict(model)  # a collective under FSDP: every rank takes part
        if accelerator.is_main_process:
            save_policy(
                directory,
                accelerator.unwrap_model(model),
                p.processor,
                p.statistics,
                policy(state.global_step),
                state_dict=full,
            )
        if with_state:
            accelerator.save_state(str(directory / "state"))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_trainer_state(directory, state)
        accelerator.wait_for_everyone()

    val_loader = None
    if p.val_indices:
        val_loader = make_loader(p, p.val_indices[rank::world], cfg, epoch=0, train=False)
    metrics: dict[str, float] = {}
    losses: list[float] = []
    progress = _progress(total_steps, state.global_step, accelerator)
    model.train()
    window_start, window_samples = time.perf_counter(), 0
    while state.global_step < total_steps:
        order = epoch_order(p.train_indices, cfg.seed, state.epoch, rank, world, start=state.position)
        usable = usable_batches(len(order), cfg)
        if usable == 0:  # the epoch is done (checkpoints sit on optimizer-step boundaries)
            state.epoch, state.position = state.epoch + 1, 0
            continue
        loader = make_loader(p, order[: usable * cfg.batch_size], cfg, epoch=state.epoch, train=True)
        step_losses: list[torch.Tensor] = []
        parts = torch.zeros(2)
        for micro, batch in enumerate(loader):
            sync = (micro + 1) % cfg.grad_accum == 0
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits = p.adapter.logits(model, to_device(batch["model_inputs"], accelerator.device))
                jl = joint_loss(
                    logits,
                    batch["labels"].to(accelerator.device),
                    batch["kinds"].to(accelerator.device),
                    cfg.reasoning_weight,
                )
                accelerator.backward(jl.loss / cfg.grad_accum)
            step_losses.append(jl.loss.detach())
            if cfg.trace_samples:
                _trace(output, rank, state, batch["index"].tolist())
            parts += torch.tensor([float(jl.action), float(jl.rationale)])
            state.position += cfg.batch_size * world
            window_samples += len(batch["index"]) * world
            if not sync:
                continue
            if cfg.max_grad_norm:  # all of the prepared model's parameters: FSDP clips only when given those
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.samples_seen += cfg.batch_size * cfg.grad_accum * world
            loss = torch.stack(step_losses).mean()
            if world > 1:
                loss = accelerator.reduce(loss, reduction="mean")
            losses.append(float(loss))
            parts /= len(step_losses)
            step_losses, parts_now, parts = [], parts, torch.zeros(2)
            if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": state.global_step,
                    "epoch": state.epoch,
                    "loss": float(loss),
                    "action_loss": float(parts_now[0]),
                    "rationale_loss": float(parts_now[1]),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                window_start, window_samples = time.perf_counter(), 0
                if accelerator.is_main_process:
                    with log_path.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k in ("loss", "action_loss", "rationale_loss", "lr", "samples_per_s"):
                            writer.add_scalar(f"train/{k}", record[k], state.global_step)
                progress.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            progress.update(1)
            if val_loader is not None and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                metrics = evaluate(
                    model, p.adapter, val_loader, p.actions, cfg.reasoning_weight, accelerator.device, accelerator
                )
                _log_metrics(metrics, state.global_step, writer, log_path, accelerator)
            saved = bool(cfg.save_every) and state.global_step % cfg.save_every == 0
            if saved:
                save(output / "checkpoints" / f"step-{state.global_step:06d}", with_state=True)
            signum = stop.agreed(accelerator)  # every rank, every step: they stop at the same one
            if signum is not None:
                ckpt = output / "checkpoints" / f"step-{state.global_step:06d}"
                if not saved:
                    save(ckpt, with_state=True)
                progress.close()
                if writer is not None:
                    writer.close()
                raise interrupted(ckpt, state.global_step, signum, world, accelerator.is_main_process)
            if state.global_step >= total_steps:
                break
    progress.close()
    if val_loader is not None:
        metrics = evaluate(
            model, p.adapter, val_loader, p.actions, cfg.reasoning_weight, accelerator.device, accelerator
        )
        _log_metrics(metrics, state.global_step, writer, log_path, accelerator)
    final = accelerator.unwrap_model(model)
    if cfg.lora_rank:
        final = final.merge_and_unload()  # the policy folder holds plain weights refine-eval can load
        model = final
    save(output, with_state=False)
    if writer is not None:
        writer.close()
    if cfg.push_to_hub and accelerator.is_main_process:
        from .push import push_policy

        push_policy(output, cfg.push_to_hub)
    log(f"wrote {output}: step {state.global_step}" + (f", {_fmt(metrics)}" if metrics else ""), accelerator)
    accelerator.wait_for_everyone()
    return TrainResult(
        output, state.global_step, n_train, n_total, metrics, losses, final, p.processor, p.actions, p.train_indices
    )


def check_resumable(ckpt: Path, accelerator: Any) -> None:
    """One line, not accelerate's traceback, when the checkpoint's state was written by the other kind
    of run: FSDP saves sharded folders (`pytorch_model_fsdp_0/`), everything else whole files."""
    from accelerate.utils import DistributedType
    from accelerate.utils.constants import FSDP_MODEL_NAME

    sharded = (ckpt / "state" / f"{FSDP_MODEL_NAME}_0").is_dir()
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if sharded != fsdp:
        written, now = ("under FSDP", "without it") if sharded else ("without FSDP", "under FSDP")
        raise TrainError(
            f"--resume: {ckpt / 'state'} was written {written} and this run is {now}; resume with the same kind "
            f"of accelerate config (the process count may change), or start anew from its weights: --model {ckpt}"
        )


def usable_batches(samples_per_rank: int, cfg: TrainConfig) -> int:
    """Micro-batches a rank runs from `samples_per_rank`: whole optimizer steps only, so a step
    never spans epochs."""
    n = samples_per_rank // cfg.batch_size
    return n - n % cfg.grad_accum


def mixed_precision(bf16: bool | None, cuda: bool) -> str | None:
    """accelerate's mixed precision: `--bf16/--no-bf16` when given; else the launcher's choice
    (`accelerate launch --config_file …` exports ACCELERATE_MIXED_PRECISION); else bf16 where the
    GPU has it."""
    if bf16 is not None:
        return "bf16" if bf16 else "no"
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # accelerate reads it
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def _trace(output: Path, rank: int, state: TrainerState, indices: list[int]) -> None:
    trace = output / "trace"
    trace.mkdir(parents=True, exist_ok=True)
    with (trace / f"rank-{rank}.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "indices": indices}) + "\n")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _log_metrics(metrics: dict[str, float], step: int, writer: Any, log_path: Path, accelerator: Any) -> None:
    if not accelerator.is_main_process:
        return
    log(f"step {step}: {_fmt(metrics)}", accelerator)
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\n")
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"val/{k}", v, step)


def _summary_writer(output: Path, accelerator: Any) -> Any:
    if not accelerator.is_main_process:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: no TensorBoard logs (pip install 'refinevla[train]')")
        return None
    return SummaryWriter(str(output / "logs"))


def _progress(total: int, start: int, accelerator: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        file=sys.stderr,
    )
