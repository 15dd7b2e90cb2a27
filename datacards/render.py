"""Render the dataset card (`OUT/README.md`) of a published refinevla dataset.

The card is generated, never hand-edited: YAML front matter through `huggingface_hub.DatasetCardData`
(so the Hub and `datasets` read it exactly as they read their own), the body from the Jinja2
template next to this module. Everything in it is derived from what is on disk — the manifest
(`refinevla.json`), the Parquet files (statistics computed with polars) and the rationale schema
(the field table comes from the schema's own descriptions) — so a card cannot drift from its data.

License: inherited from the source dataset where it is known (`SOURCE_LICENSES`); otherwise it
must be given (`--license`), or it is kept from the card already in `OUT/` — never guessed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import DEFAULT_SCHEMA_ID, SCHEMA_FILES, load_schema
from ..schemas.dataset_layout import (
    CARD,
    EPISODE_FILES,
    STEP_FILES,
    episode_files,
    manifest_path,
    read_manifest,
    step_files,
)

TEMPLATE = "template.md"


class CardError(ValueError):
    """The card cannot be written as asked (no license known, no manifest...). The message says what to do."""


@dataclass(frozen=True)
class SourceLicense:
    """The license a source dataset is published under, and the sentence that says so in the card."""

    license: str  # Hub license id
    note: str


# Only licenses we know from the source's own publication; anything else needs --license.
SOURCE_LICENSES: dict[str, SourceLicense] = {
    "bridge_orig": SourceLicense("cc-by-4.0", "inherited from BridgeData V2, released under CC BY 4.0."),
    "bridge_dataset": SourceLicense("cc-by-4.0", "inherited from BridgeData V2, released under CC BY 4.0."),
    "refinevla_sample": SourceLicense(
        "apache-2.0", "the embedded sample was generated in ManiSkill3 by the refinevla project (Apache-2.0)."
    ),
}

CITATIONS: dict[str, str] = {
    "bridge": """@inproceedings{walke2023bridgedata,
  title     = {BridgeData V2: A Dataset for Robot Learning at Scale},
  author    = {Walke, Homer and Black, Kevin and Lee, Abraham and Kim, Moo Jin and Du, Max and Zheng, Chongyi and
               Zhao, Tony and Hansen-Estruch, Philippe and Vuong, Quan and He, Andre and Myers, Vivek and
               Fang, Kuan and Finn, Chelsea and Levine, Sergey},
  booktitle = {Conference on Robot Learning (CoRL)},
  year      = {2023}
}""",
    "fractal": """@article{brohan2022rt1,
  title   = {RT-1: Robotics Transformer for Real-World Control at Scale},
  author  = {Brohan, Anthony and others},
  journal = {arXiv preprint arXiv:2212.06817},
  year    = {2022}
}""",
    "refinevla": """@article{refinevla2025,
  title   = {ReFineVLA: Reasoning-Aware Teacher-Guided Transfer Fine-Tuning},
  journal = {arXiv preprint arXiv:2505.19080},
  year    = {2025},
  url     = {https://arxiv.org/abs/2505.19080}
}""",
    "ecot": """@article{zawalski2024ecot,
  title   = {Robotic Control via Embodied Chain-of-Thought Reasoning},
  author  = {Zawalski, Micha{\\l} and Chen, William and Pertsch, Karl and Mees, Oier and Finn, Chelsea and
             Levine, Sergey},
  journal = {arXiv preprint arXiv:2407.08693},
  year    = {2024}
}""",
}

# Columns that are not schema properties: described here, once.
OTHER_FIELDS: dict[str, tuple[str, str]] = {
    "episode_id": ("refinevla", "Stable id of the source episode; joins `steps` and `episodes`."),
    "instruction": ("source", "The natural-language task of the episode, as stored in the source dataset."),
    "action": ("source", "The 7-d action of the step, in the source dataset's convention."),
    "state": ("source", "The 7-d proprio state [x, y, z, roll, pitch, yaw, gripper] of the step."),
    "dataset": ("refinevla", "Name of the source dataset the episode was read from."),
    "request_key": (
        "refinevla",
        "Hash of everything that determined the answer (data, frames, prompt, schema, model).",
    ),
    "teacher": ("refinevla", "Teacher backend that wrote the rationale."),
    "model": ("refinevla", "Model id of the teacher."),
    "attempts": ("refinevla", "Answers received for the episode (the first ask plus re-asks with errors)."),
}

SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket for a row count."""
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def _cell(text: Any) -> str:
    """A value safe inside one Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def short_type(t: pa.DataType) -> str:
    """A compact, readable Arrow type (`list<float32>[7]`, `list<struct{subtask, reason, ...}>`)."""
    if pa.types.is_fixed_size_list(t):
        return f"list<{short_type(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{short_type(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct{" + ", ".join(t.field(i).name for i in range(t.num_fields)) + "}"
    if pa.types.is_large_string(t):
        return "string"
    return str(t)


def _parquet_schema(files: list[Path]) -> pa.Schema | None:
    return pq.read_schema(files[0]) if files else None


def field_rows(schema_id: str, arrow: pa.Schema | None, level: str, teacher_label: str) -> list[dict[str, str]]:
    """The field table of one config: every column with its type, who wrote it and the schema's description.

    `level` is "steps" (descriptions from the schema's `$defs/step`) or "episodes" (the root properties).
    Columns are listed in file order; without files, in schema order.
    """
    schema = load_schema(schema_id)
    if level == "steps":
        props = schema["$defs"]["step"]["properties"]
        sources = {"move": "refinevla", "gripper": "refinevla", "step": "refinevla"}
        default_source = f"refinevla (from the {teacher_label} plan and move reasons)"
    else:
        props = {k: v for k, v in schema["properties"].items() if k != "steps"}
        sources = {k: str(v.get("x-refinevla-source", "refinevla")) for k, v in props.items()}
        default_source = "refinevla"
    names = arrow.names if arrow is not None else list(props)
    rows = []
    for name in names:
        if name in props:
            source = sources.get(name, default_source)
            if source == "teacher":
                source = teacher_label
            desc = props[name].get("description", "")
        elif name in OTHER_FIELDS:
            source, desc = OTHER_FIELDS[name]
        else:
            source, desc = "extra", "Not part of the schema (see the note below)."
        typ = short_type(arrow.field(name).type) if arrow is not None else "—"
        rows.append({"name": name, "type": typ, "source": _cell(source), "description": _cell(desc)})
    return rows


def _request_schema_cell(schema: dict[str, Any]) -> str:
    """How the structured-output schema of the requests was derived (`--schema-detail`)."""
    detail, backend = schema.get("request_detail"), schema.get("request_backend")
    if not detail:
        return "—"
    what = (
        "each request's schema carried its episode's facts (step range, one move reason per motion segment, "
        "box within the keyframe)"
        if detail == "episode"
        else "one schema for every request, with the constraints the backend enforces"
    )
    return f"`{detail}` for the `{backend}` structured-output subset: {what}"


def prompt_template_text(version: str | None, sha256: str | None) -> tuple[str | None, str | None]:
    """(full text, note) of the prompt template a run used, read from the installed package.

    The text is shown only if its sha256 is the one the manifest recorded: an installed template
    that differs from the one used must not be passed off as the prompt of this data.
    """
    if not version:
        return None, None
    try:
        text = (resources.files("refinevla.annotate.prompts") / f"{version}.txt").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return None, f"template `{version}` is not in this installation of refinevla"
    if sha256 and hashlib.sha256(text.encode()).hexdigest() != sha256:
        return None, f"the installed template `{version}` differs from the one used (sha256 {sha256[:12]}…)"
    return text.rstrip(), None


def statistics(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts and distributions computed from the Parquet files with polars (manifest for tokens/cost)."""
    import polars as pl

    step_parts, episode_parts = step_files(out_dir), episode_files(out_dir)
    steps = pl.concat([pl.read_parquet(f, columns=["episode_id", "move"]) for f in step_parts]) if step_parts else None
    episodes = pl.concat([pl.read_parquet(f, columns=["task_plan"]) for f in episode_parts]) if episode_parts else None
    n_steps = steps.height if steps is not None else 0
    n_episodes = episodes.height if episodes is not None else 0
    stats: dict[str, Any] = {"episodes": n_episodes, "steps": n_steps, "primitives": []}
    if steps is not None and n_steps:
        per = steps.group_by("episode_id").len()["len"]
        stats["steps_per_episode"] = (float(per.mean()), int(per.min()), int(per.max()))  # type: ignore[arg-type]
        counts = steps["move"].value_counts(sort=True)
        for move, count in counts.head(12).iter_rows():
            stats["primitives"].append({"move": move, "count": count, "share": f"{100 * count / n_steps:.1f}%"})
        rest = n_steps - sum(p["count"] for p in stats["primitives"])
        if rest:
            stats["primitives"].append({"move": "(other)", "count": rest, "share": f"{100 * rest / n_steps:.1f}%"})
    if episodes is not None and n_episodes:
        sub = episodes["task_plan"].list.len()
        stats["subtasks_per_episode"] = (float(sub.mean()), int(sub.min()), int(sub.max()))  # type: ignore[arg-type]
    return stats


def sample_rationale(out_dir: Path, max_steps: int = 10) -> dict[str, Any] | None:
    """The first episode's rationale and a few of its steps (evenly spaced), for the card."""
    import polars as pl

    episode_parts, step_parts = episode_files(out_dir), step_files(out_dir)
    if not episode_parts:
        return None
    episodes = pl.read_parquet(episode_parts[0], n_rows=1)
    if episodes.height == 0:
        return None
    ep = episodes.row(0, named=True)
    steps: list[dict[str, Any]] = []
    if step_parts:
        cols = ["episode_id", "step", "subtask", "move", "gripper", "move_reason"]
        rows = pl.scan_parquet(step_parts).filter(pl.col("episode_id") == ep["episode_id"]).select(cols).collect()
        rows = rows.sort("step")
        if rows.height > max_steps:
            picks = sorted({round(i * (rows.height - 1) / (max_steps - 1)) for i in range(max_steps)})
            rows = rows[picks]
        steps = [{k: _cell(v) for k, v in r.items()} for r in rows.to_dicts()]
    return {
        "episode_id": _cell(ep["episode_id"]),
        "instruction": _cell(ep["instruction"]),
        "num_steps": ep["num_steps"],
        "observation": _cell(ep["observation"]),
        "situation_analysis": _cell(ep["situation_analysis"]),
        "spatial_reasoning": _cell(ep["spatial_reasoning"]),
        "task_plan": ep["task_plan"] or [],
        "steps": steps,
    }


def resolve_license(out_dir: Path, manifest: dict[str, Any], explicit: str | None) -> tuple[str, str | None]:
    """(license id, note): --license, else the license of the card already in OUT, else the source's.

    An import whose reasoning comes from a third party (Embodied-CoT) has no known license of its own
    and always needs one of the first two.
    """
    if explicit:
        return explicit, "given by the publisher (--license)."
    existing = out_dir / CARD
    if existing.is_file():
        from huggingface_hub import DatasetCard

        card_license = DatasetCard.load(existing).data.get("license")
        if card_license:
            return str(card_license), "as recorded in this dataset's card."
    dataset = manifest.get("source", {}).get("dataset")
    third_party = manifest.get("teacher", {}).get("name") == "embodied-cot"
    if dataset in SOURCE_LICENSES and not third_party:
        known = SOURCE_LICENSES[dataset]
        return known.license, known.note
    what = "Embodied-CoT's reasoning" if third_party else f"source dataset {dataset!r}"
    raise CardError(
        f"the license of {what} is not known to refinevla; pass --license ID (a Hub license id, e.g. cc-by-4.0)"
    )


def _citations(manifest: dict[str, Any]) -> list[str]:
    dataset = str(manifest.get("source", {}).get("dataset", ""))
    keys = []
    if dataset.startswith("bridge"):
        keys.append("bridge")
    elif dataset.startswith("fractal"):
        keys.append("fractal")
    keys += ["refinevla", "ecot"]
    return [CITATIONS[k] for k in keys]


def _layout_cell(layout: Any) -> str:
    """The source features a dataset was read from (state, cameras, ...); "—" for a manifest from before they
    were recorded."""
    if not isinstance(layout, dict):
        return "—"
    state = ", ".join(f"`{k}`" for k in layout.get("state") or [])
    if layout.get("state_transform"):
        state += f" (converted: `{layout['state_transform']}`)"
    cameras = ", ".join(f"`{k}`" for k in layout.get("cameras") or [])
    action = ", ".join(f"`{k}`" for k in layout.get("action") or [])
    return _cell(f"state {state or '—'}; cameras {cameras or '—'}; action {action or '—'}")


def card_context(out_dir: Path, manifest: dict[str, Any], license_id: str, license_note: str | None) -> dict[str, Any]:
    """Everything the template needs, computed from the files in `out_dir`."""
    source = manifest.get("source", {})
    teacher = manifest.get("teacher", {})
    counts = manifest.get("counts", {})
    tokens = manifest.get("tokens", {})
    schema_id = manifest.get("schema", {}).get("id", DEFAULT_SCHEMA_ID)
    prompt = manifest.get("prompt") or {}
    dataset = source.get("dataset", "unknown")
    imported = teacher.get("name") == "embodied-cot"
    teacher_label = "Embodied-CoT" if imported else "teacher"

    stats = statistics(out_dir, manifest)
    prompt_text, prompt_note = prompt_template_text(prompt.get("template"), prompt.get("sha256"))

    def span(v: Any) -> str:
        return f"{v[0]:.1f} mean, {v[1]} min, {v[2]} max" if v else "—"

    sampling = teacher.get("sampling")
    provenance = [
        ("source", f"`{source.get('uri', dataset)}` (dataset `{dataset}`, split `{source.get('split', 'train')}`)"),
        ("features read", _layout_cell(source.get("layout"))),
        ("declared", _cell(json.dumps(source["declared"], sort_keys=True)) if source.get("declared") else "—"),
        ("selection", _cell(json.dumps(manifest["selection"])) if manifest.get("selection") else "—"),
        ("teacher", f"`{teacher.get('name', 'unknown')}`"),
        ("model", f"`{teacher.get('model', 'unknown')}`"),
        ("sampling parameters", f"`{_cell(json.dumps(sampling, sort_keys=True))}`" if sampling else "—"),
        (
            "prompt template",
            f"`{prompt['template']}` (sha256 `{prompt.get('sha256', '?')}`)" if prompt.get("template") else "none",
        ),
        ("schema", f"`{schema_id}` (sha256 `{manifest.get('schema', {}).get('sha256', '?')}`)"),
        ("request schema", _request_schema_cell(manifest.get("schema", {}))),
        ("refinevla version", f"`{manifest.get('refinevla_version', 'unknown')}`"),
        ("date", manifest.get("created", "unknown")),
    ]
    if prompt_note:
        provenance.append(("prompt text", _cell(prompt_note)))
    if teacher.get("note"):
        provenance.append(("note", _cell(teacher["note"])))
    if manifest.get("import"):
        provenance.append(("import report", _cell(json.dumps(manifest["import"], sort_keys=True))))
    batch = manifest.get("batch")
    if isinstance(batch, dict):
        provenance.append(
            (
                "pricing",
                f"`{batch.get('provider', '?')}` Batch API at batch prices (re-asks: {batch.get('reask', 'batch')})",
            )
        )

    cost = manifest.get("cost_usd")
    statistics_rows = [
        ("episodes", f"{stats['episodes']:,}"),
        ("steps", f"{stats['steps']:,}"),
        ("steps per episode", span(stats.get("steps_per_episode"))),
        ("subtasks per episode", span(stats.get("subtasks_per_episode"))),
        ("teacher requests", f"{tokens.get('requests', 0):,}"),
        ("prompt tokens", f"{tokens.get('prompt', 0):,}"),
        ("completion tokens", f"{tokens.get('completion', 0):,}"),
        (
            "cost (USD)",
            (f"{cost:.4f}" + (" (batch prices)" if isinstance(batch, dict) else ""))
            if isinstance(cost, int | float)
            else "not tracked",
        ),
        ("rejected episodes", f"{counts.get('rejected', 0):,}"),
    ]
    reasons = sorted((counts.get("reject_reasons") or {}).items(), key=lambda kv: -kv[1])

    written_by_model = bool(teacher.get("written_by_model", True))
    if imported:
        summary = (
            f"Embodied-CoT's published reasoning for `{dataset}` converted to refinevla's rationale schema "
            f"`{schema_id}`: per-episode task plans with step ranges and per-step subtasks, moves, move reasons "
            "and gripper states. The reasoning was written by the Embodied-CoT authors' pipeline, not by refinevla."
        )
    else:
        summary = (
            f"Robot episodes from `{dataset}` annotated with ReFineVLA-style rationales (observation, situation "
            f"analysis, spatial reasoning, task plan) aligned to every step as in Embodied-CoT, following the schema "
            f"`{schema_id}`. Written by `{teacher.get('name', '?')}` (`{teacher.get('model', '?')}`) and validated "
            "against the schema and semantic checks; motion primitives and gripper states are computed from proprio."
        )
    limitations = [
        "The rationales are machine-generated: they can be wrong about the scene even when they pass validation "
        "(the schema and the semantic checks hold them against the trajectory, not against the pixels).",
        "Motion primitives follow Embodied-CoT's rule on proprio deltas and inherit its dead zones and window.",
        "Episodes whose answers failed validation after re-asks are left out (see the rejects above), which can "
        "bias the data toward easier episodes.",
    ]
    if not written_by_model:
        note = str(teacher.get("note") or "no model wrote these rationales")
        limitations.insert(0, note[:1].upper() + note[1:].rstrip(".") + ".")
    extra_note = None
    step_schema = _parquet_schema(step_files(out_dir))
    if step_schema is not None and any(n.startswith("ecot_") for n in step_schema.names):
        extra_note = (
            "Columns prefixed `ecot_` carry Embodied-CoT features kept as published (gripper pixel position, "
            "per-step object boxes); they are outside the rationale schema."
        )
    return {
        "n_steps": stats["steps"],
        "title": f"{dataset} with ReFineVLA rationales" if not imported else f"{dataset} with Embodied-CoT reasoning",
        "summary": summary,
        "written_by_model": written_by_model,
        "teacher_note": _cell(teacher.get("note", "")),
        "load_path": str(out_dir),
        "schema_id": schema_id,
        "schema_file": SCHEMA_FILES.get(schema_id, "?"),
        "step_files": STEP_FILES,
        "episode_files": EPISODE_FILES,
        "step_fields": field_rows(schema_id, step_schema, "steps", teacher_label),
        "episode_fields": field_rows(schema_id, _parquet_schema(episode_files(out_dir)), "episodes", teacher_label),
        "extra_fields_note": extra_note,
        "provenance": provenance,
        "prompt_text": prompt_text,
        "prompt_version": prompt.get("template"),
        "statistics": statistics_rows,
        "primitives": stats["primitives"],
        "reject_reasons": reasons,
        "sample": sample_rationale(out_dir),
        "limitations": limitations,
        "license_id": license_id,
        "license_note": license_note,
        "citations": _citations(manifest),
    }


def card_data(manifest: dict[str, Any], license_id: str, steps: int) -> Any:
    """The YAML front matter: license, task categories, tags, provenance keys and the two configs."""
    from huggingface_hub import DatasetCardData

    dataset = str(manifest.get("source", {}).get("dataset", "unknown"))
    tags = ["refinevla", "reasoning", "vision-language-action", dataset]
    if manifest.get("teacher", {}).get("name") == "embodied-cot":
        tags.append("embodied-cot")
    return DatasetCardData(
        license=license_id,
        task_categories=["robotics"],
        tags=tags,
        annotations_creators=["machine-generated"],
        source_datasets=[dataset],
        size_categories=[size_category(steps)],
        pretty_name=f"{dataset} rationales",
        configs=[
            {
                "config_name": "steps",
                "data_files": [{"split": "train", "path": STEP_FILES}],
                "default": True,
            },
            {"config_name": "episodes", "data_files": [{"split": "train", "path": EPISODE_FILES}]},
        ],
    )


def render_card(out_dir: str | Path, *, license: str | None = None, repo_id: str | None = None) -> Any:
    """The card of `out_dir` as a `huggingface_hub.DatasetCard` (not written).

    With `repo_id` (at push time) the loading example names the Hub repo instead of the local dir.
    """
    from huggingface_hub import DatasetCard

    out = Path(out_dir)
    path = manifest_path(out)
    if not path.is_file():
        raise CardError(f"{path}: no manifest; is {out} the output of `refine-data annotate` or `import-ecot`?")
    manifest = read_manifest(out)
    license_id, note = resolve_license(out, manifest, license)
    context = card_context(out, manifest, license_id, note)
    if repo_id:
        context["load_path"] = repo_id
    data = card_data(manifest, license_id, context["n_steps"])
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return DatasetCard.from_template(data, template_str=template, **context)


def write_card(out_dir: Path, *, license: str | None = None) -> Path:
    """Write `out_dir/README.md` (atomically) and return its path.

    Called at the end of every `annotate` run and by `refine-data card OUT`. Raises `CardError`
    when the license is not known and not given.
    """
    import os

    out = Path(out_dir)
    card = render_card(out, license=license)
    path: Path = out / CARD
    tmp = path.with_name(f".{CARD}.partial")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return path
