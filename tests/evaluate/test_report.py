"""`refine-eval report`: rates and Wilson intervals, pooled drawers, averages, the Markdown next to
the published numbers, extra baselines, comparability warnings and the chart.

Results folders are written with the runner's own `EpisodeLog` / `write_run`, so the report
reads exactly what a run leaves behind.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from refinevla.evaluate.baselines import Baseline, load_baselines
from refinevla.evaluate.errors import EvalError
from refinevla.evaluate.report import TaskSummary, summarise, wilson_interval, write_report
from refinevla.evaluate.results import RESULTS_FORMAT, EpisodeLog, EpisodeResult, read_episodes, write_run

# (suite, task) -> (successes, grasps or None, trials)
Outcomes = Mapping[tuple[str, str], tuple[int, int | None, int]]

WIDOWX: Outcomes = {
    ("widowx", "spoon_on_towel"): (3, 10, 24),
    ("widowx", "carrot_on_plate"): (9, 15, 24),
    ("widowx", "stack_green_on_yellow"): (0, 4, 24),
    ("widowx", "eggplant_in_basket"): (12, 20, 24),
}
GOOGLE: Outcomes = {
    ("google-vm", "pick_coke_can"): (6, None, 10),
    ("google-vm", "move_near"): (2, None, 8),
    ("google-vm", "open_drawer"): (3, None, 6),
    ("google-vm", "close_drawer"): (5, None, 8),
}


def make_results(
    folder: Path, outcomes: Outcomes, name: str = "ckpt", digest: str | None = "abc123", backend: str = "maniskill3"
) -> Path:
    """A results folder with `successes` of `trials` successful episodes (the first ones) per task."""
    suites = sorted({suite for suite, _ in outcomes})
    write_run(
        folder,
        {
            "format": RESULTS_FORMAT,
            "policy": {
                "path": f"/ckpts/{name}",
                "name": name,
                "model_family": "paligemma",
                "base_model": "google/paligemma-3b-pt-224",
                "reasoning_weight": 0.5,
            },
            "suite": suites[0] if suites else "widowx",
            "backend": backend,
            "reasoning": True,
            "seed": 7,
            "versions": {"mani_skill": "3.0.0", "torch": "2.5.1"},
            "assets": {"dir": "/assets/simpler", "digest": digest, "files": 42},
            "created": "2026-12-02T09:00:00+00:00",
        },
    )
    log = EpisodeLog(folder)
    for (suite, task), (successes, grasps, trials) in outcomes.items():
        for i in range(trials):
            grasp = None if grasps is None else i < grasps
            log.append(episode(suite, task, i, success=i < successes, grasp=grasp))
    return folder


def episode(suite: str, task: str, i: int, success: bool, grasp: bool | None) -> EpisodeResult:
    return EpisodeResult(
        suite=suite,
        task=task,
        env_id=f"{task}-v1",
        config=i // 2,
        repeat=i % 2,
        seed=i,
        instruction=task.replace("_", " "),
        success=success,
        success_once=success,
        grasp=grasp,
        grasped_once=grasp,
        steps=60,
        wall_s=1.5,
    )


def by_task(summaries: Sequence[TaskSummary], suite: str) -> dict[str, TaskSummary]:
    return {s.task: s for s in summaries if s.suite == suite}


def table(markdown: str, title: str) -> list[list[str]]:
    """The cells of the table that follows the `## title` heading (header row first)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and title in line)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return [rows[0], *rows[2:]]


def cell(rows: list[list[str]], task: str, column: str) -> str:
    header = rows[0]
    row = next(r for r in rows[1:] if r[0] == task)
    return row[header.index(column)]


# --- Wilson ---------------------------------------------------------------------------------


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(0, 24)
    assert lo == 0.0 and hi == pytest.approx(0.1380, abs=1e-4)
    assert wilson_interval(12, 24) == pytest.approx((0.3143, 0.6857), abs=1e-4)
    lo, hi = wilson_interval(24, 24)
    assert lo == pytest.approx(0.8620, abs=1e-4) and hi == 1.0
    assert wilson_interval(9, 24) == pytest.approx((0.2116, 0.5729), abs=1e-4)


