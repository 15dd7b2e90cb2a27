"""`refine-eval report`: one or more results folders as a Markdown table and a bar chart, next to
the published SimplerEnv numbers.

A SimplerEnv task is a few dozen episodes, so a success rate moves by several points from one
episode; every rate is therefore printed with its Wilson 95% interval and its n, so that a
reader compares intervals, not point estimates. The header records everything that changes a
number (checkpoint, backend, simulator assets, package versions) and warns when the runs put
side by side were not measured on the same assets or backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .baselines import Baseline, baseline_suite, load_baselines
from .errors import EvalError
from .libero_names import LIBERO_PRO_SUITES, LIBERO_STANDARD, LIBERO_SUITES, LIBERO_TASKS, libero_base
from .results import EPISODES_FILE, RESULTS_FORMAT, RUN_FILE, read_episodes, read_run
from .suites import WIDOWX_TASKS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AVERAGE = "average"
MARKDOWN_FILE = "report.md"
CHART_FILE = "report.png"
DASH = "–"  # a cell with no number (not reported, or not run)

GOOGLE_SUITES = ("google-vm", "google-va")
WIDOWX_TABLE_ORDER = tuple(WIDOWX_TASKS)  # the published table's order
GOOGLE_TABLE_ORDER = (
    "pick_coke_can",
    "move_near",
    "open_drawer",
    "close_drawer",
    "open_close_drawer",
    "place_apple_in_closed_top_drawer",
)
# The published Google tables report drawers as one task; the run's open/close rows are kept too.
POOLED = {"open_close_drawer": ("open_drawer", "close_drawer")}
# Table order per suite; tasks not listed follow alphabetically, `average` comes last.
TASK_ORDER: dict[str, tuple[str, ...]] = {
    "widowx": WIDOWX_TABLE_ORDER,
    "google-vm": GOOGLE_TABLE_ORDER,
    "google-va": GOOGLE_TABLE_ORDER,
}
# The tasks a suite's `average` is taken over: the published averages' tasks, so that a run's
# average means the same thing as the paper's. Other suites average over every task they ran.
AVERAGED: dict[str, tuple[str, ...]] = {
    "widowx": WIDOWX_TABLE_ORDER,
    "google-vm": ("pick_coke_can", "move_near", "open_close_drawer"),
    "google-va": ("pick_coke_can", "move_near", "open_close_drawer"),
}
SUITE_TITLES = {
    "widowx": "WidowX, visual matching",
    "google-vm": "Google Robot, visual matching",
    "google-va": "Google Robot, variant aggregation",
}
# LIBERO: a section per suite (its tasks SUITE/ID, their average over all the suite's tasks, as papers average
# a suite), and one overview, `libero`: each LIBERO and LIBERO-PRO suite run (its average), the perturbed ones
# under the suite they perturb, and the mean of the four standard suites, as LIBERO papers print it.
LIBERO_OVERVIEW = "libero"
LIBERO_ORDER = tuple(
    s for base in LIBERO_SUITES for s in (base, *(p for p in LIBERO_PRO_SUITES if libero_base(p) == base))
)
for _suite in LIBERO_ORDER:
    TASK_ORDER[_suite] = AVERAGED[_suite] = tuple(
        f"{_suite}/{i}" for i in range(LIBERO_TASKS.get(libero_base(_suite) or _suite, 10))
    )
TASK_ORDER[LIBERO_OVERVIEW] = LIBERO_ORDER
AVERAGED[LIBERO_OVERVIEW] = LIBERO_STANDARD
LIBERO_TITLES = {
    "libero_spatial": "LIBERO-Spatial",
    "libero_object": "LIBERO-Object",
    "libero_goal": "LIBERO-Goal",
    "libero_10": "LIBERO-Long (LIBERO-10)",
    "libero_90": "LIBERO-90",
}
PERTURBATION_TITLES = {
    "swap": "swapped initial positions",
    "object": "other objects",
    "lan": "paraphrased instructions",
    "task": "other tasks",
    "env": "other environments",
}
SUITE_TITLES.update(LIBERO_TITLES)
SUITE_TITLES[LIBERO_OVERVIEW] = "LIBERO and LIBERO-PRO, per suite"
for _suite in LIBERO_PRO_SUITES:
    _base, _kind = _suite.rsplit("_", 1)
    SUITE_TITLES[_suite] = f"LIBERO-PRO: {LIBERO_TITLES[_base]}, {PERTURBATION_TITLES[_kind]}"
SUITE_ORDER = ("widowx", "google-vm", "google-va", LIBERO_OVERVIEW, *LIBERO_ORDER)


@dataclass(frozen=True)
class TaskSummary:
    """One row of a suite's table for one run; rates are fractions in [0, 1].

    For the `average` row, `success_rate` is the unweighted mean of the averaged tasks' rates
    (which differs from successes / trials when the tasks ran different numbers of episodes).
    """

    suite: str  # widowx | google-vm | google-va | maniskill:ENV_ID
    task: str  # a task, a pooled task (open_close_drawer) or `average`
    trials: int  # episodes counted (for `average`: across the averaged tasks)
    successes: int
    success_rate: float
    success_ci: tuple[float, float]  # Wilson 95%
    grasp_trials: int  # episodes that define a grasp (0 where the task has no grasp metric)
    grasps: int | None  # None where the task defines no grasp metric
    grasp_rate: float | None
    grasp_ci: tuple[float, float] | None
    covers: tuple[str, ...] = ()  # pooled / averaged rows: the tasks they are made of
    expected: int = 0  # pooled / averaged rows: how many tasks they should be made of

    @property
    def coverage_note(self) -> str:
        """Why a pooled or averaged row is not what the published one is ("" when it is)."""
        if len(self.covers) >= self.expected:
            return ""
        if self.task == AVERAGE:
            return f"{len(self.covers)} of {self.expected} tasks"
        return f"{' + '.join(self.covers)} only"


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote."""

    markdown: Path
    chart: Path


