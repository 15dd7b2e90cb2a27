"""`refine-data view --save`: read the recording back with Rerun's own reader and check what is in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

pytest.importorskip("rerun", reason="rerun: needs the [viz] extra")

from tests.annotate.conftest import SECRET, start_annotate
from tests.annotate.rerun_servers import (  # noqa: F401  (xvfb: a fixture)
    assert_loopback_only,
    check_native_viewer,
    on_display,
    serving,
    xvfb,
)
from tests.sources.conftest import lerobot_episodes, write_lerobot_dataset  # noqa: F401  (fixtures)


def refine_data(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "refinevla.annotate.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def view(out: Path, rrd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return refine_data("view", str(out), "--save", str(rrd), *extra)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    return lines[0]


def sample_out(tmp_path: Path) -> Path:
    """The embedded sample annotated by the rule-based teacher."""
    out = tmp_path / "sample"
    made = refine_data("annotate", "sample", "--out", str(out), "--progress", "none")
    assert made.returncode == 0, made.stderr
    return out


def read_rrd(path: Path) -> dict[str, list[dict[str, Any]]]:
    """entity path -> rows (column name -> value), in log order, from Rerun's own reader."""
    from rerun.chunk import RrdReader

    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for chunk in RrdReader(str(path)).stream():
        for row in chunk.to_record_batch().to_pylist():  # a text component is a one-element list per row
            rows[chunk.entity_path].append(
                {k: v[0] if k.endswith(":text") and isinstance(v, list) and len(v) == 1 else v for k, v in row.items()}
            )
    return rows