def test_wilson_interval_without_trials_is_everything_and_bad_counts_are_refused():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_wilson_interval_narrows_with_more_trials_and_stays_in_unit_range():
    widths = [hi - lo for lo, hi in (wilson_interval(n // 3, n) for n in (6, 24, 96, 384))]
    assert widths == sorted(widths, reverse=True)
    for k in range(0, 11):
        lo, hi = wilson_interval(k, 10)
        assert 0.0 <= lo <= k / 10 <= hi <= 1.0


# --- summaries ------------------------------------------------------------------------------


def test_summarise_counts_rates_grasps_and_the_average(tmp_path: Path):
    rows = by_task(summarise(read_episodes(make_results(tmp_path / "r", WIDOWX))), "widowx")
    assert list(rows) == ["spoon_on_towel", "carrot_on_plate", "stack_green_on_yellow", "eggplant_in_basket", "average"]
    carrot = rows["carrot_on_plate"]
    assert (carrot.trials, carrot.successes, carrot.grasps, carrot.grasp_trials) == (24, 9, 15, 24)
    assert carrot.success_rate == pytest.approx(0.375)
    assert carrot.success_ci == pytest.approx(wilson_interval(9, 24))
    assert carrot.grasp_rate == pytest.approx(15 / 24)
    avg = rows["average"]
    assert avg.success_rate == pytest.approx((3 + 9 + 0 + 12) / 96)
    assert avg.grasp_rate == pytest.approx((10 + 15 + 4 + 20) / 96)
    assert (avg.trials, avg.successes, avg.coverage_note) == (96, 24, "")
    # equal n per task: the average's interval is the pooled episodes' Wilson interval
    assert avg.success_ci == pytest.approx(wilson_interval(24, 96))


def test_average_is_the_mean_of_task_rates_and_says_when_tasks_are_missing(tmp_path: Path):
    outcomes = {("widowx", "carrot_on_plate"): (6, 6, 12), ("widowx", "spoon_on_towel"): (0, 0, 48)}
    avg = by_task(summarise(read_episodes(make_results(tmp_path / "r", outcomes))), "widowx")["average"]
    assert avg.success_rate == pytest.approx((0.5 + 0.0) / 2)  # not 6 / 60, the pooled rate
    assert avg.coverage_note == "2 of 4 tasks"
    lo, hi = avg.success_ci
    assert lo < 0.25 < hi


def test_tasks_without_grasp_metric_have_no_grasp_and_drawers_are_pooled(tmp_path: Path):
    rows = by_task(summarise(read_episodes(make_results(tmp_path / "r", GOOGLE))), "google-vm")
    assert all(s.grasps is None and s.grasp_rate is None and s.grasp_ci is None for s in rows.values())
    assert list(rows) == ["pick_coke_can", "move_near", "open_drawer", "close_drawer", "open_close_drawer", "average"]
    drawers = rows["open_close_drawer"]
    assert (drawers.trials, drawers.successes) == (14, 8)
    assert drawers.covers == ("open_drawer", "close_drawer") and drawers.coverage_note == ""
    assert (rows["open_drawer"].trials, rows["close_drawer"].successes) == (6, 5)
    # the Google average is over the published tasks: the pooled drawer, not its two halves
    assert rows["average"].covers == ("pick_coke_can", "move_near", "open_close_drawer")
    assert rows["average"].success_rate == pytest.approx((6 / 10 + 2 / 8 + 8 / 14) / 3)


def test_a_lone_drawer_task_is_pooled_with_a_note(tmp_path: Path):
    rows = by_task(
        summarise(read_episodes(make_results(tmp_path / "r", {("google-va", "open_drawer"): (1, None, 4)}))),
        "google-va",
    )
    assert rows["open_close_drawer"].coverage_note == "open_drawer only"
    assert rows["average"].coverage_note == "1 of 3 tasks"


# --- baselines ------------------------------------------------------------------------------


def test_packaged_baselines_load_with_published_values():
    rows = load_baselines()
    index = {(b.suite, b.task, b.metric, b.model): b.value for b in rows}
    assert index[("widowx_vm", "carrot_on_plate", "grasp", "OpenVLA")] == 33.3
    assert index[("google_vm", "open_close_drawer", "success", "RT-1-converged")] == 73.0
    assert index[("widowx_vm", "average", "success", "ReFineVLA")] == 47.7
    assert {b.metric for b in rows} == {"success", "grasp"}
    # SimplerEnv's numbers and LIBERO's come from their own files, under suites that never meet
    libero = {b.suite for b in rows if b.source.startswith("libero_baselines.csv:")}
    simpler = {b.suite for b in rows if b.source.startswith("simplerenv_baselines.csv:")}
    assert libero == {"libero"} and simpler and not libero & simpler
    assert index[("libero", "libero_spatial", "success", "OpenVLA (OpenVLA paper)")] == 84.7
    assert index[("libero", "average", "success", "pi0.5 (openpi README)")] == 96.85


def test_extra_baselines_add_rows_and_empty_value_is_not_reported(tmp_path: Path):
    extra = tmp_path / "mine.csv"
    extra.write_text(
        "# my lab's numbers\nsuite,task,metric,model,value\n"
        "widowx_vm,carrot_on_plate,success,MyVLA,41.7\nwidowx_vm,carrot_on_plate,grasp,MyVLA,\n"
    )
    rows = load_baselines([extra])
    assert len(rows) == len(load_baselines()) + 2
    assert rows[-2] == Baseline("widowx_vm", "carrot_on_plate", "success", "MyVLA", 41.7, f"{extra}:3")
    assert rows[-1].value is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("suite,task,metric,model\nwidowx_vm,x,success,M\n", ":1: header lacks column(s) value"),
        (
            "# c\nsuite,task,metric,model,value\nwidowx_vm,x,success,M,1\nwidowx_vm,x,success,N,lots\n",
            ":4: value 'lots'",
        ),
        ("suite,task,metric,model,value\nwidowx_vm,x,succes,M,1\n", ":2: metric 'succes'"),
        ("suite,task,metric,model,value\nwidowx_vm,x,success,M,0.5,extra\n", ":2: 6 fields"),
        ("suite,task,metric,model,value\nwidowx_vm,x,success,M,250\n", ":2: value 250 is outside 0..100"),
        ("suite,task,metric,model,value\nwidowx_vm,carrot_on_plate,grasp,OpenVLA,50\n", ":2: OpenVLA"),
    ],
)
def test_malformed_baselines_csv_names_file_and_line(tmp_path: Path, text: str, message: str):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(EvalError, match=r"bad.csv") as err:
        load_baselines([bad])
    assert f"{bad}{message}" in str(err.value)


def test_missing_baselines_file_is_an_eval_error(tmp_path: Path):
    with pytest.raises(EvalError, match=r"nope.csv: no such baselines file"):
        load_baselines([tmp_path / "nope.csv"])


# --- the Markdown ---------------------------------------------------------------------------


def test_markdown_has_the_runs_numbers_next_to_the_published_ones(tmp_path: Path):
    results = make_results(tmp_path / "r", WIDOWX, name="refine-l0.5")
    files = write_report([results])
    assert files.markdown == results / "report.md" and files.chart == results / "report.png"
    md = files.markdown.read_text()
    assert "`/ckpts/refine-l0.5`" in md and "paligemma" in md and "maniskill3" in md
    assert "`/assets/simpler` (digest `abc123`, 42 files)" in md and "mani_skill 3.0.0, torch 2.5.1" in md
    assert "not comparable" not in md
    rows = table(md, "WidowX")
    assert cell(rows, "carrot_on_plate", "refine-l0.5 success") == "37.5% [21.2, 57.3] (n=24)"
    assert cell(rows, "carrot_on_plate", "refine-l0.5 grasp") == "62.5% [42.7, 78.8] (n=24)"
    assert cell(rows, "carrot_on_plate", "OpenVLA grasp") == "33.3%"
    assert cell(rows, "carrot_on_plate", "OpenVLA success") == "0.0%"
    assert cell(rows, "average", "ReFineVLA success") == "47.7%"
    assert cell(rows, "carrot_on_plate", "ReFineVLA success") == "–"
    assert "ReFineVLA grasp" not in rows[0]  # no published grasp numbers for it
    assert "Wilson score 95%" in md and "noisy" in md


def test_google_table_pools_drawers_has_no_grasp_columns_and_shows_missing_tasks(tmp_path: Path):
    outcomes = {k: v for k, v in GOOGLE.items() if k[1] != "move_near"}
    md = write_report([make_results(tmp_path / "r", outcomes, name="g")]).markdown.read_text()
    rows = table(md, "Google Robot, visual matching")
    assert [r[0] for r in rows[1:]] == ["pick_coke_can", "open_drawer", "close_drawer", "open_close_drawer", "average"]
    assert not any("grasp" in column for column in rows[0])
    assert cell(rows, "open_close_drawer", "g success").endswith("(n=14)")
    assert cell(rows, "open_close_drawer", "RT-1-converged success") == "73.0%"
    assert cell(rows, "open_drawer", "RT-1-converged success") == "–"
    assert "2 of 3 tasks" in cell(rows, "average", "g success")


def test_two_runs_side_by_side_with_duplicate_names_and_a_digest_warning(tmp_path: Path):
    base = make_results(tmp_path / "lambda0", WIDOWX, name="ckpt", digest="aaa")
    worse = {k: (0, 0, 24) for k in WIDOWX}
    other = make_results(tmp_path / "lambda1", worse, name="ckpt", digest="bbb")
    out = tmp_path / "report"
    md = write_report([base, other], out=out).markdown.read_text()
    assert (out / "report.md").is_file() and not (base / "report.md").exists()
    rows = table(md, "WidowX")
    assert cell(rows, "eggplant_in_basket", "ckpt (lambda0) success").startswith("50.0%")
    assert cell(rows, "eggplant_in_basket", "ckpt (lambda1) success").startswith("0.0%")
    warning = next(line for line in md.splitlines() if "not comparable" in line)
    assert "digest" in warning and "aaa" in warning and "bbb" in warning


def test_same_assets_different_backend_also_warns(tmp_path: Path):
    a = make_results(tmp_path / "a", WIDOWX, name="a")
    b = make_results(tmp_path / "b", WIDOWX, name="b", backend="simpler_env")
    md = write_report([a, b]).markdown.read_text()
    (warning,) = [line for line in md.splitlines() if "not comparable" in line]
    assert "backend" in warning and "simpler_env" in warning


def test_extra_baselines_add_a_model_column(tmp_path: Path):
    extra = tmp_path / "mine.csv"
    extra.write_text("suite,task,metric,model,value\nwidowx_vm,carrot_on_plate,success,MyVLA,41.7\n")
    md = write_report([make_results(tmp_path / "r", WIDOWX)], baselines=[extra]).markdown.read_text()
    rows = table(md, "WidowX")
    assert cell(rows, "carrot_on_plate", "MyVLA success") == "41.7%"
    assert cell(rows, "spoon_on_towel", "MyVLA success") == "–"
    assert "OpenVLA success" in rows[0]  # added, not replaced
    assert "mine.csv" in md


def test_mixed_suites_in_one_folder_get_one_table_each(tmp_path: Path):
    outcomes = {**WIDOWX, **GOOGLE, ("maniskill:PickCube-v1", "PickCube-v1"): (3, None, 4)}
    md = write_report([make_results(tmp_path / "r", outcomes)]).markdown.read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## WidowX, visual matching (`widowx`)",
        "## Google Robot, visual matching (`google-vm`)",
        "## maniskill:PickCube-v1 (`maniskill:PickCube-v1`)",
    ]
    assert cell(table(md, "maniskill"), "PickCube-v1", "ckpt success").startswith("75.0%")
    assert "No published baselines for `maniskill:PickCube-v1`" in md


