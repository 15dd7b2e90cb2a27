"""Checkpoints: the training state that `--resume` reads.

`checkpoints/step-N/` is a policy folder (`refinevla.train.policy`: what `refine-eval` loads) plus
`state/` (accelerate's `save_state`: model, optimizer, scheduler, every rank's RNG) and
`trainer_state.json` (the step and the data position), written last: a checkpoint without it is
incomplete and never resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"  # OUTPUT/checkpoints/step-N


@dataclass
class TrainerState:
    """Where training stands: optimizer steps taken and the next sample of the data order.

    `position` counts samples of the epoch's global order (`data.epoch_order`) consumed by all
    ranks together, so a run resumed with another process count or batch size continues at the
    same sample. `processes` and `batch_size` say how the checkpoint's run was laid out.
    """

    global_step: int = 0
    epoch: int = 0
    position: int = 0  # samples of this epoch's order consumed, all ranks together
    samples_seen: int = 0  # over all ranks and epochs
    processes: int = 1
    batch_size: int = 0


def write_trainer_state(directory: Path, state: TrainerState) -> None:
    tmp = directory / (STATE_FILE + ".partial")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(directory / STATE_FILE)


def checkpoint_dir(output: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` goes: OUTPUT/checkpoints/step-NNNNNN."""
    return output / CHECKPOINTS_DIR / f"step-{step:06d}"


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step under OUTPUT/checkpoints, if any."""
    done = [d for d in (output / CHECKPOINTS_DIR).glob("step-*") if (d / STATE_FILE).is_file()]
    return max(done, key=lambda d: int(d.name.split("-")[1])) if done else None


def read_trainer_state(directory: Path, batch_size: int, processes: int) -> TrainerState:
    """The checkpoint's state. One written before `position` existed recorded `batch` (micro-batches
    per rank) and is read as having run with this run's `batch_size` and `processes`, as it had to."""
    data = json.loads((directory / STATE_FILE).read_text())
    if "position" not in data:
        data["position"] = int(data.pop("batch", 0)) * batch_size * processes
        data.update(processes=processes, batch_size=batch_size)
    return TrainerState(**data)