def annotated_with_boxes(tiny_rlds, teacher_server, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out"
    proc = start_annotate(tiny_rlds(3), teacher_server.url, out, *extra)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def test_an_episode_is_its_frames_scalars_step_rationale_boxes_and_document(tiny_rlds, teacher_server, tmp_path):
    # the teacher saw 32-px keyframes of the 64-px frames: its box [4, 4, 20, 20] is [8, 8, 40, 40] on the frame
    out = annotated_with_boxes(tiny_rlds, teacher_server, tmp_path, "--image-size", "32")
    r = view(out, tmp_path / "v.rrd", "--episodes", "1")
    assert r.returncode == 0, r.stderr
    assert "logged 1 episode(s)" in r.stdout and "1 box(es)" in r.stdout
    rec = read_rrd(tmp_path / "v.rrd")
    steps = pl.read_parquet(out / "data").filter(pl.col("episode_id").str.ends_with("#1")).sort("step")
    episode = pl.read_parquet(out / "episodes").filter(pl.col("episode_id").str.ends_with("#1")).to_dicts()[0]
    n = steps.height
    assert n > 5 and not any(k.startswith("/episodes/0/") or k.startswith("/episodes/2/") for k in rec)

    frames = rec["/episodes/1/camera/image_0"]
    assert [f["step"] for f in frames] == list(range(n))  # one frame per step
    texts = [row["TextDocument:text"] for row in rec["/episodes/1/rationale/step"]]
    assert len(texts) == n
    for text, row in zip(texts, steps.to_dicts(), strict=True):
        assert f"SUBTASK: {row['subtask']}\n" in text and f"MOVE REASON: {row['move_reason']}" in text
    actions = [row["Scalars:scalars"] for row in rec["/episodes/1/action"] if row.get("Scalars:scalars") is not None]
    assert len(actions) == n and all(len(a) == 7 for a in actions)
    np.testing.assert_allclose(np.array(actions), np.stack(steps["action"].to_list()), rtol=1e-6)

    (boxes,) = [row for row in rec["/episodes/1/camera/image_0/objects"] if row.get("Boxes2D:centers")]
    assert boxes["step"] == 0 and boxes["Boxes2D:labels"] == ["spoon"]
    np.testing.assert_allclose(boxes["Boxes2D:centers"], [[24.0, 24.0]])
    np.testing.assert_allclose(boxes["Boxes2D:half_sizes"], [[16.0, 16.0]])

    (doc,) = rec["/episodes/1/rationale/episode"]
    assert (
        episode["observation"] in doc["TextDocument:text"] and episode["spatial_reasoning"] in doc["TextDocument:text"]
    )
    events = [(row["step"], row["TextLog:text"]) for row in rec["/episodes/1/events"]]
    moves, grips = steps["move"].to_list(), steps["gripper"].to_list()
    starts = [t for t in range(n) if t == 0 or moves[t] != moves[t - 1]]
    changes = [t for t in range(1, n) if grips[t] != grips[t - 1]]
    assert [t for t, e in events if e.startswith("segment: ")] == starts
    assert [t for t, e in events if e.startswith("gripper: ")] == changes
    assert SECRET not in (tmp_path / "v.rrd").read_bytes().decode("latin-1")


def test_a_rejected_episode_is_shown_with_its_reason(tiny_rlds, teacher_server, tmp_path):
    teacher_server.scripts = {0: ["400"]}
    out = tmp_path / "out"
    proc = start_annotate(tiny_rlds(2), teacher_server.url, out)
    proc.communicate(timeout=120)
    r = view(out, tmp_path / "v.rrd", "--episodes", "0:2")
    assert r.returncode == 0, r.stderr
    rec = read_rrd(tmp_path / "v.rrd")
    (doc,) = rec["/episodes/0/rationale/episode"]
    reason = json.loads((out / ".refine" / "rejects.jsonl").read_text().splitlines()[0])["reason"]
    assert doc["TextDocument:text"] == f"**Rejected**: {reason}"
    assert "/episodes/0/rationale/step" not in rec and len(rec["/episodes/0/camera/image_0"]) > 0  # frames still shown
    assert len(rec["/episodes/1/rationale/step"]) > 0


def test_a_lerobot_video_dataset_shows_the_decoded_frames(write_lerobot_dataset, tmp_path):  # noqa: F811
    root, episodes = write_lerobot_dataset("v3.0", camera_storage="video", n=3)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "refinevla.annotate.cli",
            "annotate",
            f"lerobot:{root}",
            "--out",
            str(out),
            "--license",
            "mit",
            "--camera",
            "image_1",  # the teacher saw the second camera: so does the viewer, unasked
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    v = view(out, tmp_path / "v.rrd", "--episodes", "2")  # the second episode of a shared video file
    assert v.returncode == 0, v.stderr
    rec = read_rrd(tmp_path / "v.rrd")
    from refinevla.annotate.sources import ReadOptions, SourceOverrides, open_source

    second = SourceOverrides(cameras=("image_1",))
    source = next(open_source(f"lerobot:{root}", overrides=second).iter_episodes(ReadOptions(start=2, stop=3)))
    ep = episodes[2]
    assert source.num_steps == ep.num_steps and source.cameras == ["image_1"]
    assert not [path for path in rec if "/camera/image_0" in path], sorted(rec)
    for camera in source.cameras:
        frames = rec[f"/episodes/2/camera/{camera}"]
        assert len(frames) == ep.num_steps, sorted(rec)
        h, w = np.asarray(source.frames[camera][0]).shape[:2]
        for t in (0, ep.num_steps - 1):  # the frame training reads, pixel for pixel
            logged = np.asarray(frames[t]["Image:buffer"], np.uint8).reshape(h, w, 3)
            np.testing.assert_array_equal(logged, np.asarray(source.frames[camera][t]))
    assert len(rec["/episodes/2/rationale/step"]) == ep.num_steps


def test_a_selection_that_matches_nothing_is_one_line(tiny_rlds, teacher_server, tmp_path):
    out = annotated_with_boxes(tiny_rlds, teacher_server, tmp_path)
    line = one_line_error(view(out, tmp_path / "v.rrd", "--episodes", "7:9"))
    assert "selects no episode" in line and "it has 3" in line
    assert not (tmp_path / "v.rrd").exists() or (tmp_path / "v.rrd").stat().st_size < 10_000


def test_without_the_extra_it_says_how_to_get_it(tmp_path):
    blocker = tmp_path / "blocker" / "rerun"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'rerun'\")\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = refine_data("view", "sample", "--save", str(tmp_path / "v.rrd"), env=env)
    assert "pip install 'refinevla[viz]'" in one_line_error(r)


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening socket on `port` (/proc/net/tcp: hex address:port, state 0A)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_serve_hosts_the_web_viewer_on_127_0_0_1_only(tmp_path):
    import urllib.request

    from tests.annotate.ray_cluster import free_port

    out = sample_out(tmp_path)
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "refinevla.annotate.cli", "view", str(out), "--serve", "--port", str(port)]
    with serving([*cmd, "--grpc-port", str(grpc_port)], tmp_path) as tree:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200
        assert listening_addresses(port) == {"127.0.0.1"}
        # every listening socket of refine-data and what it started, IPv4 and IPv6: the web viewer and gRPC only
        assert {p for _, p in assert_loopback_only(tree, {port, grpc_port})} == {port, grpc_port}
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert "logged 1 episode(s)" in stdout and f"http://127.0.0.1:{port}" in stderr
    assert f"url=rerun%2Bhttp%3A%2F%2F127.0.0.1%3A{grpc_port}%2Fproxy" in stderr


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_taken_port_is_one_line_before_serving(tmp_path, flag):
    import socket

    from tests.annotate.ray_cluster import free_port

    out = sample_out(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--grpc-port" if flag == "--port" else "--port"
        r = refine_data("view", str(out), "--serve", flag, str(port), other, str(free_port()))
    line = one_line_error(r)
    assert f"port {port} is already in use" in line and flag in line
    assert "serving" not in r.stdout + r.stderr and "logged" not in r.stdout


def started_or_refused(args: list[str], host: str, ports: list[int]) -> str:
    """RerunProcess.start's one line of refusal (a server it did start is stopped, and the test fails)."""
    from refinevla.annotate.errors import RefineError
    from refinevla.annotate.viewer import RerunProcess

    try:
        server = RerunProcess.start(args, host, ports, "the web viewer")
    except RefineError as exc:
        return str(exc)
    server.stop()
    pytest.fail(f"rerun {args} started")


def test_a_port_taken_after_the_check_is_one_line(tmp_path):
    """A race: the web port was free when refine-data checked it and is taken by the time rerun binds it."""
    import socket

    from tests.annotate.ray_cluster import free_port

    out = sample_out(tmp_path)
    assert view(out, tmp_path / "v.rrd").returncode == 0
    grpc_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--serve-web", "--bind", "127.0.0.1", "--web-viewer-port", str(port), "--port", str(grpc_port)]
        message = started_or_refused([*args, str(tmp_path / "v.rrd")], "127.0.0.1", [port, grpc_port])
    assert "\n" not in message and f"port {port} on 127.0.0.1 was taken by another process" in message


def test_a_rerun_that_exits_at_start_says_why_in_one_line(tmp_path):
    """rerun's own error, read from its output (its exit status alone says nothing)."""
    from tests.annotate.ray_cluster import free_port

    port = free_port()
    message = started_or_refused(["--serve-grpc", "--bind", "not-an-address", "--port", str(port)], "127.0.0.1", [port])
    assert "\n" not in message and "exited before listening" in message and "not-an-address" in message


def test_the_native_viewer_listens_on_127_0_0_1_only(xvfb, tmp_path):  # noqa: F811
    """Not the SDK's spawn(), whose viewer listens on 0.0.0.0: the viewer refine-data starts, on a virtual display."""
    from tests.annotate.ray_cluster import free_port

    out = sample_out(tmp_path)
    port = free_port()
    r = refine_data("view", str(out), "--grpc-port", str(port), env=on_display(xvfb))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("logged 1 episode(s), ") and " steps, 0 box(es) to the Rerun viewer (pid " in r.stdout
    check_native_viewer(r.stdout, port)


def test_a_viewer_that_dies_after_it_listens_is_one_line(tmp_path):
    """A native viewer with no graphics driver it can draw with listens, then exits: its own reason in one red line,
    no traceback. The `rerun` here is a stand-in (RERUN_CLI_PATH) that does just that, on any machine."""
    import textwrap

    from tests.annotate.ray_cluster import free_port

    stand_in = tmp_path / "rerun"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            """
            import socket, sys, time
            with socket.socket() as s:
                s.bind(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])))
                s.listen()
                s.settimeout(30)
                s.accept()  # dies once the command has connected (not after a fixed time: CI may be slow)
            time.sleep(0.5)  # its socket closed, the process not yet ended: the port once looked taken by another then
            sys.exit("Error: app creation error: The GPU/graphics driver is lacking some abilities")
            """
        )
    )
    stand_in.chmod(0o755)
    out = sample_out(tmp_path)
    env = {**os.environ, "DISPLAY": ":99", "RERUN_CLI_PATH": str(stand_in)}
    r = refine_data("view", str(out), "--grpc-port", str(free_port()), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]  # (the SDK logs its failed sends)
    assert "the Rerun viewer exited (Error: app creation error: The GPU/graphics driver" in error
    assert "--save FILE.rrd" in error


def test_without_a_display_spawning_the_viewer_is_refused_in_one_line(tmp_path):
    out = sample_out(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    assert "--save FILE.rrd" in one_line_error(refine_data("view", str(out), env=env))