@dataclass(frozen=True)
class _Run:
    """A results folder as the report shows it: its column label, run.json and summaries."""

    folder: Path
    label: str
    meta: dict[str, Any]
    episodes: int
    summaries: list[TaskSummary]


@dataclass(frozen=True)
class _SuiteView:
    """One suite's table, shared by the Markdown and the chart so the two never disagree."""

    suite: str
    tasks: list[str]
    runs: list[tuple[str, dict[str, TaskSummary]]]  # (label, task -> summary), runs that ran the suite
    models: list[str]  # published models with a number for this suite, in CSV order
    grasp_models: list[str]  # those of them with a published grasp number
    published: dict[tuple[str, str, str], float | None]  # (task, metric, model) -> percent
    sources: list[str]  # the baseline files the numbers came from


# --- statistics ---------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, within [0, 1]; (0.0, 1.0) for no trials.

    Wilson rather than the normal approximation because SimplerEnv rates are often 0% or 100%
    over 24 episodes, where the normal interval collapses to a width of zero.
    """
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"successes={successes}, trials={trials}: need 0 <= successes <= trials")
    if trials == 0:
        return (0.0, 1.0)
    return _wilson(successes / trials, float(trials), z)


def _wilson(rate: float, n: float, z: float) -> tuple[float, float]:
    """Wilson interval for a rate seen over n (possibly effective, non-integer) trials."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1.0 + z * z / n
    centre = (rate + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(rate * (1.0 - rate) / n + z * z / (4.0 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --- summaries ----------------------------------------------------------------------------


def summarise(episodes: Iterable[Mapping[str, Any]]) -> list[TaskSummary]:
    """Per (suite, task) counts, rates and intervals, plus pooled drawers and each suite's average.

    `episodes` are dicts with EpisodeResult's keys (as `read_episodes` returns them). Suites
    come in the order widowx, google-vm, google-va, then the others by name; tasks in the
    published tables' order, unknown ones by name, `average` last.
    """
    by_suite: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for ep in episodes:
        by_suite.setdefault(str(ep["suite"]), {}).setdefault(str(ep["task"]), []).append(ep)
    out: list[TaskSummary] = []
    for suite in _suite_order(by_suite):
        rows = {task: _task_summary(suite, task, eps) for task, eps in by_suite[suite].items()}
        if suite in GOOGLE_SUITES:
            rows.update(_pooled(suite, by_suite[suite]))
        out += [rows[task] for task in _task_order(suite, rows)]
        average = _average(suite, rows)
        if average is not None:
            out.append(average)
    return _with_libero_overview(out)


def _with_libero_overview(rows: list[TaskSummary]) -> list[TaskSummary]:
    """`rows` with the `libero` overview inserted before the LIBERO suites: a row per LIBERO suite run (its
    average, or its one task), then the mean of the standard suites among them."""
    suites = [s for s in LIBERO_ORDER if any(r.suite == s for r in rows)]
    if not suites:
        return rows
    per_suite: dict[str, TaskSummary] = {}
    for suite in suites:
        mine = [r for r in rows if r.suite == suite]
        summary = next((r for r in mine if r.task == AVERAGE), mine[0])
        per_suite[suite] = replace(summary, suite=LIBERO_OVERVIEW, task=suite)
    overview = list(per_suite.values())
    average = _average(LIBERO_OVERVIEW, per_suite)
    overview += [average] if average is not None else []
    first = next(i for i, r in enumerate(rows) if r.suite in suites)
    return rows[:first] + overview + rows[first:]


def _suite_order(suites: Iterable[str]) -> list[str]:
    known = [s for s in SUITE_ORDER if s in suites]
    return known + sorted(s for s in suites if s not in SUITE_ORDER)


def _task_order(suite: str, tasks: Iterable[str]) -> list[str]:
    order = TASK_ORDER.get(suite, ())
    present = [t for t in tasks if t != AVERAGE]
    return [t for t in order if t in present] + sorted(t for t in present if t not in order)


def _task_summary(
    suite: str, task: str, eps: Sequence[Mapping[str, Any]], covers: tuple[str, ...] = (), expected: int = 0
) -> TaskSummary:
    successes = sum(1 for ep in eps if ep["success"])
    graspable = [ep for ep in eps if ep.get("grasp") is not None]
    grasps = sum(1 for ep in graspable if ep["grasp"]) if graspable else None
    return TaskSummary(
        suite=suite,
        task=task,
        trials=len(eps),
        successes=successes,
        success_rate=successes / len(eps),
        success_ci=wilson_interval(successes, len(eps)),
        grasp_trials=len(graspable),
        grasps=grasps,
        grasp_rate=None if grasps is None else grasps / len(graspable),
        grasp_ci=None if grasps is None else wilson_interval(grasps, len(graspable)),
        covers=covers,
        expected=expected,
    )


def _pooled(suite: str, tasks: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, TaskSummary]:
    rows: dict[str, TaskSummary] = {}
    for name, parts in POOLED.items():
        present = tuple(p for p in parts if p in tasks)
        if present and name not in tasks:
            eps = [ep for p in present for ep in tasks[p]]
            rows[name] = _task_summary(suite, name, eps, covers=present, expected=len(parts))
    return rows


def _average(suite: str, rows: Mapping[str, TaskSummary]) -> TaskSummary | None:
    """The mean of the per-task rates, as papers report a suite; None with fewer than 2 tasks.

    Its interval is a Wilson interval at the mean's effective sample size k² / Σ(1/nᵢ) (the n
    for which a single proportion has the mean's binomial variance); with equal nᵢ this is the
    Wilson interval of the pooled episodes.
    """
    wanted = AVERAGED.get(suite) or tuple(sorted(rows))
    present = [rows[t] for t in wanted if t in rows]
    if len(wanted) < 2 or not present:
        return None
    success_rate, success_ci = _mean_rate([(r.success_rate, r.trials) for r in present])
    grasp_rate: float | None = None
    grasp_ci: tuple[float, float] | None = None
    grasps: int | None = None
    if all(r.grasp_rate is not None and r.grasps is not None for r in present):
        grasp_rate, grasp_ci = _mean_rate([(r.grasp_rate or 0.0, r.grasp_trials) for r in present])
        grasps = sum(r.grasps or 0 for r in present)
    return TaskSummary(
        suite=suite,
        task=AVERAGE,
        trials=sum(r.trials for r in present),
        successes=sum(r.successes for r in present),
        success_rate=success_rate,
        success_ci=success_ci,
        grasp_trials=sum(r.grasp_trials for r in present) if grasps is not None else 0,
        grasps=grasps,
        grasp_rate=grasp_rate,
        grasp_ci=grasp_ci,
        covers=tuple(r.task for r in present),
        expected=len(wanted),
    )


def _mean_rate(rates: Sequence[tuple[float, int]]) -> tuple[float, tuple[float, float]]:
    mean = sum(rate for rate, _ in rates) / len(rates)
    n_eff = len(rates) ** 2 / sum(1.0 / n for _, n in rates)
    return mean, _wilson(mean, n_eff, 1.96)


# --- reading results folders ----------------------------------------------------------------


def _load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run.json and the episodes of a results folder, or an EvalError naming what is wrong."""
    if not folder.is_dir():
        raise EvalError(f"{folder}: no such results folder")
    try:
        meta = read_run(folder)
    except ValueError as err:
        raise EvalError(f"{folder / RUN_FILE}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != RESULTS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EvalError(f"{folder / RUN_FILE}: format {found!r}, expected {RESULTS_FORMAT!r}")
    try:
        episodes = read_episodes(folder)
    except ValueError as err:
        raise EvalError(f"{folder / EPISODES_FILE}: not valid JSON lines ({err})") from None
    if not episodes:
        raise EvalError(f"{folder / EPISODES_FILE}: no finished episodes (has the run started?)")
    for number, ep in enumerate(episodes, start=1):
        _check_episode(ep, f"{folder / EPISODES_FILE}: episode {number}")
    return meta, episodes


def _check_episode(ep: Any, where: str) -> None:
    if not isinstance(ep, dict):
        raise EvalError(f"{where}: not a JSON object")
    for key in ("suite", "task"):
        if not isinstance(ep.get(key), str) or not ep[key]:
            raise EvalError(f"{where}: no {key!r} name")
    if not isinstance(ep.get("success"), bool):
        raise EvalError(f"{where}: 'success' is {ep.get('success')!r}, expected true or false")
    if ep.get("grasp") is not None and not isinstance(ep["grasp"], bool):
        raise EvalError(f"{where}: 'grasp' is {ep['grasp']!r}, expected true, false or null")


def _labels(folders: Sequence[Path], metas: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column labels: the policy's name; the folder's name, then a number, added to duplicates."""
    names = [str(_policy(m).get("name") or f.name) for f, m in zip(folders, metas, strict=True)]
    labels = [n if names.count(n) == 1 else f"{n} ({f.name})" for n, f in zip(names, folders, strict=True)]
    seen: dict[str, int] = {}
    out: list[str] = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def _policy(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    policy = meta.get("policy")
    return policy if isinstance(policy, Mapping) else {}


def _assets(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    assets = meta.get("assets")
    return assets if isinstance(assets, Mapping) else {}


# --- the report ------------------------------------------------------------------------------


def write_report(results: Sequence[Path], baselines: Sequence[Path] = (), out: Path | None = None) -> ReportFiles:
    """Write `report.md` and `report.png` for `results` (one column each) into `out`.

    `out` defaults to the first results folder. `baselines` are extra CSVs in the packaged
    format; they add models to the published columns. Raises EvalError for a missing or broken
    results folder, a malformed baselines CSV, or a missing matplotlib.
    """
    if not results:
        raise EvalError("no results folder given")
    loaded = [_load(Path(folder)) for folder in results]
    published = load_baselines(baselines)
    canvas = _matplotlib()  # before writing anything, so a failed report leaves no half of one
    labels = _labels([Path(f) for f in results], [meta for meta, _ in loaded])
    runs = [
        _Run(Path(folder), label, meta, len(eps), summarise(eps))
        for folder, label, (meta, eps) in zip(results, labels, loaded, strict=True)
    ]
    views = [
        _suite_view(suite, runs, published) for suite in _suite_order({s.suite for r in runs for s in r.summaries})
    ]
    target = Path(out) if out is not None else Path(results[0])
    target.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(markdown=target / MARKDOWN_FILE, chart=target / CHART_FILE)
    files.markdown.write_text(_markdown(runs, views), encoding="utf-8")
    _draw(canvas, files.chart, views)
    return files


def _suite_view(suite: str, runs: Sequence[_Run], baselines: Sequence[Baseline]) -> _SuiteView:
    columns = [(r.label, {s.task: s for s in r.summaries if s.suite == suite}) for r in runs]
    columns = [(label, rows) for label, rows in columns if rows]
    tasks = _task_order(suite, {t for _, rows in columns for t in rows})
    if any(AVERAGE in rows for _, rows in columns):
        tasks.append(AVERAGE)
    mine = [b for b in baselines if b.suite == baseline_suite(suite)]
    models = list(dict.fromkeys(b.model for b in mine))
    grasp_models = [
        m for m in models if any(b.model == m and b.metric == "grasp" and b.value is not None for b in mine)
    ]
    return _SuiteView(
        suite=suite,
        tasks=tasks,
        runs=columns,
        models=models,
        grasp_models=grasp_models,
        published={(b.task, b.metric, b.model): b.value for b in mine},
        sources=list(dict.fromkeys(b.source.rsplit(":", 1)[0] for b in mine)),
    )


def _markdown(runs: Sequence[_Run], views: Sequence[_SuiteView]) -> str:
    parts = ["# refine-eval report", "", *_provenance(runs), ""]
    warnings = _comparability_warnings(runs)
    if warnings:
        parts += [*warnings, ""]
    for view in views:
        parts += _suite_section(view)
    return "\n".join(parts).rstrip() + "\n"


def _provenance(runs: Sequence[_Run]) -> list[str]:
    """A transposed table: one column per run, so runs compared are read side by side."""
    fields: list[tuple[str, Callable[[_Run], object]]] = [
        ("results folder", lambda r: f"`{r.folder}`"),
        ("checkpoint", lambda r: f"`{_policy(r.meta).get('path', '?')}`"),
        ("model family", lambda r: _policy(r.meta).get("model_family", "?")),
        ("base model", lambda r: _policy(r.meta).get("base_model", "?")),
        ("reasoning weight λ", lambda r: _policy(r.meta).get("reasoning_weight", DASH)),
        ("suite", lambda r: r.meta.get("suite", "?")),
        ("backend", lambda r: r.meta.get("backend", "?")),
        ("reasoning", lambda r: _on_off(r.meta.get("reasoning"))),
        ("seed", lambda r: r.meta.get("seed", "?")),
        ("assets", _assets_cell),
        ("versions", _versions_cell),
        ("created", lambda r: r.meta.get("created", "?")),
        ("episodes", lambda r: r.episodes),
    ]
    lines = [_table_row(["", *[r.label for r in runs]]), _table_row(["---"] * (len(runs) + 1))]
    for name, cell in fields:
        lines.append(_table_row([name, *[str(DASH if cell(r) is None else cell(r)) for r in runs]]))
    return lines


def _on_off(flag: object) -> str:
    return "on" if flag is True else "off" if flag is False else "?"


def _assets_cell(run: _Run) -> str:
    assets = _assets(run.meta)
    where = f"`{assets['dir']}`" if assets.get("dir") else "none given"
    digest = f"`{assets['digest']}`" if assets.get("digest") else "unknown"
    return f"{where} (digest {digest}, {assets.get('files', '?')} files)"


def _versions_cell(run: _Run) -> str:
    versions = run.meta.get("versions")
    if not isinstance(versions, Mapping) or not versions:
        return "?"
    return ", ".join(f"{pkg} {ver}" for pkg, ver in sorted(versions.items()))


def _comparability_warnings(runs: Sequence[_Run]) -> list[str]:
    """One line per provenance field that differs between runs and changes what a number means."""
    if len(runs) < 2:
        return []
    checks: tuple[tuple[str, Callable[[_Run], object]], ...] = (
        ("simulator assets (digest)", lambda r: _assets(r.meta).get("digest")),
        ("backend", lambda r: r.meta.get("backend")),
    )
    lines = []
    for what, value in checks:
        values = [(r.label, value(r)) for r in runs]
        if len({repr(v) for _, v in values}) > 1:
            each = "; ".join(f"{label}: {v if v is not None else 'unknown'}" for label, v in values)
            lines.append(
                f"> **Warning — not comparable:** the runs differ in {what} ({each}); "
                "a difference between their columns may come from that, not from the policies."
            )
    return lines


def _suite_section(view: _SuiteView) -> list[str]:
    title = SUITE_TITLES.get(view.suite, view.suite)
    grasp_runs = [label for label, rows in view.runs if any(s.grasps is not None for s in rows.values())]
    header = ["task"]
    for label, _ in view.runs:
        header += [f"{label} success"] + ([f"{label} grasp"] if label in grasp_runs else [])
    for model in view.models:
        header += [f"{model} success"] + ([f"{model} grasp"] if model in view.grasp_models else [])
    lines = [f"## {title} (`{view.suite}`)", "", _table_row(header), _table_row(["---"] * len(header))]
    for task in view.tasks:
        cells = [task]
        for label, rows in view.runs:
            summary = rows.get(task)
            cells.append(_success_cell(summary))
            if label in grasp_runs:
                cells.append(_grasp_cell(summary))
        for model in view.models:
            cells.append(_percent(view.published.get((task, "success", model))))
            if model in view.grasp_models:
                cells.append(_percent(view.published.get((task, "grasp", model))))
        lines.append(_table_row(cells))
    return [*lines, "", *_suite_notes(view), ""]


def _success_cell(summary: TaskSummary | None) -> str:
    if summary is None:
        return DASH
    return _rate_cell(summary.success_rate, summary.success_ci, summary.trials, summary.coverage_note)


def _grasp_cell(summary: TaskSummary | None) -> str:
    if summary is None or summary.grasp_rate is None or summary.grasp_ci is None:
        return DASH
    return _rate_cell(summary.grasp_rate, summary.grasp_ci, summary.grasp_trials, summary.coverage_note)


def _rate_cell(rate: float, ci: tuple[float, float], n: int, note: str) -> str:
    extra = f", {note}" if note else ""
    return f"{rate * 100:.1f}% [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}] (n={n}{extra})"


def _percent(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}%"


def _suite_notes(view: _SuiteView) -> list[str]:
    noisy = (
        "LIBERO rates: 50 episodes per task (its fixed initial states), so one episode is 2 points"
        if view.suite == LIBERO_OVERVIEW or view.suite in LIBERO_ORDER
        else "SimplerEnv rates are noisy: one episode of 24 is 4 points"
    )
    notes = [
        f"{noisy}; compare intervals, not point estimates. Intervals are Wilson score 95%; n is the number of episodes."
    ]
    if view.suite in GOOGLE_SUITES:
        notes.append(
            "open_close_drawer pools the open_drawer and close_drawer episodes, as the published tables report "
            "drawers. The published Google averages are the papers' own (not the mean of their task columns)."
        )
    averaged = AVERAGED.get(view.suite)
    if AVERAGE in view.tasks:
        over = ", ".join(averaged) if averaged and len(averaged) <= 6 else f"its {len(averaged or ())} tasks"
        over = over if averaged else "the tasks run"
        notes.append(
            f"average = the unweighted mean of the per-task success rates over {over}; n counts the episodes "
            "it spans and its interval is Wilson at the mean's effective sample size."
        )
    outside = [t for t in view.tasks if averaged and t != AVERAGE and t not in averaged and t not in _pooled_parts()]
    if outside:
        notes.append(f"Not in the average (the published averages leave them out): {', '.join(outside)}.")
    if view.models:
        notes.append(f"Published values (%) from {', '.join(view.sources)}; {DASH} = not reported.")
    else:
        notes.append(f"No published baselines for `{baseline_suite(view.suite)}` (add your own with --baselines).")
    return [f"- {note}" for note in notes]


def _pooled_parts() -> set[str]:
    return {part for parts in POOLED.values() for part in parts}


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# --- the chart -------------------------------------------------------------------------------


def _matplotlib() -> type[Figure]:
    """matplotlib's Figure class, imported here so that `refine-eval --help` stays instant.

    The Figure is drawn on an Agg canvas directly (not through pyplot), so the process's
    global backend and figure registry are left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EvalError("the report's chart needs matplotlib: pip install 'refinevla[sim]'") from None
    return Figure


def _draw(figure_class: type[Figure], path: Path, views: Sequence[_SuiteView]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    groups = max((len(v.tasks) for v in views), default=1)
    bars = max((len(v.runs) + len(v.models) for v in views), default=1)
    width = max(8.0, 0.22 * groups * bars + 4.0)  # ~0.2 in a bar, plus room for the legend
    fig = figure_class(figsize=(width, 3.6 * max(len(views), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(views), 1), 1, squeeze=False)[:, 0]
    for ax, view in zip(axes, views, strict=False):
        _draw_suite(ax, view)
    fig.savefig(path, dpi=120)


def _draw_suite(ax: Axes, view: _SuiteView) -> None:
    """Grouped bars per task: the runs (solid, with CI error bars), then the published models."""
    from matplotlib import colormaps

    series: list[tuple[str, list[float], list[list[float]] | None, Any]] = []
    for i, (label, rows) in enumerate(view.runs):
        rates, ci_bars = _run_bars(view.tasks, rows)
        series.append((label, rates, ci_bars, colormaps["tab10"](i % 10)))
    for j, model in enumerate(view.models):
        heights = [_nan(view.published.get((task, "success", model))) for task in view.tasks]
        series.append((f"{model} (published)", heights, None, colormaps["Set3"](j % 12)))
    width = 0.8 / max(len(series), 1)
    for k, (label, heights, errors, colour) in enumerate(series):
        xs = [t - 0.4 + width * (k + 0.5) for t in range(len(view.tasks))]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=label, color=colour, edgecolor="0.35", linewidth=0.4)
    ax.set_xticks(range(len(view.tasks)), labels=view.tasks, rotation=15, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("success (%)")
    ax.set_title(SUITE_TITLES.get(view.suite, view.suite))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _run_bars(tasks: Sequence[str], rows: Mapping[str, TaskSummary]) -> tuple[list[float], list[list[float]]]:
    """Success % per task and its asymmetric error bars (down, up); NaN where the run lacks it."""
    heights, down, up = [], [], []
    for task in tasks:
        s = rows.get(task)
        rate = math.nan if s is None else s.success_rate * 100
        heights.append(rate)
        down.append(math.nan if s is None else rate - s.success_ci[0] * 100)
        up.append(math.nan if s is None else s.success_ci[1] * 100 - rate)
    return heights, [down, up]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
