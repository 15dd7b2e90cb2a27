"""`refine-data pilot`: several teachers on the same few episodes, audited and priced side by side.

A user about to annotate a whole source (BridgeData V2: 60k episodes) picks a teacher, a model and a
prompt once and pays for the choice on every episode. The pilot makes the choice on a sample: each
teacher annotates the same N episodes (`annotate --sample N`: spread evenly over the source, the same
on every run) into `DIR/<label>/`, a normal annotate output (its own lock, store, resume and
`--max-cost`), so a rerun pays nothing twice and a teacher that failed halfway resumes. Then one
comparison: the audit's numbers (`annotate.audit`), how the teacher answered (valid on first answer,
re-asks, rejects, tokens, latency from the store), what it cost per episode and what the whole source
would cost live and through the Batch API, and, between teachers, how far their plans and boxes agree.

What the numbers do not say: a pilot measures this sample of this source. Agreement between two
teachers is not correctness; the audit's truth-based numbers are the ones that are.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..schemas.dataset_layout import PRIVATE_DIR
from .commands.batch import BATCH_TEACHERS
from .errors import RefineError
from .teachers import TEACHERS


@dataclass(frozen=True)
class TeacherSpec:
    """One `--teacher TEACHER[:MODEL][@BASE_URL]` of a pilot, and the folder it annotates into."""

    teacher: str
    model: str | None
    base_url: str | None
    label: str


def parse_teacher_spec(spec: str) -> tuple[str, str | None, str | None]:
    """TEACHER[:MODEL][@BASE_URL] -> (teacher, model, base_url); one line when it does not parse.

    The URL is split off first (it holds colons of its own); the model is everything after the first
    colon of the rest (model ids such as `llama3:8b` keep theirs).
    """
    head, at, url = spec.strip().partition("@")
    teacher, colon, model = head.partition(":")
    if teacher not in TEACHERS:
        raise RefineError(
            f"--teacher {spec!r}: expected TEACHER[:MODEL][@BASE_URL] with TEACHER one of {', '.join(TEACHERS)}"
        )
    if (colon and not model) or (at and not url):
        raise RefineError(
            f"--teacher {spec!r}: an empty {'model' if colon and not model else 'base URL'} after {colon or at!r}"
        )
    if at and not re.match(r"^https?://", url):
        raise RefineError(f"--teacher {spec!r}: the base URL must start with http:// or https://")
    return teacher, model or None, url or None


def teacher_specs(specs: list[str]) -> list[TeacherSpec]:
    """The pilot's teachers with a unique folder label each (`openai-gpt-4.1-mini`, `rule-based`, ...)."""
    if not specs:
        raise RefineError("--teacher: give at least one teacher to pilot (repeat the flag to compare several)")
    out: list[TeacherSpec] = []
    used: set[str] = set()
    for spec in specs:
        teacher, model, url = parse_teacher_spec(spec)
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{teacher}-{model}" if model else teacher).strip("-")
        label, k = base, 2
        while label in used:
            label, k = f"{base}-{k}", k + 1
        used.add(label)
        out.append(TeacherSpec(teacher, model, url, label))
    return out


@dataclass
class TeacherStats:
    """How a teacher answered, read from its output's store (every attempt, rejected episodes' included)."""

    episodes: int = 0  # settled: answered or rejected
    answered: int = 0
    rejected: int = 0
    first_valid: int = 0  # answered with the first answer
    asks: int = 0  # answers received (attempts stored)
    asked_episodes: int = 0  # episodes with at least one answer stored (re-asks = asks - these)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = self.episodes
        lat = np.asarray(self.latencies, dtype=np.float64)
        return {
            "settled": n,
            "answered": self.answered,
            "rejected": self.rejected,
            "valid_first_rate": self.first_valid / n if n else None,
            "reasks_per_episode": (self.asks - self.asked_episodes) / n if n else None,
            "rejects_per_episode": self.rejected / n if n else None,
            "prompt_tokens_per_episode": self.prompt_tokens / n if n else None,
            "completion_tokens_per_episode": self.completion_tokens / n if n else None,
            "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else None,
            "cost_usd": round(self.cost, 6),
            "cost_per_episode": self.cost / n if n else None,
        }


