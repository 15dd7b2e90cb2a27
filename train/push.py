"""`--push-to-hub REPO_ID`: upload the final policy folder as a Hub model repo.

Only the policy (model, processor, statistics, refinevla_policy.json, TensorBoard logs) goes
up; `checkpoints/` (optimizer state, several times the model's size) stays local. The endpoint
and token are resolved as `refine-data publish` resolves them (`HF_ENDPOINT`, `HF_TOKEN` or the
saved login), so a mirror or a test server works the same way.
"""

from __future__ import annotations

from pathlib import Path

from ..annotate.publish.push import hf_api, resolve_token
from ..schemas.dataset_layout import PRIVATE_DIR
from .errors import TrainError

IGNORE = [
    "checkpoints/*",
    "checkpoints/**",
    "train_log.jsonl.partial",
    f"{PRIVATE_DIR}/*",
    f"{PRIVATE_DIR}/**",
    ".policy.partial/**",
]


def push_policy(output: Path, repo_id: str, private: bool = False) -> str:
    """Create (if needed) and upload; returns the commit URL or oid."""
    from huggingface_hub.errors import HfHubHTTPError

    token = resolve_token()
    if token is None:
        raise TrainError(f"--push-to-hub {repo_id}: no Hub token (set HF_TOKEN or run `hf auth login`)")
    api = hf_api(token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(
            folder_path=str(output),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=IGNORE,
            commit_message="refine-train policy",
        )
    except (HfHubHTTPError, OSError) as exc:
        raise TrainError(f"--push-to-hub {repo_id}: upload failed ({exc})") from None
    return str(getattr(info, "oid", info))
