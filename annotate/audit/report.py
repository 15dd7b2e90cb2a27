"""The audit's files and its terminal table.

`REPORT_DIR/`:
- `audit.md`: the summary, the worst episodes, and a histogram per metric (a PNG drawn with matplotlib
  when it is installed — it is not a core dependency: `pip install matplotlib`, or the `[sim]` extra, as for
  `refine-eval report` — and always a text histogram, so the core install writes a complete report);
- `audit.json`: the summary and the rejected episodes;
- `episodes.parquet`: one row per episode, every metric, `score` and `rank` (1 = worst), in rank order,
  so the worst are the first rows (`refine-data view OUT --episodes worst:N` shows them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics
from .run import AuditResult
from .score import EpisodeAudit, episode_columns

if TYPE_CHECKING:
    from rich.console import Console

EPISODES_FILE = "episodes.parquet"
SUMMARY_FILE = "audit.json"
MARKDOWN_FILE = "audit.md"
CHARTS_DIR = "histograms"
WORST_SHOWN = 20  # episodes listed in audit.md (all of them are in episodes.parquet)


@dataclass(frozen=True)
class Metric:
    """A per-episode metric as the report shows it."""

    name: str  # the EpisodeAudit field
    title: str
    rate: bool  # in [0, 1] (bins over [0, 1]); else counts/steps (bins over the values' range)
    truth: bool = False  # measured only with --truth


METRICS = (
    Metric("event_recall", "gripper-event recall", True),
    Metric("boundary_precision", "boundary precision (events + motion segments)", True),
    Metric("grounding", "instruction grounding", True),
    Metric("large_box_rate", "large boxes (share of the episode's boxes)", True),
    Metric("attempts", "attempts per episode", False),
    Metric("score", "combined score (0 best, 1 worst)", True),
    Metric("box_iou_mean", "box IoU (mean over named task objects)", True, truth=True),
    Metric("object_recall", "object recall", True, truth=True),
    Metric("hallucinated", "hallucinated objects", False, truth=True),
    Metric("truth_event_recall", "grasp/release recall", True, truth=True),
    Metric("grasp_error", "grasp timing error (steps)", False, truth=True),
    Metric("release_error", "release timing error (steps)", False, truth=True),
    Metric("truth_boundary_precision", "boundary precision (expert legs)", True, truth=True),
)

# The summary's rows on the terminal and in audit.md: (key, label).
SUMMARY_ROWS = (
    ("episodes", "episodes"),
    ("rejected", "rejected"),
    ("event_recall", "gripper-event recall"),
    ("boundary_precision", "boundary precision"),
    ("grounding", "instruction grounding"),
    ("duplicate_rate", "near-duplicate rate"),
    ("duplicate_observation_rate", "near-duplicate observations"),
    ("duplicate_plan_rate", "near-duplicate task plans"),
    ("large_box_rate", "large boxes"),
    ("first_answer_valid_rate", "valid on first answer"),
    ("reasks", "re-asks"),
    ("tokens", "tokens"),
    ("cost_usd", "cost (USD)"),
    ("cost_per_episode", "cost per episode (USD)"),
    ("box_iou_mean", "box IoU (mean)"),
    ("box_iou50_rate", "boxes with IoU >= 0.5"),
    ("object_recall", "object recall"),
    ("hallucinated_per_episode", "hallucinated objects per episode"),
    ("truth_event_recall", "grasp/release recall"),
    ("grasp_error_mean", "grasp timing error (steps)"),
    ("release_error_mean", "release timing error (steps)"),
    ("truth_boundary_precision", "boundary precision (expert legs)"),
)
_RATES = {
    "event_recall",
    "boundary_precision",
    "grounding",
    "duplicate_rate",
    "duplicate_observation_rate",
    "duplicate_plan_rate",
    "large_box_rate",
    "first_answer_valid_rate",
    "box_iou50_rate",
    "object_recall",
    "truth_event_recall",
    "truth_boundary_precision",
}


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    markdown: Path
    summary: Path
    episodes: Path
    charts: list[Path]  # empty without matplotlib
    charts_note: str | None  # why there are no charts


def format_value(key: str, value: Any) -> str:
    """A summary value as the table shows it: rates as %, None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in _RATES:
        return f"{100 * float(value):.1f}%"
    if isinstance(value, float):
        return f"{value:.4f}" if "cost" in key else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) for each summary row the audit measured (the truth rows only with --truth)."""
    return [(label, format_value(key, summary[key])) for key, label in SUMMARY_ROWS if key in summary]


def default_report_dir(result: AuditResult) -> Path:
    """OUT/.refine/audit for a local output: beside what it scored, in the private folder that is never
    uploaded (the dataset's published files stay untouched); ./audit-<NAME> for a Hub dataset, whose
    local copy is the download cache's."""
    from ...schemas.dataset_layout import PRIVATE_DIR
    from .read import output_label

    if result.output.local:
        return result.output.root / PRIVATE_DIR / "audit"
    return Path(f"audit-{output_label(result.output)}")


def write_report(result: AuditResult, folder: Path | None = None) -> ReportFiles:
    """Write audit.md, audit.json, episodes.parquet (and the histograms) into `folder` (default:
    `default_report_dir`)."""
    import polars as pl

    folder = folder if folder is not None else default_report_dir(result)
    folder.mkdir(parents=True, exist_ok=True)
    with_truth = result.truth_dir is not None
    table = pl.DataFrame([a.row() for a in result.episodes], schema=_episode_schema(), orient="row")
    episodes_path = folder / EPISODES_FILE
    table.write_parquet(episodes_path)
    summary_path = folder / SUMMARY_FILE
    rejects = [{"episode_id": k, "reason": v} for k, v in sorted(result.output.rejects.items())]
    summary_path.write_text(
        json.dumps({"summary": result.summary, "rejects": rejects}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    shown = [m for m in METRICS if with_truth or not m.truth]
    charts, note = _draw_histograms(folder / CHARTS_DIR, result.episodes, shown)
    markdown = folder / MARKDOWN_FILE
    markdown.write_text(_markdown(result, shown, folder, charts, note), encoding="utf-8")
    return ReportFiles(folder, markdown, summary_path, episodes_path, charts, note)


def _episode_schema() -> dict[str, Any]:
    import polars as pl

    types: dict[str, Any] = {
        "episode_id": pl.String,
        "instruction": pl.String,
        "first_answer_valid": pl.Boolean,
        "duplicate_observation": pl.Boolean,
        "duplicate_plan": pl.Boolean,
        "duplicate": pl.Boolean,
        "cost_usd": pl.Float64,
        "score": pl.Float64,
    }
    floats = {m.name for m in METRICS if m.rate} | {"box_iou_mean"}
    return {c: types.get(c, pl.Float64 if c in floats else pl.Int64) for c in episode_columns()}


def _values(audits: Sequence[EpisodeAudit], name: str) -> list[float]:
    return [float(v) for a in audits if (v := getattr(a, name)) is not None]


def _draw_histograms(
    folder: Path, audits: Sequence[EpisodeAudit], shown: Sequence[Metric]
) -> tuple[list[Path], str | None]:
    """One PNG per metric with values, drawn on an Agg canvas (no pyplot: the process's backend and figure
    registry are left alone, as `refine-eval report` draws); ([], why) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return (
            [],
            "no charts: matplotlib is not installed (pip install matplotlib); the text histograms below say the same",
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in shown:
        values = _values(audits, m.name)
        if not values:
            continue
        bins = metrics.histogram(values, lo=0.0 if m.rate else None, hi=1.0 if m.rate else None)
        fig = Figure(figsize=(5.0, 2.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.bar(
            [lo for lo, _, _ in bins],
            [c for _, _, c in bins],
            width=[hi - lo for lo, hi, _ in bins],
            align="edge",
            color="tab:blue",
            edgecolor="0.35",
            linewidth=0.4,
        )
        ax.set_title(m.title)
        ax.set_ylabel("episodes")
        ax.grid(axis="y", alpha=0.3)
        path = folder / f"{m.name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths, None


def _text_histogram(bins: list[tuple[float, float, int]], rate: bool) -> list[str]:
    top = max((c for _, _, c in bins), default=0) or 1
    lines = ["| bin | episodes | |", "|---|---:|---|"]
    for lo, hi, count in bins:
        label = f"{lo:.1f}–{hi:.1f}" if rate else f"{lo:.3g}–{hi:.3g}"
        lines.append(f"| {label} | {count} | {'█' * round(20 * count / top)} |")
    return lines


def _markdown(result: AuditResult, shown: Sequence[Metric], folder: Path, charts: list[Path], note: str | None) -> str:
    s = result.summary
    lines = [
        f"# Audit of `{s['output']}`",
        "",
        f"Teacher `{s['teacher']}` (`{s['model']}`), tolerance ±{s['tolerance']} steps"
        + (
            f", truth `{s['truth']}`"
            if s.get("truth")
            else ", no truth (`--truth DEMOS_DIR` adds boxes, names and the expert's phases)"
        )
        + ".",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in summary_rows(s)),
        "",
    ]
    if s.get("keyframe_size_assumed"):
        lines += [
            f"Large boxes are measured against a {s['keyframe_size'][0]}×{s['keyframe_size'][1]} first keyframe (the "
            "manifest's `frames.max_side`, square): pass `--frame-size WxH` (the source frames' size) when they are "
            "smaller or not square.",
            "",
        ]
    lines += [
        f"## The {min(WORST_SHOWN, len(result.episodes))} worst episodes (all in `{EPISODES_FILE}`, by `rank`)",
        "",
    ]
    lines += _worst_table(result.episodes[:WORST_SHOWN], result.truth_dir is not None)
    lines += ["", "## Histograms", ""]
    if note:
        lines += [f"_{note}_", ""]
    chart_names = {p.stem: p for p in charts}
    for m in shown:
        values = _values(result.episodes, m.name)
        lines += [f"### {m.title}", "", f"{len(values)} episodes measured.", ""]
        if not values:
            continue
        if m.name in chart_names:
            lines += [f"![{m.title}]({chart_names[m.name].relative_to(folder).as_posix()})", ""]
        lines += _text_histogram(
            metrics.histogram(values, lo=0.0 if m.rate else None, hi=1.0 if m.rate else None), m.rate
        )
        lines.append("")
    lines += ["## Definitions", "", *DEFINITIONS, ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


ID_CHARS = 28  # an episode id's characters in the terminal's worst table
WORST_COLUMNS = (
    "rank",
    "episode_id",
    "score",
    "event_recall",
    "boundary_precision",
    "grounding",
    "duplicate",
    "large_boxes",
)
WORST_TRUTH_COLUMNS = ("box_iou_mean", "object_recall", "hallucinated", "truth_event_recall")


# the worst episodes' table's column titles (short: the terminal is narrow)
SHORT_TITLES = {
    "episode_id": "episode",
    "event_recall": "events",
    "boundary_precision": "bounds",
    "grounding": "nouns",
    "duplicate": "dup",
    "large_boxes": "large",
    "box_iou_mean": "IoU",
    "object_recall": "objects",
    "hallucinated": "halluc.",
    "truth_event_recall": "grasp/rel.",
}


def worst_rows(audits: Sequence[EpisodeAudit], with_truth: bool) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the worst episodes' table."""
    columns = [*WORST_COLUMNS, *(WORST_TRUTH_COLUMNS if with_truth else ())]
    header = [SHORT_TITLES.get(c, c) for c in columns]
    return header, [[_cell(getattr(a, c)) for c in columns] for a in audits]


def _worst_table(audits: Sequence[EpisodeAudit], with_truth: bool) -> list[str]:
    header, rows = worst_rows(audits, with_truth)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
    ]


def print_tables(console: Console, result: AuditResult, worst: int = 10) -> None:
    """The summary and the worst episodes as rich tables."""
    from rich.table import Table

    summary = Table(title=f"refine-data audit: {result.summary['output']}", show_header=False)
    for label, value in summary_rows(result.summary):
        summary.add_row(label, value)
    console.print(summary)
    header, rows = worst_rows(result.episodes[:worst], result.truth_dir is not None)
    table = Table(title=f"worst {len(rows)} episodes (full ids in episodes.parquet)")
    at = WORST_COLUMNS.index("episode_id")
    for k, name in enumerate(header):
        table.add_column(name, overflow="fold", no_wrap=k == at, min_width=ID_CHARS if k == at else None)
    for row in rows:
        table.add_row(*row[:at], short_id(row[at]), *row[at + 1 :])
    console.print(table)


def short_id(episode_id: str, keep: int = ID_CHARS) -> str:
    """An episode id cut to its last `keep` characters (where ids differ: the file, the index), so the
    worst table stays readable in a terminal; the files keep the full ids."""
    return episode_id if len(episode_id) <= keep else "…" + episode_id[-(keep - 1) :]


DEFINITIONS = (
    "- **teacher boundaries**: the `start_step` of every `task_plan` subtask after the first, sorted, deduplicated.",
    "- **gripper events**: the steps where the gripper closes or opens, recomputed from the stored states "
    "(`annotate.primitives.gripper_events`, the events the prompt gave the teacher); **motion-segment changes**: "
    "the first step of every motion segment after the first (`annotate.primitives.motion_segments`).",
    "- **within ±K**: |a − b| ≤ K (`--tolerance`, default 2).",
    "- **gripper-event recall**: events with a teacher boundary within ±K / events.",
    "- **boundary precision**: teacher boundaries within ±K of an event or a motion-segment change / teacher "
    "boundaries.",
    "- **instruction grounding**: the instruction's object nouns (lowercase, singular, synonyms merged; stopwords, "
    "verbs, place words dropped, colours dropped before a noun: `annotate/audit/names.py`) found in the observation "
    "or the objects' names / the instruction's nouns.",
    "- **near-duplicate**: an episode whose observation, or task plan (subtasks and reasons), equals another "
    "episode's after normalisation (lowercase; digits and punctuation dropped; whitespace collapsed), or after also "
    "removing each episode's own instruction words (one template filled with each instruction). Exact matches of "
    "normalised texts: O(n).",
    "- **large box**: a box over 50% of the first keyframe's area.",
    "- **valid on first answer**: attempts = 1; **re-asks**: attempts − 1; tokens and cost from the output's "
    "store (`.refine/store*.sqlite`, rejected episodes included), else the manifest's totals.",
    "- **box IoU** (truth): each task object the teacher named (name matching: the truth name's head noun among "
    "the teacher name's words, singular, synonyms merged; shared colours break ties; one-to-one), its box against "
    "the truth box scaled to the keyframe the teacher saw; **IoU ≥ 0.5 rate** over those boxes.",
    "- **object recall** (truth): task objects named / task objects; **hallucinated**: the teacher's objects that "
    "match no object of the scene (the robot, gripper and table are always there).",
    "- **grasp/release recall** (truth): the expert's grasp and release steps with a teacher boundary within ±K; "
    "**timing error**: steps to the nearest teacher boundary; **boundary precision (expert legs)**: teacher "
    "boundaries within ±K of a leg boundary.",
    "- **score** (the rank): the mean of the measured penalties, each in [0, 1]: 1 − event recall, 1 − boundary "
    "precision, 1 − grounding, duplicate (0/1), large-box share; with truth also 1 − box IoU, 1 − object recall, "
    "hallucinated share of the teacher's objects, 1 − grasp/release recall, 1 − leg boundary precision. Rank 1 is "
    "the highest score (ties: episode id).",
    "- **summary numbers** pool counts over episodes (sums, then the ratio), so an episode weighs by what it has to "
    "measure; timing errors are means over the episodes that have the event.",
)
