"""The trained-policy contract: the one module `refine-eval` (and anyone else) uses to run a policy.

As LeRobot's one policy class serves training and evaluation, this module is the single meeting
point of `refinevla.train` and `refinevla.evaluate`; nothing else of `train/` is imported by
`evaluate/`. It holds, or re-exports from where they are implemented:
- the policy folder format: `save_pretrained` model + processor, `dataset_statistics.json`
  (OpenVLA's shape, to un-normalise actions) and `refinevla_policy.json` (family, prompt,
  serialisation, action tokenizer, unnorm key, camera, image size, robot); `save_policy` writes it,
  `Policy` loads it (an intermediate LoRA checkpoint included);
- the prompt and target serialisation (`prompt_text`, `ACTION_TAG`, from `targets`);
- the action tokenizer (`ActionTokenizer`, from `actions`);
- the frame resize that training used (`resize_frame`, `resize_image`);
- the one decoder (`generate`, from `decoding`): constrained, batched, greedy, with the rationale
  budget, called by `Policy.predict`, refine-eval's SimplerEnv policy and `refine-eval attention`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.cli_options import Flag
from .actions import ActionTokenizer, load_statistics
from .decoding import N_ACTION, ActionGrammar, Generated, find_tag, generate, logits_processor
from .errors import TrainError
from .targets import ACTION_TAG, PROMPT_TEMPLATE, prompt_text

POLICY_FILE = "refinevla_policy.json"
STATS_FILE = "dataset_statistics.json"
STAGING_DIR = ".policy.partial"  # save_policy writes here first
POLICY_FORMAT = "refinevla.policy/1"
ROBOT_BY_TRANSFORM = {
    "bridge_orig": "widowx",
    "fractal": "google_robot",
}  # the robot whose conventions a transform implies

__all__ = [
    "ACTION_TAG",
    "N_ACTION",
    "POLICY_FILE",
    "POLICY_FORMAT",
    "PROMPT_TEMPLATE",
    "ROBOT_BY_TRANSFORM",
    "STATS_FILE",
    "ActionGrammar",
    "ActionTokenizer",
    "Generated",
    "Policy",
    "find_tag",
    "generate",
    "is_policy",
    "logits_processor",
    "policy_description",
    "prompt_text",
    "read_policy_info",
    "resize_frame",
    "resize_image",
    "save_policy",
]


def resize_frame(img: Any, size: tuple[int, int]) -> np.ndarray:
    """An RGB PIL image at `size` (h, w), Lanczos. Training and evaluation (`refine-eval`'s policy) both
    resize through this one function, so a policy sees frames prepared exactly as it was trained on."""
    from PIL import Image

    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(img)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 array -> (h, w, 3) through `resize_frame` (what a simulator's camera gives)."""
    from PIL import Image

    if image.shape[:2] == size:
        return np.ascontiguousarray(image, dtype=np.uint8)
    return resize_frame(Image.fromarray(np.asarray(image, dtype=np.uint8)), size)


def is_policy(path: str | Path) -> bool:
    return (Path(path) / POLICY_FILE).is_file()


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
    rationale_tokens: int | None = None,
) -> dict[str, Any]:
    """policy.json. `rationale_tokens`: the longest training rationale in tokens (the decoding budget's floor)."""
    transform = table_meta["transform"]
    return {
        "format": POLICY_FORMAT,
        "model_family": family,
        "base_model": base_model,
        "prompt_format": PROMPT_TEMPLATE,
        "reasoning": reasoning,  # False: the policy writes ACTION: and the tokens straight away
        "rationale_tokens": {"max": rationale_tokens} if reasoning and rationale_tokens is not None else None,
        "serialisation": table_meta["serialisation"],
        "action_tokenizer": actions.settings(),
        "schema_id": table_meta["schema_id"],
        "unnorm_key": unnorm_key,
        "transform": transform,
        "camera": table_meta["camera"],
        "image_size": list(image_size),
        "robot": table_meta.get("robot") or ROBOT_BY_TRANSFORM.get(transform),
        "dataset": table_meta["dataset"],
        "training": {
            "step": step,
            **{
                k: config[k] for k in ("reasoning_weight", "reasoning_dropout", "trainable_layers", "lora_rank", "seed")
            },
        },
    }


DEFAULT_RATIONALE_BUDGET = 256  # for checkpoints that do not record their longest training rationale


def longest_rationale_tokens(info: dict[str, Any]) -> int | None:
    """The longest training rationale a policy.json records, in tokens (None: not recorded, or action-only)."""
    return (info.get("rationale_tokens") or {}).get("max")


def rationale_budget(info: dict[str, Any], given: int | None = None) -> int:
    """Tokens a policy may write before `ACTION:` is forced: `given`, else its longest training rationale
    with a quarter more room (a rationale is free text: the model may run a little longer), else 256."""
    if given is not None:
        return given
    recorded = longest_rationale_tokens(info)
    return int(recorded * 1.25) + 16 if recorded else DEFAULT_RATIONALE_BUDGET


TRUST_REMOTE_CODE = Flag(
    "Run the model's own Python code (OpenVLA's remote code, also inside checkpoints trained from it): "
    "only for a source you trust."
)


def read_policy_info(path: Path) -> dict[str, Any]:
    """A policy folder's refinevla_policy.json (no weights loaded); one line if the folder is no policy."""
    if not is_policy(path):
        raise TrainError(f"{path}: no {POLICY_FILE} (not a refine-train checkpoint)")
    info: dict[str, Any] = json.loads((path / POLICY_FILE).read_text())
    return info


class Policy:
    """A trained checkpoint as refine-eval uses it: image + instruction -> rationale and 7-d action."""

    def __init__(self, path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> None:
        import torch

        from .adapters import adapter_for_type

        self.path = Path(path)
        self.info = read_policy_info(self.path)
        self.adapter = adapter_for_type(self.info["model_family"], str(self.path), trust_remote_code)
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
        """(rationale text, 7-d action) for one frame: the one decoder, with the rationale budget
        `max_new_tokens` (then `ACTION:` is forced); a policy trained without rationales writes none."""
        generated = generate(self, [image], [instruction], bool(self.info.get("reasoning", True)), max_new_tokens)[0]
        return generated.rationale, generated.action