def read_teacher_stats(out: Path) -> TeacherStats:
    """The stats of an annotate output's store (empty when the teacher answered nothing yet)."""
    db = out / PRIVATE_DIR / "store.sqlite"
    stats = TeacherStats()
    if not db.is_file():
        return stats
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        answers = conn.execute("SELECT attempts FROM answers").fetchall()
        rejects = conn.execute("SELECT attempts FROM rejects").fetchall()
        stats.answered, stats.rejected = len(answers), len(rejects)
        stats.episodes = stats.answered + stats.rejected
        stats.first_valid = sum(1 for (a,) in answers if a == 1)
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost), 0), COUNT(DISTINCT key) FROM attempts"
        ).fetchone()
        stats.asks, stats.prompt_tokens, stats.completion_tokens = int(row[0]), int(row[1]), int(row[2])
        stats.cost, stats.asked_episodes = float(row[3]), int(row[4])
        stats.latencies = [float(x) for (x,) in conn.execute("SELECT latency FROM attempts WHERE latency IS NOT NULL")]
    return stats


# --------------------------------------------------------------------------- agreement between teachers


def boundary_f1(a: list[int], b: list[int], tolerance: int) -> float | None:
    """F1 of two teachers' subtask boundaries, each counted as matched when the other has one within
    ±tolerance steps (precision of a against b, recall of b against a); None when neither has any."""
    from .audit.metrics import count_within

    if not a and not b:
        return None
    if not a or not b:
        return 0.0
    p = count_within(a, sorted(b), tolerance) / len(a)
    r = count_within(b, sorted(a), tolerance) / len(b)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def objects_iou(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> list[float]:
    """IoU of the boxes of the objects both teachers named (matched by name as the audit matches them)."""
    from .audit.metrics import box_iou
    from .audit.names import assign

    if not a or not b:
        return []
    pairs = assign([str(o["name"]) for o in a], [str(o["name"]) for o in b])  # b index -> a index
    return [box_iou(tuple(a[i]["box"]), tuple(b[j]["box"])) for j, i in pairs.items()]


def agreement(a: list[dict[str, Any]], b: list[dict[str, Any]], tolerance: int) -> dict[str, Any]:
    """Mean boundary F1 and box IoU of two teachers over the episodes both answered."""
    from .audit.metrics import teacher_boundaries

    by_id = {str(row["episode_id"]): row for row in b}
    f1s: list[float] = []
    ious: list[float] = []
    common = 0
    for row in a:
        other = by_id.get(str(row["episode_id"]))
        if other is None:
            continue
        common += 1
        f1 = boundary_f1(
            teacher_boundaries(row.get("task_plan") or []), teacher_boundaries(other.get("task_plan") or []), tolerance
        )
        if f1 is not None:
            f1s.append(f1)
        ious += objects_iou(row.get("objects"), other.get("objects"))
    return {
        "episodes": common,
        "boundary_f1": float(np.mean(f1s)) if f1s else None,
        "box_iou": float(np.mean(ious)) if ious else None,
        "boxes_compared": len(ious),
    }


# --------------------------------------------------------------------------- projection


def projected_cost(
    teacher: str, model: str | None, stats: dict[str, Any], source_episodes: int, prices: Any
) -> dict[str, Any]:
    """What the whole source would cost at the pilot's tokens per episode: live, and through the Batch API
    where the teacher has one (its table's batch prices). None where the model has no price."""
    price = prices.get(model) if model else None
    n = source_episodes
    p_in, p_out = stats.get("prompt_tokens_per_episode"), stats.get("completion_tokens_per_episode")
    if teacher == "rule-based":
        return {"source_episodes": n, "live_usd": 0.0, "batch_usd": None}
    if price is None or p_in is None or p_out is None:
        return {"source_episodes": n, "live_usd": None, "batch_usd": None}
    tokens_in, tokens_out = round(p_in * n), round(p_out * n)
    live = prices.cost(model, tokens_in, tokens_out)
    batch = prices.cost(model, tokens_in, tokens_out, batch=True) if teacher in BATCH_TEACHERS else None
    return {"source_episodes": n, "live_usd": round(live, 2), "batch_usd": None if batch is None else round(batch, 2)}


# --------------------------------------------------------------------------- the pilot


PILOT_SHARED = (  # annotate's flags a pilot takes once and gives every teacher
    "source",
    "data_dir",
    "split",
    "camera",
    "instruction_key",
    "state_key",
    "action_key",
    "frames",
    "image_size",
    "prompt_template",
    "concurrency",
    "rpm",
    "tpm",
    "timeout",
    "max_attempts",
    "max_retries",
    "retry_base",
    "max_cost",
    "temperature",
    "max_tokens",
    "prices",
    "tensor_parallel_size",
    "license",
    "schema_detail",
)


@dataclass
class PilotRun:
    """One teacher's part of a pilot: its spec, folder, annotate exit code and numbers."""

    spec: TeacherSpec
    out: Path
    exit_code: int
    stats: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    projection: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "label": self.spec.label,
            "teacher": self.spec.teacher,
            "model": self.spec.model,
            "base_url": self.spec.base_url,
            "out": str(self.out),
            "exit_code": self.exit_code,
            **self.stats,
            "audit": self.audit,
            "projection": self.projection,
        }


