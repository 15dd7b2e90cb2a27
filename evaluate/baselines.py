"""Published SimplerEnv numbers to put next to a run's: the packaged CSV plus the user's own.

The CSV format is one number per line — `suite,task,metric,model,value` — so a paper's table
can be typed in by hand and a missing cell is just an empty `value`. Lines starting with `#`
are comments (the packaged file names its sources in one). Values are percentages, as papers
print them. A user's `--baselines` file adds models; it never replaces a packaged number,
because a silently overridden reference row would make two reports of the same run disagree.
"""

from __future__ import annotations

import csv
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EvalError

COLUMNS = ("suite", "task", "metric", "model", "value")
METRICS = ("success", "grasp")
PACKAGED = ("simplerenv_baselines.csv", "libero_baselines.csv")  # SimplerEnv's, LIBERO's (never in one table)

# The run's suite name -> the CSV's. ManiSkill suites map to themselves: nothing is packaged
# for them, but a user's CSV may carry rows for `maniskill:ENV_ID`.
CSV_SUITES = {"widowx": "widowx_vm", "google-vm": "google_vm", "google-va": "google_va"}


@dataclass(frozen=True)
class Baseline:
    """One published number: `value` is a percentage, None where the paper reports none."""

    suite: str  # the CSV's suite: widowx_vm | google_vm | google_va | maniskill:ENV_ID
    task: str  # carrot_on_plate, open_close_drawer, average, ...
    metric: str  # success | grasp
    model: str  # the column label in the report (RT-1-X, OpenVLA, ...)
    value: float | None  # percent; None = not reported
    source: str = ""  # `file:line` it was read from, for error messages and the report's footnote


def baseline_suite(suite: str) -> str:
    """The CSV suite holding the published numbers for a run's `suite`."""
    return CSV_SUITES.get(suite, suite)


def load_baselines(extra: Sequence[Path] = ()) -> list[Baseline]:
    """The packaged baselines followed by each of `extra`'s, in file order.

    Raises EvalError naming `file:line` for a missing column, a short row, an unknown metric,
    a value that is not a percentage, or a row that repeats one already loaded.
    """
    rows: list[Baseline] = []
    for name in PACKAGED:
        rows += _parse((importlib.resources.files("refinevla.evaluate") / name).read_text(encoding="utf-8"), name)
    for path in extra:
        rows += _parse(_read(path), str(path))
    _reject_duplicates(rows)
    return rows


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such baselines file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: cannot read baselines file ({err})") from None


def _parse(text: str, name: str) -> list[Baseline]:
    """Rows of one CSV; line numbers count comment and blank lines so they match an editor's."""
    header: list[str] | None = None
    rows: list[Baseline] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([line]))]
        where = f"{name}:{lineno}"
        if header is None:
            header = _check_header(fields, where)
            continue
        rows.append(_row(dict(zip(header, fields, strict=False)), len(fields), len(header), where))
    if header is None:
        raise EvalError(f"{name}: empty baselines file (expected the header {','.join(COLUMNS)})")
    return rows


def _check_header(fields: list[str], where: str) -> list[str]:
    missing = [c for c in COLUMNS if c not in fields]
    if missing:
        raise EvalError(f"{where}: header lacks column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})")
    return fields


def _row(cells: dict[str, str], got: int, want: int, where: str) -> Baseline:
    if got != want:
        raise EvalError(f"{where}: {got} fields, the header has {want}")
    for col in ("suite", "task", "metric", "model"):
        if not cells[col]:
            raise EvalError(f"{where}: empty {col}")
    if cells["metric"] not in METRICS:
        raise EvalError(f"{where}: metric {cells['metric']!r} is not one of {', '.join(METRICS)}")
    return Baseline(
        cells["suite"], cells["task"], cells["metric"], cells["model"], _percent(cells["value"], where), where
    )


def _percent(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise EvalError(f"{where}: value {text!r} is not a number (a percentage, or empty = not reported)") from None
    if not 0.0 <= value <= 100.0:
        # a fraction (0.477) typed for a percentage (47.7) would otherwise plot as ~0%
        raise EvalError(f"{where}: value {text} is outside 0..100 (values are percentages)")
    return value


def _reject_duplicates(rows: list[Baseline]) -> None:
    seen: dict[tuple[str, str, str, str], str] = {}
    for row in rows:
        key = (row.suite, row.task, row.metric, row.model)
        if key in seen:
            raise EvalError(
                f"{row.source}: {row.model} {row.suite}/{row.task} {row.metric} is already given at {seen[key]} "
                "(extra baselines add models, never replace; give yours another model name)"
            )
        seen[key] = row.source
