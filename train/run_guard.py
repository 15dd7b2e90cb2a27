"""What keeps a training run's `--output` safe: one run at a time, nothing trained replaced by accident,
and a Ctrl-C (or a scheduler's SIGTERM) that ends in a checkpoint rather than in lost GPU hours.

Under `torchrun` every rank runs this code. Rank 0 alone takes the folder's lock (an `fcntl.flock`
in `OUTPUT/.refine/lock`, released by the kernel when the process dies) and checks what the folder
holds; its verdict is broadcast, so every rank stops with the same one line or goes on together.
A signal only raises a flag; the ranks agree on it once per optimizer step (an all-reduce of one
number), so they all save the same step and none waits in a collective the others left.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..annotate.errors import Interrupted
from ..annotate.outputs import hold_output
from .callbacks import LOG_FILE
from .checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from .config import TrainConfig
from .errors import RefineError, TrainError
from .policy import POLICY_FILE, STATS_FILE

# What a training run writes into --output (all of it goes with --overwrite; nothing else does).
RUN_DIRS = (CHECKPOINTS_DIR, "logs", "trace")
RUN_FILES = (LOG_FILE, POLICY_FILE, STATS_FILE)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_config.json")


def earlier_run(output: Path) -> str | None:
    """What an earlier run left in `output` that a new run would replace, in words; None if nothing."""
    found = []
    if (output / POLICY_FILE).is_file():
        found.append("a trained policy")
    if any((output / CHECKPOINTS_DIR).glob("step-*")):
        latest = latest_checkpoint(output)
        found.append(f"checkpoints (latest complete: {latest.name if latest else 'none'})")
    return " and ".join(found) or None


def check_output(cfg: TrainConfig) -> None:
    """Refuse an --output holding an earlier run's policy or checkpoints, unless --resume or --overwrite."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --output, --overwrite replaces it: give one")
    found = earlier_run(cfg.output)
    if found and not (cfg.resume or cfg.overwrite):
        raise TrainError(
            f"--output {cfg.output} already holds {found}; continue that run with --resume, replace it with "
            "--overwrite, or give another --output"
        )


def clear_earlier_run(output: Path) -> None:
    """--overwrite: remove what refine-train wrote there before (and only that)."""
    for name in RUN_DIRS:
        shutil.rmtree(output / name, ignore_errors=True)
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for pattern in WEIGHT_PATTERNS:
        for path in output.glob(pattern):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_training_output(cfg: TrainConfig, accelerator: Any) -> Iterator[None]:
    """Rank 0 holds --output for the run; every rank raises the same `TrainError` if it cannot."""
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        verdict: list[str | None] = [None]
        if accelerator.is_main_process:
            try:
                command = "refine-train " + shlex.join(sys.argv[1:])
                stack.enter_context(hold_output(cfg.output, command, flag="--output"))
                check_output(cfg)
                if cfg.overwrite:
                    clear_earlier_run(cfg.output)
            except RefineError as exc:
                verdict = [str(exc)]
        if accelerator.num_processes > 1:
            broadcast_object_list(verdict, from_process=0)
        if verdict[0] is not None:
            raise TrainError(verdict[0])
        yield


class StopRequest:
    """Catches SIGINT / SIGTERM during training: the run stops after the current optimizer step.

    A second Ctrl-C aborts at once (Python's default), for a user who cannot wait for the step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_WINDOW_S = 2.0  # a second signal sooner than this is the same Ctrl-C, delivered twice

    def __init__(self) -> None:
        self.signum: int | None = None
        self._since = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no clean stop
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is not None:
            # Under torchrun a terminal's Ctrl-C reaches each rank twice (the process group, then the
            # agent forwarding it): only a second press, later on, aborts.
            if signum == signal.SIGINT and now - self._since > self.REPEAT_WINDOW_S:
                raise KeyboardInterrupt
            return
        self.signum, self._since = signum, now
        print(
            f"\n{signal.Signals(signum).name}: stopping after this optimizer step and saving a checkpoint "
            "(Ctrl-C again aborts without saving)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, accelerator: Any) -> int | None:
        """The signal, if any rank got one (a collective under several processes: call on every rank)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum").item()) == 0.0:
            return None
        return self.signum or int(signal.SIGINT)  # another rank's signal: stop as for Ctrl-C


def interrupted(checkpoint: Path, step: int, signum: int, world: int, main: bool = True) -> Interrupted:
    """The exception that ends an interrupted run: where its checkpoint is and the command that continues
    (said by the main process only: the other ranks end with the same exit status, silently)."""
    if not main:
        return Interrupted("", signum)
    argv = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    command = "refine-train " + shlex.join([*argv, "--resume"])
    launcher = "the same launcher (torchrun / accelerate launch) running " if world > 1 else ""
    return Interrupted(
        f"interrupted at step {step}; checkpoint saved in {checkpoint}. Continue with {launcher}{command}",
        signum,
    )


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group; the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