# --- results folder problems ----------------------------------------------------------------


def test_missing_run_json_empty_episodes_and_bad_records_name_the_folder(tmp_path: Path):
    no_run = tmp_path / "no-run"
    EpisodeLog(no_run).append(episode("widowx", "carrot_on_plate", 0, True, True))
    with pytest.raises(EvalError, match=r"no-run.*run.json"):
        write_report([no_run])
    empty = make_results(tmp_path / "empty", {})
    with pytest.raises(EvalError, match=r"empty.*no finished episodes"):
        write_report([empty])
    bad = make_results(tmp_path / "bad", {("widowx", "carrot_on_plate"): (1, 1, 2)})
    with (bad / "episodes.jsonl").open("a") as fh:
        fh.write('{"suite": "widowx", "task": "carrot_on_plate", "success": "yes"}\n')
    with pytest.raises(EvalError, match=r"bad.*episode 3: 'success'"):
        write_report([bad])
    with pytest.raises(EvalError, match="missing: no such results folder"):
        write_report([tmp_path / "missing"])


# --- the chart ------------------------------------------------------------------------------


def pixels(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


def test_chart_is_a_readable_png_that_changes_with_the_data(tmp_path: Path):
    good = write_report([make_results(tmp_path / "good", {**WIDOWX, **GOOGLE})]).chart
    bad = write_report([make_results(tmp_path / "bad", {**{k: (0, 0, 24) for k in WIDOWX}, **GOOGLE})]).chart
    a, b = pixels(good), pixels(bad)
    assert a.size == b.size and a.size[0] >= 900 and a.size[1] >= 700  # two subplots at dpi 120
    assert len(a.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # bars and text, not a blank canvas
    assert a.tobytes() != b.tobytes()


def test_missing_matplotlib_is_an_eval_error_with_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = make_results(tmp_path / "r", WIDOWX)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(EvalError, match=r"pip install 'refinevla\[sim\]'"):
        write_report([results])
    assert not (results / "report.md").exists()  # nothing half-written