def teacher_args(shared: dict[str, Any], spec: TeacherSpec, out: Path, episodes: int, **extra: Any) -> Any:
    """The AnnotateArgs of one teacher's run: the shared flags, its teacher, `--sample N` into DIR/<label>."""
    from .part import AnnotateArgs

    argv = ["annotate", shared["source"], "--teacher", spec.teacher, "--out", str(out / spec.label)]
    argv += ["--sample", str(episodes)]
    argv += [
        *(["--model", spec.model] if spec.model else []),
        *(["--base-url", spec.base_url] if spec.base_url else []),
    ]
    return AnnotateArgs(
        **shared,
        teacher=spec.teacher,
        model=spec.model,
        base_url=spec.base_url,
        out=out / spec.label,
        sample=episodes,
        argv=argv,
        **extra,
    )


def run_pilot(
    shared: dict[str, Any],
    specs: list[TeacherSpec],
    episodes: int,
    out: Path,
    *,
    truth: Path | None = None,
    tolerance: int = 2,
    progress: str = "auto",
) -> tuple[list[PilotRun], dict[str, Any]]:
    """Annotate the sample with each teacher in turn, then audit, price and compare them."""
    from .audit import audit_output
    from .commands.annotate import run_annotate
    from .part import AnnotateArgs
    from .pricing import PriceTable
    from .source_args import open_cli_source

    if episodes < 1:
        raise RefineError(f"--episodes {episodes}: must be at least 1")
    source_episodes = len(open_cli_source(*AnnotateArgs(**shared).source_args()))
    if episodes > source_episodes:
        raise RefineError(f"--episodes {episodes}: the source holds only {source_episodes} episode(s)")
    prices = PriceTable.load(shared.get("prices"))
    runs: list[PilotRun] = []
    for spec in specs:
        print(f"pilot: {spec.label} on {episodes} episode(s) -> {out / spec.label}", flush=True)
        error = None
        try:
            code = run_annotate(teacher_args(shared, spec, out, episodes, progress=progress))
        except RefineError as exc:  # this teacher cannot run (no key, unreachable, ...): the others still do
            print(f"pilot: {spec.label}: {exc}", file=sys.stderr, flush=True)
            code, error = 1, str(exc)
        if code == 130:  # Ctrl-C: the annotate run said how to resume; the pilot's rerun resumes them all
            raise KeyboardInterrupt
        run = PilotRun(spec, out / spec.label, code)
        run.stats = read_teacher_stats(run.out).summary()
        try:
            run.audit = audit_output(str(run.out), truth=truth, tolerance=tolerance).summary
        except RefineError as exc:  # nothing answered (every episode rejected): the table says so
            run.audit = {"error": error or str(exc)}
        run.projection = projected_cost(
            spec.teacher, spec.model or _model_of(run.out), run.stats, source_episodes, prices
        )
        runs.append(run)
    pairs = _agreements(runs, tolerance)
    summary = {
        "source": shared["source"],
        "source_episodes": source_episodes,
        "episodes": episodes,
        "truth": None if truth is None else str(truth),
        "tolerance": tolerance,
        "teachers": [r.row() for r in runs],
        "agreement": pairs,
    }
    return runs, summary


def _model_of(out: Path) -> str | None:
    """The model the run's manifest names (the teacher's default when the spec named none)."""
    from ..schemas.dataset_layout import read_manifest

    try:
        return (read_manifest(out).get("teacher") or {}).get("model")
    except (FileNotFoundError, ValueError):
        return None


def _agreements(runs: list[PilotRun], tolerance: int) -> list[dict[str, Any]]:
    from .audit import read_output

    rows: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        try:
            rows[run.spec.label] = read_output(str(run.out)).episodes
        except RefineError:
            rows[run.spec.label] = []
    out: list[dict[str, Any]] = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            out.append(
                {"a": a.spec.label, "b": b.spec.label, **agreement(rows[a.spec.label], rows[b.spec.label], tolerance)}
            )
    return out
