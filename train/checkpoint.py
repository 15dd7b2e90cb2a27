"""Checkpoints: a self-describing policy folder, and the training state that `--resume` reads.

A policy folder is what `refine-eval` loads with nothing else to hand: the model and processor
(`save_pretrained`), `dataset_statistics.json` (OpenVLA's shape, to un-normalise actions) and
`refinevla_policy.json` (family, prompt, serialisation, action tokenizer, unnorm key, camera,
image size, robot). `checkpoints/step-N/` is a policy folder plus `state/` (accelerate's
`save_state`: model, optimizer, scheduler, every rank's RNG) and `trainer_state.json` (the step
and the data position), written last: a checkpoint without it is incomplete and never resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .actions import ActionTokenizer, load_statistics
from .errors import TrainError
from .targets import ACTION_TAG, prompt_text

POLICY_FILE = "refinevla_policy.json"
STATS_FILE = "dataset_statistics.json"
STATE_FILE = "trainer_state.json"
STAGING_DIR = ".policy.partial"  # save_policy writes here first
POLICY_FORMAT = "refinevla.policy/1"
ROBOTS = {"bridge_orig": "widowx", "fractal": "google_robot"}  # by transform


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


def save_policy(
    directory: Path,
    model: Any,
    processor: Any,
    statistics: dict[str, Any],
    policy: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write a policy folder (call on the main process with the unwrapped model).

    `state_dict`: the full weights gathered by `accelerator.get_state_dict` — under FSDP each rank
    holds a shard only, and `save_pretrained` of the unwrapped model would write that shard.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        state_dict = without_tied_copies(model, state_dict)
    # Written whole into a hidden folder, then moved in file by file (renames need no room), the
    # policy file last: a full disk leaves the folder's previous policy as it was, never a torn one.
    staging = directory / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        model.save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)
        (staging / STATS_FILE).write_text(json.dumps(statistics, indent=2))
        (staging / POLICY_FILE).write_text(json.dumps(policy, indent=2))
        for path in sorted(staging.iterdir(), key=lambda p: p.name == POLICY_FILE):
            target = directory / path.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def without_tied_copies(model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` less the second name of each tied parameter (e.g. an LM head tied to the
    embeddings). `save_pretrained` drops those by shared storage, but weights gathered from FSDP
    shards are separate copies and would be written twice."""
    first: dict[int, str] = {}
    drop = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and first[id(param)] in state_dict:
            drop.add(name)
        first.setdefault(id(param), name)
    return {k: v for k, v in state_dict.items() if k not in drop}


def write_trainer_state(directory: Path, state: TrainerState) -> None:
    tmp = directory / (STATE_FILE + ".partial")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(directory / STATE_FILE)


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step under OUTPUT/checkpoints, if any."""
    done = [d for d in (output / "checkpoints").glob("step-*") if (d / STATE_FILE).is_file()]
    return max(done, key=lambda d: int(d.name.split("-")[1])) if done else None


def read_trainer_state(directory: Path, batch_size: int, processes: int) -> TrainerState:
    """The checkpoint's state. One written before `position` existed recorded `batch` (micro-batches
    per rank) and is read as having run with this run's `batch_size` and `processes`, as it had to."""
    data = json.loads((directory / STATE_FILE).read_text())
    if "position" not in data:
        data["position"] = int(data.pop("batch", 0)) * batch_size * processes
        data.update(processes=processes, batch_size=batch_size)
    return TrainerState(**data)


def is_policy(path: str | Path) -> bool:
    return (Path(path) / POLICY_FILE).is_file()


class Policy:
    """A trained checkpoint as refine-eval uses it: image + instruction -> rationale and 7-d action."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import torch

        from .adapters import adapter_for_type

        self.path = Path(path)
        if not is_policy(self.path):
            raise TrainError(f"{self.path}: no {POLICY_FILE} (not a refine-train checkpoint)")
        self.info = json.loads((self.path / POLICY_FILE).read_text())
        self.adapter = adapter_for_type(self.info["model_family"], str(self.path))
        self.processor = self.adapter.load_processor(str(self.path))
        self.model = self._load_model(torch.float32).to(device).eval()
        key, entry = load_statistics(self.path / STATS_FILE, self.info["unnorm_key"])
        self.statistics = {key: entry}
        self.actions = ActionTokenizer.from_statistics(entry, self.adapter.tokenizer(self.processor).vocab_size)
        self.device = device

    def _load_model(self, dtype: Any) -> Any:
        """Plain weights, or — in an intermediate LoRA checkpoint, which holds only the adapter — the
        base model named in `adapter_config.json` with the adapter merged in."""
        adapter_config = self.path / "adapter_config.json"
        if not adapter_config.is_file():
            return self.adapter.load_model(str(self.path), dtype)
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise TrainError(f"{adapter_config}: no base_model_name_or_path (cannot rebuild the LoRA model)")
        try:
            base = self.adapter.load_model(str(base_path), dtype)
        except OSError as exc:
            raise TrainError(f"{adapter_config}: base model {base_path!r} cannot be loaded ({exc})") from None
        return PeftModel.from_pretrained(base, str(self.path)).merge_and_unload()

    def predict(self, image: np.ndarray, instruction: str, max_new_tokens: int = 1024) -> tuple[str, np.ndarray]:
        """(rationale text, action) by greedy decoding; the action follows `ACTION:`."""
        import torch

        tok = self.adapter.tokenizer(self.processor)
        ids, extra = self.adapter.encode_prompts(self.processor, [prompt_text(instruction)], [image])
        input_ids = torch.tensor([ids[0]], device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
        inputs.update(self.adapter.text_inputs([len(ids[0])], len(ids[0])))
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        tag = tok(ACTION_TAG, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, input_ids.shape[1] :].tolist()
        for i in range(len(new) - len(tag), -1, -1):
            if new[i : i + len(tag)] == tag:
                action_ids = new[i + len(tag) : i + len(tag) + 7]
                if len(action_ids) == 7:
                    return tok.decode(new[:i]), self.actions.decode(np.asarray(action_ids))
        raise TrainError(
            f"{self.path}: the model wrote no {ACTION_TAG} followed by 7 action tokens (it wrote {tok.decode(new)!r})"
        )


def policy_description(
    *,
    family: str,
    base_model: str,
    table_meta: dict[str, Any],
    actions: ActionTokenizer,
    unnorm_key: str,
    image_size: tuple[int, int],
    reasoning: bool,
    config: dict[str, Any],
    step: int,
) -> dict[str, Any]:
    transform = table_meta["transform"]
    return {
        "format": POLICY_FORMAT,
        "model_family": family,
        "base_model": base_model,
        "prompt_format": "What action should the robot take to {instruction}?",
        "reasoning": reasoning,  # False: the policy writes ACTION: and the tokens straight away
        "serialisation": table_meta["serialisation"],
        "action_tokenizer": actions.settings(),
        "schema_id": table_meta["schema_id"],
        "unnorm_key": unnorm_key,
        "transform": transform,
        "camera": table_meta["camera"],
        "image_size": list(image_size),
        "robot": ROBOTS.get(transform),
        "dataset": table_meta["dataset"],
        "training": {
            "step": step,
            **{
                k: config[k] for k in ("reasoning_weight", "reasoning_dropout", "trainable_layers", "lora_rank", "seed")
            },
        },
    }
