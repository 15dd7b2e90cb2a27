"""`refine-eval view` without the simulator: a results folder written here with `refine-eval run`'s own writers,
shown through the code `refine-data view` uses — a .rrd file, `--serve` (web viewer and gRPC server) and the native
viewer, every server on 127.0.0.1 only. (The run-and-view test on the real simulator is in test_run_maniskill.py.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rerun", reason="rerun: needs the [viz] extra")

from refinevla.evaluate.results import EpisodeLog, EpisodeResult, write_run
from tests.annotate.ray_cluster import free_port
from tests.annotate.rerun_servers import (  # noqa: F401  (xvfb: a fixture)
    assert_loopback_only,
    check_native_viewer,
    on_display,
    serving,
    xvfb,
)

STEPS = 4


def results_folder(tmp_path: Path) -> Path:
    """Two finished WidowX episodes without video: rationales and logged actions for every step."""
    results = tmp_path / "results"
    write_run(results, {"policy": {"path": "ckpt/tiny"}, "reasoning": "on"})
    log = EpisodeLog(results)
    for i in range(2):
        actions = [
            {"raw_action": [0.1 * i + t, 0, 0, 0, 0, 0, 1], "env_action": [t, 1, 2, 3, 4, 5, 0]} for t in range(STEPS)
        ]
        log.append(
            EpisodeResult(
                suite="widowx",
                task="carrot_on_plate",
                env_id="PutCarrotOnPlateInScene-v1",
                config=i,
                repeat=0,
                seed=i,
                instruction="put carrot on plate",
                success=i == 1,
                success_once=i == 1,
                grasp=True,
                grasped_once=True,
                steps=STEPS,
                wall_s=0.1,
                rationales=[f"step {t} of episode {i}" for t in range(STEPS)],
                actions=actions,
            )
        )
    return results


def refine_eval(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "refinevla.evaluate", "view", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def test_save_logs_each_episodes_rationale_actions_and_outcome(tmp_path: Path) -> None:
    from rerun.chunk import RrdReader

    results, rrd = results_folder(tmp_path), tmp_path / "eval.rrd"
    r = refine_eval(str(results), "--episodes", "1", "--save", str(rrd))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"logged 1 episode(s), 0 frames to {rrd}"
    rows: dict[str, list[dict[str, Any]]] = {}
    for chunk in RrdReader(str(rrd)).stream():
        rows.setdefault(chunk.entity_path, []).extend(chunk.to_record_batch().to_pylist())
    assert not any(k.startswith("/episodes/0/") for k in rows)
    written = [row["TextDocument:text"][0] for row in rows["/episodes/1/rationale"]]
    assert written == [f"step {t} of episode 1" for t in range(STEPS)]
    expected = {
        "raw_action": [[0.1 + t, 0, 0, 0, 0, 0, 1] for t in range(STEPS)],
        "env_action": [[t, 1, 2, 3, 4, 5, 0] for t in range(STEPS)],
    }
    for name, values in expected.items():
        series = rows[f"/episodes/1/{name}"]
        logged = [(row["step"], row["Scalars:scalars"]) for row in series if row.get("Scalars:scalars") is not None]
        assert [step for step, _ in logged] == list(range(STEPS))
        np.testing.assert_allclose(np.array([v for _, v in logged]), np.array(values), rtol=1e-6)
        (names,) = [row["SeriesLines:names"] for row in series if row.get("SeriesLines:names")]
        assert names == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    (doc,) = rows["/episodes/1/result"]
    assert "**Success**: yes" in doc["TextDocument:text"][0]


def test_serve_hosts_the_web_viewer_and_grpc_on_127_0_0_1_only(tmp_path: Path) -> None:
    results = results_folder(tmp_path)
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "refinevla.evaluate", "view", str(results), "--serve"]
    with serving([*cmd, "--port", str(port), "--grpc-port", str(grpc_port)], tmp_path) as tree:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200
        assert {p for _, p in assert_loopback_only(tree, {port, grpc_port})} == {port, grpc_port}
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert "logged 2 episode(s), 0 frames to " in stdout and f"http://127.0.0.1:{port}?url=" in stderr


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    results = results_folder(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = refine_eval(str(results), "--serve", "--port", str(port), "--grpc-port", str(free_port()))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"port {port} is already in use on 127.0.0.1 (--port)" in lines[0] and "serving" not in r.stdout


def test_the_native_viewer_listens_on_127_0_0_1_only(xvfb: str, tmp_path: Path) -> None:  # noqa: F811
    results = results_folder(tmp_path)
    port = free_port()
    r = refine_eval(str(results), "--grpc-port", str(port), env=on_display(xvfb))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("logged 2 episode(s), 0 frames to the Rerun viewer (pid "), r.stdout
    check_native_viewer(r.stdout, port)
