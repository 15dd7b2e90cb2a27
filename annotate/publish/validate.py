"""`refine-data validate`: is a published dataset what it says it is?

Three checks, each naming what fails so a user can find it:
* rows — every episode row, with its step rows, is rebuilt into a rationale record and validated
  against the schema id the row declares (`schema_id`); step rows without an episode are errors;
* counts — the manifest's episode and step counts equal the rows in the files;
* card — `README.md` parses as a dataset card with a license and `steps` / `episodes` configs whose
  `data_files` match files that exist.

A Hub repo (`ORG/NAME`) is fetched (data, card, manifest only) and checked the same way.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ...schemas import SCHEMA_FILES, validate
from ...schemas.dataset_layout import (
    CARD,
    EPISODE_FILES,
    EPISODES_DIR,
    MANIFEST,
    PRIVATE_DIR,
    STEPS_DIR,
    episode_files,
    manifest_path,
    read_manifest,
    step_files,
)
from ..errors import RefineError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Episode-level record keys (the schema's root properties, `steps` rebuilt from the step rows).
_STEP_KEYS = ("step", "subtask", "subtask_reason", "move", "move_reason", "gripper")


@dataclass
class ValidationReport:
    """What `validate` found. `ok` when there are no errors; errors are 'where: what' lines."""

    target: str
    episodes: int = 0
    steps: int = 0
    schema_ids: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0  # all errors, also those beyond `max_errors`
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" / "failed"

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def fail(self, check: str, message: str, max_errors: int) -> None:
        self.checks[check] = "failed"
        self.error_count += 1
        if len(self.errors) < max_errors:
            self.errors.append(message)


def _rows(files: list[Path], columns: list[str] | None = None) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, row number in file, row) for every row, a row group at a time."""
    for path in files:
        pf = pq.ParquetFile(path)
        offset = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=columns)
            for i, row in enumerate(table.to_pylist()):
                yield path, offset + i, row
            offset += table.num_rows


def validate_rows(out: Path, report: ValidationReport, max_errors: int) -> None:
    """Rebuild each episode's record from its episode row and step rows, and validate it.

    Step rows are grouped per episode first (only the schema's step fields are kept), so memory
    is that of the step fields, not of the images or actions.
    """
    steps: dict[str, list[tuple[Path, int, dict[str, Any]]]] = defaultdict(list)
    for path, i, row in _rows(step_files(out), ["episode_id", *_STEP_KEYS]):
        steps[row.pop("episode_id")].append((path, i, row))
        report.steps += 1
    seen: set[str] = set()
    for path, i, row in _rows(episode_files(out)):
        report.episodes += 1
        episode_id = str(row.get("episode_id"))
        where = f"{path.relative_to(out)} row {i} (episode {episode_id})"
        schema_id = str(row.get("schema_id"))
        if schema_id not in SCHEMA_FILES:
            report.fail("rows", f"{where}: unknown schema id {schema_id!r}", max_errors)
            continue
        report.schema_ids.add(schema_id)
        if episode_id in seen:
            report.fail("rows", f"{where}: duplicate episode id", max_errors)
        seen.add(episode_id)
        own = sorted(steps.get(episode_id, []), key=lambda s: s[2]["step"] if s[2]["step"] is not None else -1)
        record = {k: v for k, v in row.items() if k in _episode_keys(schema_id)}
        if record.get("objects") is None:
            record.pop("objects", None)
        record["steps"] = [s[2] for s in own]
        for err in validate(record, schema_id):
            where_err = where
            m = re.match(r"steps/(\d+)/", err)
            if m and int(m.group(1)) < len(own):
                spath, si, _ = own[int(m.group(1))]
                where_err = (
                    f"{spath.relative_to(out)} row {si} (episode {episode_id}, step {own[int(m.group(1))][2]['step']})"
                )
            report.fail("rows", f"{where_err}: {err}", max_errors)
        if row.get("num_steps") is not None and len(own) != row["num_steps"]:
            report.fail("rows", f"{where}: num_steps is {row['num_steps']} but {len(own)} step rows", max_errors)
    for episode_id in sorted(set(steps) - seen):
        spath, si, _ = steps[episode_id][0]
        report.fail(
            "rows",
            f"{spath.relative_to(out)} row {si}: step rows of episode {episode_id} with no episode row",
            max_errors,
        )
    report.checks.setdefault("rows", "ok")


