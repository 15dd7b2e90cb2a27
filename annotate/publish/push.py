"""`refine-data push`: upload a published dataset directory to a Hub dataset repo.

What is pushed is exactly the directory layout minus `.refine/` (the store and rejects: private,
large, and useless to a reader) and hidden partial files. One commit holds everything, so a reader
never sees a half-pushed dataset; the commit is then tagged with the schema version
(`refinevla.rationale/1` -> `refinevla.rationale-v1`) so a revision can be pinned per schema.

The README is merged, not overwritten: if the repo already has a card, its YAML is kept and ours
laid over it, with `configs` merged by `config_name` and `dataset_info` kept for the configs we do
not describe (that is where `datasets.push_to_hub` records features and sizes).

The token comes from `HF_TOKEN` or the saved login (`hf auth login`), is passed to `HfApi`, and is
never printed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...schemas.dataset_layout import CARD, MANIFEST, PRIVATE_DIR, manifest_path, read_manifest
from ..errors import RefineError

EXCLUDED_DIRS = (PRIVATE_DIR,)


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    size: int
    local: Path


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[UploadFile]
    tag: str
    commit: str | None = None  # None on --dry-run
    readme_merged: bool = False
    operations: list[str] = field(default_factory=list)  # human-readable, for --dry-run and the report


def schema_tag(schema_id: str) -> str:
    """A git-tag-safe name for a schema id: `refinevla.rationale/1` -> `refinevla.rationale-v1`."""
    return schema_id.replace("/", "-v")


def upload_plan(out: Path) -> list[UploadFile]:
    """The files to upload: everything under `out` but `.refine/` and hidden files (partials)."""
    files = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or rel.parts[0] in EXCLUDED_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        files.append(UploadFile(rel.as_posix(), path.stat().st_size, path))
    return files


def merge_card_yaml(remote: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Our card metadata laid over the remote card's: keep what we do not set, merge configs/dataset_info.

    * `configs`: remote configs with other names are kept (after ours); same-named ones are ours.
    * `dataset_info`: kept for configs we do not describe (one dict or a list per config); a remote
      entry for a config we describe is kept too unless ours has one, because we do not write features.
    """
    merged = {**remote, **ours}
    ours_configs = ours.get("configs") or []
    names = {c.get("config_name") for c in ours_configs}
    merged["configs"] = ours_configs + [c for c in remote.get("configs") or [] if c.get("config_name") not in names]
    remote_info = remote.get("dataset_info")
    ours_info = ours.get("dataset_info")
    if remote_info is not None or ours_info is not None:

        def as_list(info: Any) -> list[dict[str, Any]]:
            return [] if info is None else list(info) if isinstance(info, list) else [info]

        ours_list = as_list(ours_info)
        ours_names = {i.get("config_name", "default") for i in ours_list}
        info = ours_list + [i for i in as_list(remote_info) if i.get("config_name", "default") not in ours_names]
        merged["dataset_info"] = info[0] if len(info) == 1 and isinstance(remote_info, dict) else info
    return merged


def resolve_token() -> str | None:
    """`HF_TOKEN`, else the token saved by `hf auth login`, else None."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def hf_api(token: str | None) -> Any:
    """The Hub client every refinevla upload and download uses (`push`, `validate`, `refine-train`)."""
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read here, not at import: a mirror or a test server set after import is honoured.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def _remote_readme(api: Any, repo_id: str, revision: str) -> str | None:
    """The text of the repo's README at `revision`, or None if it has none."""
    # Only the Hub saying "no such file" means there is no README; a network failure must not
    # (LocalEntryNotFoundError is also an EntryNotFoundError) or we would overwrite the card.
    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory(prefix="refinevla-readme-") as tmp:
        try:
            path = api.hf_hub_download(repo_id, CARD, repo_type="dataset", revision=revision, local_dir=tmp)
        except (RemoteEntryNotFoundError, RevisionNotFoundError):
            return None
        return Path(path).read_text(encoding="utf-8")


def merged_readme(local_text: str, remote_text: str | None) -> tuple[str, bool]:
    """(README to upload, whether it was merged): our body, YAML merged with the remote card's."""
    if remote_text is None:
        return local_text, False
    from huggingface_hub import DatasetCard, DatasetCardData

    ours = DatasetCard(local_text)
    remote = DatasetCard(remote_text)
    merged = merge_card_yaml(remote.data.to_dict(), ours.data.to_dict())  # type: ignore[no-untyped-call]
    card = DatasetCard(f"---\n{DatasetCardData(**merged).to_yaml()}\n---\n{ours.text}")
    return str(card), True


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _card_for_hub(out: Path, repo_id: str) -> str:
    """OUT's card, re-rendered so its loading example reads `load_dataset("ORG/NAME", ...)`."""
    from ...datacards.render import CardError, render_card

    try:
        return str(render_card(out, repo_id=repo_id))
    except CardError as exc:
        raise RefineError(f"{out}: {exc}") from None


def push_dataset(
    out: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> PushResult:
    """Create the repo (if needed), commit `out` minus `.refine/`, tag the commit with the schema version.

    `token` overrides `HF_TOKEN` / the saved login. On `dry_run` nothing is sent: the result lists
    the operations that would be made and the files with their sizes.
    """
    out = Path(out)
    if not manifest_path(out).is_file():
        raise RefineError(f"{out}: no {MANIFEST}; push a directory written by `refine-data annotate`")
    if not (out / CARD).is_file():
        raise RefineError(f"{out}: no {CARD}; write the card first with `refine-data card {out}`")
    schema_id = read_manifest(out).get("schema", {}).get("id")
    if not schema_id:
        raise RefineError(f"{manifest_path(out)}: no schema id (schema.id)")
    branch = revision or "main"
    files = upload_plan(out)
    tag = schema_tag(schema_id)
    total = sum(f.size for f in files)
    result = PushResult(repo_id, branch, files, tag)
    excluded = ", ".join(d + "/" for d in EXCLUDED_DIRS)
    result.operations = [
        f"create dataset repo {repo_id} ({'private' if private else 'public'}) if it does not exist",
        *([f"create branch {branch} if it does not exist"] if branch != "main" else []),
        f"merge {CARD} YAML with the repo's card, if it has one",
        f"commit {len(files)} files ({_human(total)}) to {branch}; excluded: {excluded}",
        *[f"  upload {f.path_in_repo} ({_human(f.size)})" for f in files],
        f"tag the commit {tag}",
    ]
    if dry_run:
        return result

    token = token or resolve_token()
    if not token:
        raise RefineError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = hf_api(token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True)
        readme, result.readme_merged = merged_readme(_card_for_hub(out, repo_id), _remote_readme(api, repo_id, branch))
        operations = [
            CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))
            for f in files
            if f.path_in_repo != CARD
        ]
        operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=readme.encode("utf-8")))
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=f"refinevla: {len(files)} files, schema {schema_id}",
            repo_type="dataset",
            revision=branch,
        )
        result.commit = info.oid
        try:
            api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type="dataset")
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code != 409:
                raise
            # The tag names the latest push of this schema version: move it to this commit.
            api.delete_tag(repo_id, tag=tag, repo_type="dataset")
            api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type="dataset")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise RefineError(f"push to {repo_id} failed (HTTP {status}): {str(exc).splitlines()[0]}") from None
    return result
