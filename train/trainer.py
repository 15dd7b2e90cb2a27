"""The training loop: accelerate (DDP / FSDP / one CPU), the joint loss, checkpoints.

One `Accelerator` carries the run — under `torchrun` or `accelerate launch` each process is one
rank; on a CPU-only machine it uses gloo. The data order is ours (`epoch_order`), not a prepared
DataLoader's: it is a pure function of (seed, epoch, global position, rank, processes), so
`--resume` restarts on exactly the next sample — with the same process count, or another one —
and ranks never see the same sample. Gradient accumulation is explicit (`no_sync` on all but the
last micro-batch) so the optimizer steps a fixed count per epoch. The scheduler is stepped once
per optimizer step (not wrapped: accelerate's wrapper would step it once per process) and
registered so `save_state` keeps it. Under FSDP, `prepare` replaces the parameters with sharded
ones, so everything after it (clipping) asks the prepared model for its parameters.

What the loop calls lives beside it: `preparation` (table, split, statistics, loaders), `freezing`
(which parameters train), `callbacks` (the step log, periodic validation), `run_guard` (the output
lock, Ctrl-C) and `policy` (the policy folder it saves).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .actions import ActionTokenizer
from .callbacks import PeriodicValidation, TrainingLog, format_metrics, log, trace_samples
from .checkpoint import TrainerState, checkpoint_dir, latest_checkpoint, read_trainer_state, write_trainer_state
from .config import TrainConfig
from .data import epoch_order, to_device
from .errors import TrainError
from .freezing import configure_trainable, count_parameters
from .loss import joint_loss
from .policy import policy_description, save_policy
from .preparation import Prepared, make_loader, prepare
from .run_guard import StopRequest, hold_training_output, interrupted
from .targets import longest_rationale

__all__ = ["TrainResult", "mixed_precision", "train"]


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

    set_seed(cfg.seed)
    p = prepare(cfg, accelerator)
    world = accelerator.num_processes
    if len(p.train_indices) < cfg.batch_size * world:
        raise TrainError(
            f"{cfg.dataset}: {len(p.train_indices)} training samples, fewer than --batch-size {cfg.batch_size} "
            f"x {world} processes"
        )
    model, n_train, n_total = _load_trainable_model(cfg, p, accelerator)
    run = _TrainingRun.start(cfg, p, accelerator, model, _total_steps(cfg, p, accelerator))
    losses = run.train_steps(stop)
    metrics = run.validation.run(run.model, run.state.global_step)
    final = accelerator.unwrap_model(run.model)
    if cfg.lora_rank:
        final = final.merge_and_unload()  # the policy folder holds plain weights refine-eval can load
        run.model = final
    run.save(cfg.output, with_state=False)
    run.training_log.close()
    if cfg.push_to_hub and accelerator.is_main_process:
        from .push import push_policy

        push_policy(cfg.output, cfg.push_to_hub)
    step = run.state.global_step
    log(f"wrote {cfg.output}: step {step}" + (f", {format_metrics(metrics)}" if metrics else ""), accelerator)
    accelerator.wait_for_everyone()
    return TrainResult(
        cfg.output, step, n_train, n_total, metrics, losses, final, p.processor, p.actions, p.train_indices
    )


def _load_trainable_model(cfg: TrainConfig, p: Prepared, accelerator: Any) -> tuple[Any, int, int]:
    """The model with only --trainable-layers / --train-vision / LoRA trainable (and checkpointing on
    if asked); with its trainable and total parameter counts, logged."""
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
    return model, n_train, n_total


def _total_steps(cfg: TrainConfig, p: Prepared, accelerator: Any) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs of this rank's share of the split."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = len(epoch_order(p.train_indices, cfg.seed, 0, rank, world))
    steps_per_epoch = usable_batches(per_rank, cfg) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrainError(
            f"{cfg.dataset}: {per_rank} samples per process make no optimizer step of "
            f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
        )
    return cfg.max_steps or cfg.epochs * steps_per_epoch


def _resumed_state(cfg: TrainConfig, accelerator: Any) -> TrainerState:
    """Where the run starts: step 0, or (--resume) the latest complete checkpoint's state, loaded into
    the prepared model, optimizer and scheduler."""
    world = accelerator.num_processes
    state = TrainerState(processes=world, batch_size=cfg.batch_size)
    if not cfg.resume:
        return state
    ckpt = latest_checkpoint(cfg.output)
    if ckpt is None:
        raise TrainError(f"--resume: no complete checkpoint under {cfg.output / 'checkpoints'}")
    check_resumable(ckpt, accelerator)
    accelerator.load_state(str(ckpt / "state"))
    state = read_trainer_state(ckpt, cfg.batch_size, world)
    log(f"resumed from {ckpt} (step {state.global_step}, epoch {state.epoch}, sample {state.position})", accelerator)
    if (state.processes, state.batch_size) != (world, cfg.batch_size):
        log(
            f"the checkpoint ran {state.processes} process(es) x --batch-size {state.batch_size}, this run "
            f"{world} x {cfg.batch_size}: the data order continues at the same sample; the optimizer steps see "
            "the same samples only if --batch-size x --grad-accum x processes is unchanged",
            accelerator,
        )
    state.processes, state.batch_size = world, cfg.batch_size
    return state


@dataclass
class _TrainingRun:
    """What the step loop and the saves share: the prepared model, optimizer and scheduler, the
    position in the data (`state`), the step log and the periodic validation."""

    cfg: TrainConfig
    p: Prepared
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    state: TrainerState
    total_steps: int
    training_log: TrainingLog
    validation: PeriodicValidation
    rationale_tokens: int | None

    @classmethod
    def start(cls, cfg: TrainConfig, p: Prepared, accelerator: Any, model: Any, total_steps: int) -> _TrainingRun:
        from transformers import get_cosine_schedule_with_warmup

        optimizer = torch.optim.AdamW(
            [q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        state = _resumed_state(cfg, accelerator)
        tok = p.adapter.tokenizer(p.processor)
        rationale_tokens = longest_rationale(tok, p.table.column("parts")) if cfg.reasoning else None
        rank, world = accelerator.process_index, accelerator.num_processes
        training_log = TrainingLog(cfg.output, total_steps, state.global_step, cfg.log_every, accelerator)
        val_loader = make_loader(p, p.val_indices[rank::world], cfg, epoch=0, train=False) if p.val_indices else None
        validation = PeriodicValidation(
            val_loader, p.adapter, p.actions, cfg.reasoning_weight, cfg.eval_every, accelerator, training_log
        )
        return cls(
            cfg, p, accelerator, model, optimizer, scheduler, state, total_steps, training_log, validation,
            rationale_tokens,
        )  # fmt: skip

    def policy(self, step: int) -> dict[str, Any]:
        """refinevla_policy.json's contents at `step`."""
        p, cfg = self.p, self.cfg
        return policy_description(
            family=p.adapter.family,
            base_model=cfg.model,
            table_meta=p.table.meta,
            actions=p.actions,
            unnorm_key=p.unnorm_key,
            image_size=p.adapter.image_size(p.processor),
            reasoning=cfg.reasoning,
            config=cfg.as_dict(),
            step=step,
            rationale_tokens=self.rationale_tokens,
        )

    def save(self, directory: Path, with_state: bool) -> None:
        """The policy folder (rank 0) and, for a checkpoint, every rank's optimizer state."""
        accelerator = self.accelerator
        try:
            accelerator.wait_for_everyone()
            full = accelerator.get_state_dict(self.model)  # a collective under FSDP: every rank takes part
            if accelerator.is_main_process:
                save_policy(
                    directory,
                    accelerator.unwrap_model(self.model),
                    self.p.processor,
                    self.p.statistics,
                    self.policy(self.state.global_step),
                    state_dict=full,
                )
            if with_state:
                accelerator.save_state(str(directory / "state"))
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    write_trainer_state(directory, self.state)
            accelerator.wait_for_everyone()
        except BaseException:  # a full disk: no incomplete checkpoint is left to mistake for one
            if with_state and accelerator.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    def train_steps(self, stop: StopRequest) -> list[float]:
        """Optimizer steps until `total_steps`, epoch after epoch from `state`'s position; the loss of each.
        A stop signal checkpoints at the step every rank agrees on, then raises `Interrupted`."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        losses: list[float] = []
        self.model.train()
        while state.global_step < self.total_steps:
            order = epoch_order(self.p.train_indices, cfg.seed, state.epoch, rank, world, start=state.position)
            usable = usable_batches(len(order), cfg)
            if usable == 0:  # the epoch is done (checkpoints sit on optimizer-step boundaries)
                state.epoch, state.position = state.epoch + 1, 0
                continue
            loader = make_loader(self.p, order[: usable * cfg.batch_size], cfg, epoch=state.epoch, train=True)
            step_losses: list[torch.Tensor] = []
            parts = torch.zeros(2)
            for micro, batch in enumerate(loader):
                sync = (micro + 1) % cfg.grad_accum == 0
                loss, loss_parts = self._micro_step(batch, sync)
                step_losses.append(loss)
                if cfg.trace_samples:
                    trace_samples(cfg.output, rank, state, batch["index"].tolist())
                parts += loss_parts
                state.position += cfg.batch_size * world
                self.training_log.samples(len(batch["index"]) * world)
                if not sync:
                    continue
                losses.append(self._optimizer_step(step_losses, parts / len(step_losses)))
                step_losses, parts = [], torch.zeros(2)
                self._checkpoint_or_stop(stop)
                if state.global_step >= self.total_steps:
                    break
        self.training_log.end_of_steps()
        return losses

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (gradients synchronised only on the last of a step);
        its loss and its (action, rationale) parts."""
        cfg, accelerator = self.cfg, self.accelerator
        with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
            logits = self.p.adapter.logits(self.model, to_device(batch["model_inputs"], accelerator.device))
            jl = joint_loss(
                logits,
                batch["labels"].to(accelerator.device),
                batch["kinds"].to(accelerator.device),
                cfg.reasoning_weight,
            )
            accelerator.backward(jl.loss / cfg.grad_accum)
        return jl.loss.detach(), torch.tensor([float(jl.action), float(jl.rationale)])

    def _optimizer_step(self, step_losses: list[torch.Tensor], parts: torch.Tensor) -> float:
        """Clip, step, log; the step's loss (averaged over the micro-batches and the ranks)."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        if cfg.max_grad_norm:  # all of the prepared model's parameters: FSDP clips only when given those
            accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.samples_seen += cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        loss = torch.stack(step_losses).mean()
        if accelerator.num_processes > 1:
            loss = accelerator.reduce(loss, reduction="mean")
        self.training_log.step(state, float(loss), parts, self.scheduler.get_last_lr()[0])
        self.validation.after_step(self.model, state.global_step)
        return float(loss)

    def _checkpoint_or_stop(self, stop: StopRequest) -> None:
        """--save-every's checkpoint; on a stop signal (agreed by every rank, every step) a checkpoint
        here, then `Interrupted` with the resume command."""
        ckpt = checkpoint_dir(self.cfg.output, self.state.global_step)
        saved = bool(self.cfg.save_every) and self.state.global_step % self.cfg.save_every == 0
        if saved:
            self.save(ckpt, with_state=True)
        signum = stop.agreed(self.accelerator)
        if signum is not None:
            if not saved:
                self.save(ckpt, with_state=True)
            self.training_log.close()
            world = self.accelerator.num_processes
            raise interrupted(ckpt, self.state.global_step, signum, world, self.accelerator.is_main_process)


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