def _episode_keys(schema_id: str) -> set[str]:
    from ...schemas import load_schema

    return set(load_schema(schema_id)["properties"])


def validate_counts(out: Path, report: ValidationReport, max_errors: int) -> None:
    """The manifest's counts against the rows found."""
    if not manifest_path(out).is_file():
        report.fail("counts", f"{MANIFEST}: missing", max_errors)
        return
    counts = read_manifest(out).get("counts", {})
    for key, found in (("episodes", report.episodes), ("steps", report.steps)):
        if counts.get(key) != found:
            report.fail(
                "counts", f"{MANIFEST}: counts.{key} is {counts.get(key)} but the files hold {found}", max_errors
            )
    report.checks.setdefault("counts", "ok")


def validate_card(out: Path, report: ValidationReport, max_errors: int) -> None:
    """The card: parseable, with a license and the two configs pointing at existing files."""
    path = out / CARD
    if not path.is_file():
        report.fail("card", f"{CARD}: missing (write it with `refine-data card OUT`)", max_errors)
        return
    from huggingface_hub import DatasetCard

    try:
        data = DatasetCard.load(path).data.to_dict()
    except Exception as exc:  # the card parser raises several types for broken YAML
        report.fail("card", f"{CARD}: YAML front matter does not parse: {exc}", max_errors)
        return
    if not data.get("license"):
        report.fail("card", f"{CARD}: no license in the YAML", max_errors)
    configs = {c.get("config_name"): c for c in data.get("configs") or []}
    files = [p.relative_to(out).as_posix() for p in out.rglob("*.parquet") if PRIVATE_DIR not in p.parts]
    for name in ("steps", "episodes"):
        if name not in configs:
            report.fail("card", f"{CARD}: no `{name}` config in the YAML", max_errors)
            continue
        data_files = configs[name].get("data_files") or []
        patterns = [d["path"] if isinstance(d, dict) else d for d in data_files]
        patterns = [p for sub in patterns for p in ([sub] if isinstance(sub, str) else sub)]
        if not any(fnmatch.fnmatch(f, pat) for f in files for pat in patterns):
            report.fail("card", f"{CARD}: config `{name}` data_files {patterns} match no file", max_errors)
    report.checks.setdefault("card", "ok")


def validate_dataset(target: str, *, max_errors: int = 20, revision: str | None = None) -> ValidationReport:
    """Validate a local `OUT/` directory or a Hub dataset repo `ORG/NAME`."""
    local = Path(target)
    if local.is_dir():
        return _validate_dir(local, target, max_errors)
    if REPO_ID.fullmatch(target):
        from .push import hf_api, resolve_token

        # The same client as `push` (HF_ENDPOINT read now, not at import; HF_TOKEN or the saved login).
        api = hf_api(resolve_token())
        with tempfile.TemporaryDirectory(prefix="refinevla-validate-") as tmp:
            try:
                api.snapshot_download(
                    target,
                    repo_type="dataset",
                    revision=revision,
                    local_dir=tmp,
                    allow_patterns=[f"{STEPS_DIR}/*", f"{EPISODES_DIR}/*", CARD, MANIFEST],
                )
            except Exception as exc:  # network, auth, not found: one line for the user
                # The client's messages run over several lines; the first, with the error's type, says what.
                first = (str(exc).strip().splitlines() or [""])[0]
                reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
                raise RefineError(f"{target}: cannot fetch the dataset from the Hub: {reason}") from None
            return _validate_dir(Path(tmp), target, max_errors)
    raise RefineError(f"{target}: neither a directory nor a Hub dataset id ORG/NAME")


def _validate_dir(out: Path, target: str, max_errors: int) -> ValidationReport:
    report = ValidationReport(target)
    if not episode_files(out):
        report.fail("rows", f"{EPISODE_FILES}: no files", max_errors)
    validate_rows(out, report, max_errors)
    validate_counts(out, report, max_errors)
    validate_card(out, report, max_errors)
    return report
