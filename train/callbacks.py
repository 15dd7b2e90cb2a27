"""What the training loop reports, as objects the loop calls (Octo's train callbacks): the step log
(`train_log.jsonl`, TensorBoard, the progress bar) and periodic validation.

Kept out of `trainer.py` so the loop reads as forward, backward, step, and the calls below; each
writes on the main process only, while every rank takes part in validation's collective.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .actions import ActionTokenizer
from .adapters import ModelAdapter
from .checkpoint import TrainerState
from .validation import validation_metrics

LOG_FILE = "train_log.jsonl"
SCALARS = ("loss", "action_loss", "rationale_loss", "lr", "samples_per_s")


def log(message: str, accelerator: Any = None) -> None:
    """One line on stderr, from the main process only."""
    if accelerator is None or accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class TrainingLog:
    """Per optimizer step: loss parts, learning rate and throughput every `log_every` steps (and at the
    last), appended to `OUTPUT/train_log.jsonl` and TensorBoard; the progress bar on every step."""

    def __init__(self, output: Path, total_steps: int, start_step: int, log_every: int, accelerator: Any) -> None:
        self.path = output / LOG_FILE
        self.total_steps = total_steps
        self.log_every = log_every
        self.accelerator = accelerator
        self.main = bool(accelerator.is_main_process)
        self.writer = summary_writer(output) if self.main else None
        self.progress = progress_bar(total_steps, start_step, self.main)
        self.window_start, self.window_samples = time.perf_counter(), 0

    def samples(self, n: int) -> None:
        """Count samples (all ranks) for the throughput of the current window."""
        self.window_samples += n

    def step(self, state: TrainerState, loss: float, parts: torch.Tensor, lr: float) -> None:
        if state.global_step % self.log_every == 0 or state.global_step == self.total_steps:
            elapsed = time.perf_counter() - self.window_start
            record = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": loss,
                "action_loss": float(parts[0]),
                "rationale_loss": float(parts[1]),
                "lr": lr,
                "samples_per_s": self.window_samples / max(elapsed, 1e-9),
            }
            self.window_start, self.window_samples = time.perf_counter(), 0
            if self.main:
                self._append(record)
                if self.writer is not None:
                    for k in SCALARS:
                        self.writer.add_scalar(f"train/{k}", record[k], state.global_step)
            self.progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
        self.progress.update(1)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """A validation's results: on stderr, in the log file and in TensorBoard."""
        if not self.main:
            return
        log(f"step {step}: {format_metrics(metrics)}")
        self._append({"step": step, **metrics})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, step)

    def end_of_steps(self) -> None:
        self.progress.close()

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class PeriodicValidation:
    """Validation every `every` optimizer steps (0: only at the end), if there are held-out episodes."""

    def __init__(
        self,
        loader: Any,
        adapter: ModelAdapter,
        actions: ActionTokenizer,
        reasoning_weight: float,
        every: int,
        accelerator: Any,
        training_log: TrainingLog,
    ) -> None:
        self.loader = loader
        self.adapter = adapter
        self.actions = actions
        self.reasoning_weight = reasoning_weight
        self.every = every
        self.accelerator = accelerator
        self.training_log = training_log
        self.metrics: dict[str, float] = {}  # the last validation's

    def after_step(self, model: Any, step: int) -> None:
        if self.loader is not None and self.every and step % self.every == 0:
            self.run(model, step)

    def run(self, model: Any, step: int) -> dict[str, float]:
        """Validate now (a collective: every rank calls it); {} without held-out episodes."""
        if self.loader is None:
            return self.metrics
        self.metrics = validation_metrics(
            model,
            self.adapter,
            self.loader,
            self.actions,
            self.reasoning_weight,
            self.accelerator.device,
            self.accelerator,
        )
        self.training_log.metrics(self.metrics, step)
        return self.metrics


def trace_samples(output: Path, rank: int, state: TrainerState, indices: list[int]) -> None:
    """--trace-samples: this rank's micro-batch sample indices, one line per micro-batch."""
    trace = output / "trace"
    trace.mkdir(parents=True, exist_ok=True)
    with (trace / f"rank-{rank}.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "indices": indices}) + "\n")


def summary_writer(output: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: no TensorBoard logs (pip install 'refinevla[train]')")
        return None
    return SummaryWriter(str(output / "logs"))


def progress_bar(total: int, start: int, main: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not main, dynamic_ncols=True, file=sys.stderr
    )
