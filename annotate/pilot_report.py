"""The pilot's comparison: a table per teacher (terminal and `DIR/pilot.md`), a chart, `DIR/pilot.json`.

One row per teacher; the columns are what a user choosing a teacher weighs: is it right (the audit's
numbers), does it answer (valid on first answer, re-asks, rejects, latency), what does it cost (per
episode, and the whole source live and through the Batch API).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (key in the teacher's row or its audit, column title, format)
Column = tuple[str, str, Callable[[Any], str]]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.0f}%"


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def _int(v: Any) -> str:
    return "-" if v is None else f"{float(v):,.0f}"


def _usd(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"${v:,.2f}" if v >= 1 or v == 0 else f"${v:.4f}"


def _secs(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}s"


COLUMNS: list[Column] = [
    ("settled", "episodes", _int),
    ("event_recall", "event recall", _pct),
    ("boundary_precision", "boundary prec.", _pct),
    ("grounding", "grounding", _pct),
    ("duplicate_rate", "duplicates", _pct),
    ("valid_first_rate", "valid 1st", _pct),
    ("reasks_per_episode", "re-asks/ep", _num),
    ("rejects_per_episode", "rejects/ep", _num),
    ("prompt_tokens_per_episode", "tokens in/ep", _int),
    ("completion_tokens_per_episode", "tokens out/ep", _int),
    ("latency_p50_s", "p50", _secs),
    ("latency_p95_s", "p95", _secs),
    ("cost_per_episode", "$/ep", _usd),
    ("live_usd", "source live", _usd),
    ("batch_usd", "source batch", _usd),
]
TRUTH_COLUMNS: list[Column] = [
    ("box_iou_mean", "box IoU", _num),
    ("box_iou50_rate", "IoU>=.5", _pct),
    ("object_recall", "obj. recall", _pct),
    ("hallucinated_per_episode", "halluc./ep", _num),
]
CHARTED = ("event_recall", "boundary_precision", "valid_first_rate", "box_iou_mean", "object_recall")


def value(row: dict[str, Any], key: str) -> Any:
    """A column's value: the teacher's own stats first, then its audit, then its projection."""
    for where in (row, row.get("audit") or {}, row.get("projection") or {}):
        if key in where:
            return where[key]
    return None


def table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison: one column per teacher, one row per measure (it stays readable
    in a terminal however many measures there are)."""
    measures = COLUMNS[:5] + (TRUTH_COLUMNS if summary.get("truth") else []) + COLUMNS[5:]
    teachers = summary["teachers"]
    header = ["", *(t["label"] for t in teachers)]
    rows = [[title, *(fmt(value(t, key)) for t in teachers)] for key, title, fmt in measures]
    return header, rows


def markdown(summary: dict[str, Any], chart: Path | None) -> str:
    header, rows = table(summary)
    lines = [
        f"# Teacher pilot: {summary['episodes']} episode(s) of {summary['source']}",
        "",
        f"The same {summary['episodes']} episodes (spread evenly over the source's {summary['source_episodes']:,}) "
        f"annotated by each teacher; boundaries count within ±{summary['tolerance']} steps. "
        + (
            f"Boxes and phases scored against the simulator's truth in `{summary['truth']}`."
            if summary["truth"]
            else ""
        )
        + " `source live` / `source batch`: the whole source at the pilot's tokens per episode, at the price "
        "table's live and Batch API prices (first asks and re-asks as measured here).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    failed = [t for t in summary["teachers"] if t["exit_code"] or (t.get("audit") or {}).get("error")]
    for t in failed:
        why = (t.get("audit") or {}).get("error") or f"annotate exited {t['exit_code']} (some episodes not settled)"
        lines.append(f"- **{t['label']}**: {why}")
    if summary["agreement"]:
        lines += [
            "",
            "## Agreement between teachers",
            "",
            "| a | b | episodes | boundary F1 | box IoU |",
            "|---|---|---:|---:|---:|",
        ]
        for p in summary["agreement"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['episodes']} | {_num(p['boundary_f1'])} | {_num(p['box_iou'])} |")
        lines += ["", "Agreement is not correctness: two teachers can agree on the same mistake."]
    if chart is not None:
        lines += ["", f"![metrics per teacher]({chart.name})"]
    return "\n".join(lines) + "\n"


def draw_chart(summary: dict[str, Any], path: Path) -> Path | None:
    """A grouped bar chart of the rates per teacher (Agg canvas); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    teachers = summary["teachers"]
    shown = [k for k in CHARTED if any(value(t, k) is not None for t in teachers)]
    if not shown or not teachers:
        return None
    fig = Figure(figsize=(1.6 + 1.4 * len(shown), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(teachers)
    for i, t in enumerate(teachers):
        xs = [k + i * width for k in range(len(shown))]
        ax.bar(xs, [float(value(t, k) or 0.0) for k in shown], width=width, label=t["label"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shown))], [k.replace("_", " ") for k in shown])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def write_pilot_report(summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """DIR/pilot.md (+ pilot.png) and DIR/pilot.json."""
    chart = draw_chart(summary, out / "pilot.png")
    md = out / "pilot.md"
    md.write_text(markdown(summary, chart), encoding="utf-8")
    js = out / "pilot.json"
    js.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return md, js
