"""`annotate --backend ray` on a real two-node Ray cluster on 127.0.0.1, against the fault-injecting teacher.

The cluster is the session's (`tests/annotate/ray_cluster.py`); the node-loss test adds a third
node and kills that one. What the preparation tasks did (where each chunk ran, frames decoded,
prompts built) is read from their journal, `ray_backend`'s JOURNAL_ENV test hook.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from refinevla.annotate.errors import RefineError
from tests.annotate.conftest import SECRET, answered, start_annotate
from tests.annotate.test_crash_resume import seed
from tests.conftest import RAY_DRIVER_TESTS

pytest.importorskip("ray.data", reason="ray.data: needs the [ray] extra")

from refinevla.annotate.ray_backend import JOURNAL_ENV
from tests.annotate.ray_cluster import (
    DRIVER_ENV,
    RAY_DRIVER_CHILD,
    LocalRayCluster,
    alive_nodes,
    finish,
    free_port,
    journal,
    lose_node_under,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in DRIVER_ENV.items():  # the annotate processes join the test cluster, which has no token
        monkeypatch.setenv(k, v)


def on_ray(uri: str, url: str, out: Path, cluster: LocalRayCluster, *extra: str) -> subprocess.Popen[str]:
    return start_annotate(uri, url, out, "--backend", "ray", "--ray-address", cluster.address, *extra)


def read(out: Path, sub: str) -> pl.DataFrame:
    order = ["episode_id", "step"] if sub == "data" else ["episode_id"]
    return pl.read_parquet(out / sub / "train-00000-of-00001.parquet").sort(order)


def test_a_ray_run_writes_the_local_rows_and_its_rerun_decodes_no_frame_and_pays_nothing(
    tiny_rlds, teacher_server, ray_cluster, tmp_path, monkeypatch
):
    uri = tiny_rlds(9)
    small = ("--image-size", "32")  # below the stored 64 px: every keyframe is decoded, resized, re-encoded
    local = finish(start_annotate(uri, teacher_server.url, tmp_path / "local", *small))
    assert local.returncode == 0, local.stderr
    asked_locally = len(teacher_server.requests)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    monkeypatch.setenv(JOURNAL_ENV, str(tasks))
    r = finish(on_ray(uri, teacher_server.url, tmp_path / "ray", ray_cluster, *small))
    assert r.returncode == 0, r.stderr
    done = [e for e in journal(tasks) if e["event"] == "done"]
    assert sum(e["prompts"] for e in done) == 9 and sum(e["decoded"] for e in done) >= 6 * 9  # each keyframe
    assert sorted(q.seed for q in teacher_server.requests[asked_locally:]) == list(range(9))  # each asked once
    for sub in ("data", "episodes"):
        a, b = read(tmp_path / "ray", sub), read(tmp_path / "local", sub)
        assert a.height > 0 and a.equals(b), sub
    manifest = json.loads((tmp_path / "ray" / "refinevla.json").read_text())
    assert manifest["backend"] == {"name": "ray", "address": ray_cluster.address, "nodes": 2, "cpus": 3.0, "workers": 3}
    assert manifest["counts"]["episodes"] == 9 and manifest["complete"]
    assert "ray: 2 node(s), 3 CPUs" in r.stderr

    before = len(teacher_server.requests)
    (tasks / "tasks.log").unlink()
    again = finish(on_ray(uri, teacher_server.url, tmp_path / "ray", ray_cluster, *small, "--ray-workers", "1"))
    assert again.returncode == 0, again.stderr
    assert len(teacher_server.requests) == before  # the anti-join: nothing asked twice
    done = [e for e in journal(tasks) if e["event"] == "done"]
    assert done and sum(e["decoded"] for e in done) == 0 and sum(e["prompts"] for e in done) == 0  # nor prepared
    assert json.loads((tmp_path / "ray" / "refinevla.json").read_text())["counts"]["cached"] == 9
    assert read(tmp_path / "ray", "data").equals(read(tmp_path / "local", "data"))
    every_output = r.stdout + r.stderr + again.stdout + again.stderr
    assert SECRET not in every_output and "Traceback" not in every_output
    assert not any(SECRET.encode() in f.read_bytes() for f in (tmp_path / "ray").rglob("*") if f.is_file())
    assert not ray_cluster.logs_contain(SECRET)


@pytest.mark.parametrize("detail", ["static", "episode"])
@pytest.mark.parametrize("image_size", [32, 256])
def test_the_key_the_anti_join_hashes_without_decoding_is_the_prepared_requests_key(tiny_rlds, detail, image_size):
    from refinevla.annotate.episode import FrameSequence
    from refinevla.annotate.prompts import FrameOptions, episode_facts, load_template
    from refinevla.annotate.ray_backend import PrepareSpec, TeacherIdentity, request_key_of
    from refinevla.annotate.source_args import open_cli_source
    from refinevla.annotate.sources import ReadOptions
    from refinevla.annotate.teacher_requests import prepare_request
    from refinevla.schemas import teacher_response_format

    class NeverDecoded(FrameSequence):
        def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
            raise AssertionError(f"frame {index} decoded")

    teacher = TeacherIdentity("openai-compatible", "fake-model", (("temperature", 0.2),))
    spec = PrepareSpec(
        (), teacher, "rationale-v1", FrameOptions(max_side=image_size), "refinevla.rationale/1", detail, "openai"
    )
    template = load_template("rationale-v1")
    source = open_cli_source(tiny_rlds(3), None, "train", None, None, None, None)
    for episode in source.iter_episodes(ReadOptions()):
        prepared = prepare_request(
            episode,
            teacher=teacher,  # type: ignore[arg-type]
            template=template,
            frames=spec.frames,
            schema_id=spec.schema_id,
            schema_detail=detail,  # type: ignore[arg-type]
            schema_backend="openai",
            static_response_format=teacher_response_format(spec.schema_id, "openai"),
        )
        stored = {c: NeverDecoded([f.encoded(i) or b"" for i in range(len(f))]) for c, f in episode.frames.items()}
        episode.frames = stored  # type: ignore[assignment]
        assert request_key_of(episode, episode_facts(episode), spec, template) == (
            prepared.key,
            prepared.bundle.frame_key,
        )


def test_rate_limits_server_errors_and_invalid_answers_are_settled_per_row(
    tiny_rlds, teacher_server, ray_cluster, tmp_path
):
    uri = tiny_rlds(6)
    teacher_server.scripts = {
        1: ["429", "ok"],
        2: ["500", "500", "ok"],
        3: ["schema", "schema", "schema"],  # invalid on every ask: rejected with the reason
        4: ["400"],  # refused: rejected, never retried
    }
    out = tmp_path / "out"
    r = finish(on_ray(uri, teacher_server.url, out, ray_cluster, "--retry-base", "0.05"))
    assert r.returncode == 0, r.stderr
    asked = Counter(q.seed for q in teacher_server.requests)
    assert asked == {0: 1, 1: 2, 2: 3, 3: 3, 4: 1, 5: 1}
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 4 and manifest["counts"]["rejected"] == 2
    rejects = [json.loads(line) for line in (out / ".refine" / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(reasons) == 2 and any("refused" in x for x in reasons) and any("invalid" in x for x in reasons), reasons
    assert SECRET not in r.stderr + r.stdout


def paid_twice(server) -> int:  # type: ignore[no-untyped-def]
    """Answers asked for more than once (this test's teacher answers every ask)."""
    return sum(n - 1 for n in Counter(q.seed for q in server.requests).values())


def test_a_node_lost_under_running_tasks_its_chunks_run_again_elsewhere_and_the_run_completes(
    tiny_rlds, teacher_server, ray_cluster, tmp_path, monkeypatch
):
    uri = tiny_rlds(24)
    out = tmp_path / "out"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hold = tasks / "hold"
    hold.touch()  # every preparation task waits once it has started: the node is lost under running tasks
    monkeypatch.setenv(JOURNAL_ENV, str(tasks))

    def started_there(node: str) -> list[dict[str, Any]]:
        return [e for e in journal(tasks) if e["event"] == "start" and ray_cluster.node_of(e["pid"]) == node]

    proc, lost, killed = lose_node_under(
        ray_cluster, lambda: on_ray(uri, teacher_server.url, out, ray_cluster), started_there, hold
    )
    lost_node = str(lost[0]["node"])
    assert {e["pid"] for e in lost} <= set(killed)
    first = finish(proc)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr  # the run itself completes
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 24 and manifest["complete"]
    assert read(out, "episodes").height == 24
    done = [e for e in journal(tasks) if e["event"] == "done"]
    assert not [e for e in done if e["node"] == lost_node]  # nothing it started finished there
    for chunk in {e["chunk"] for e in lost}:  # ... every one ran again, to the end, on a node left
        assert [e for e in done if e["chunk"] == chunk and e["node"] != lost_node], chunk
    wait_until(lambda: alive_nodes(ray_cluster).get(lost_node) is False, "ray.nodes() to show the node dead")

    rerun = finish(on_ray(uri, teacher_server.url, out, ray_cluster))  # the head and the first worker
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] + manifest["counts"]["rejected"] == 24
    assert manifest["backend"]["nodes"] == 2
    assert read(out, "episodes").height == 24
    assert paid_twice(teacher_server) == 0  # the first run completed: the rerun asks nothing


def test_the_driver_killed_then_the_same_command_finishes(tiny_rlds, teacher_server, ray_cluster, tmp_path):
    uri = tiny_rlds(16)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    proc = on_ray(uri, teacher_server.url, out, ray_cluster)
    wait_until(lambda: len(answered(out)) >= 3, "the first answers")
    proc.kill()  # SIGKILL: no cleanup at all
    proc.communicate(timeout=30)
    committed = answered(out)
    asked_before = len(teacher_server.requests)
    assert 3 <= len(committed) < 16
    teacher_server.latency = 0.0
    rerun = finish(on_ray(uri, teacher_server.url, out, ray_cluster))
    assert rerun.returncode == 0, rerun.stderr
    episodes = read(out, "episodes")
    assert episodes.height == 16
    # An answer committed before the kill is never asked again. Asked twice: what was in flight when it died
    # (at most --concurrency 2), and answers that had arrived but not yet been committed (a request's slot is
    # given back when its answer arrives, so the next request goes out while the answer is stored).
    steps = read(out, "data").select("episode_id", "instruction").unique()  # "put the spoon <seed> on the towel"
    seed_of = {row["episode_id"]: int(row["instruction"].split()[3]) for row in steps.iter_rows(named=True)}
    again = {q.seed for q in teacher_server.requests[asked_before:]}
    assert not again & {seed_of[e] for e in committed}
    assert paid_twice(teacher_server) == len(again & {q.seed for q in teacher_server.requests[:asked_before]})
    assert paid_twice(teacher_server) <= 4


def test_an_address_where_no_cluster_answers_is_one_line(tiny_rlds, tmp_path):
    r = finish(
        start_annotate(
            tiny_rlds(2),
            "http://127.0.0.1:9/v1",
            tmp_path / "o",
            "--backend",
            "ray",
            "--ray-address",
            f"127.0.0.1:{free_port()}",
        ),
        timeout=60,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster answers there" in lines[0], r.stderr


def test_without_the_extra_installed_it_says_how_to_get_it(tiny_rlds, tmp_path):
    blocker = tmp_path / "blocker" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "refinevla.annotate.cli",
        "annotate",
        tiny_rlds(2),
        "--out",
        str(tmp_path / "o"),
        "--backend",
        "ray",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'refinevla[ray]'" in lines[0], r.stderr


def test_vllm_replicas_on_a_cluster_without_gpus_is_one_line(tiny_rlds, ray_cluster, tmp_path):
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "refinevla.annotate.cli", "annotate", tiny_rlds(2), "--out", str(tmp_path / "o")),
            *("--teacher", "vllm", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--backend", "ray"),
            *("--ray-address", ray_cluster.address),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "needs GPUs: the cluster has 0" in lines[0], proc.stderr


def annotate_in_process(uri: str, url: str, out: Path, cluster: LocalRayCluster) -> Any:
    """`refine-data annotate --backend ray` through CliRunner: the driver is this process, so a task
    function patched here is what the cluster runs (pickled by value)."""
    from typer.testing import CliRunner

    from refinevla.annotate.cli import app

    args = [
        *("annotate", uri, "--out", str(out), "--progress", "none"),
        *("--teacher", "openai-compatible", "--base-url", url, "--model", "fake-model"),
        *("--backend", "ray", "--ray-address", cluster.address),
    ]
    return CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})


@pytest.mark.ray_driver
def test_a_bug_in_a_preparation_task_keeps_its_traceback(tiny_rlds, teacher_server, ray_cluster, tmp_path, monkeypatch):
    from refinevla.annotate import ray_backend

    def prepare_chunk_with_a_bug(batch, spec, settled):  # type: ignore[no-untyped-def]
        raise TypeError("unsupported operand type(s): a bug, not the user's error")

    monkeypatch.setattr(ray_backend, "prepare_chunk", prepare_chunk_with_a_bug)
    result = annotate_in_process(tiny_rlds(2), teacher_server.url, tmp_path / "o", ray_cluster)
    assert result.exit_code != 0 and result.exception is not None
    assert not isinstance(result.exception, RefineError)  # not turned into one line: `user_errors` re-raises it
    shown = "".join(traceback.format_exception(result.exception))
    assert "Traceback (most recent call last)" in shown
    assert "in prepare_chunk_with_a_bug" in shown and "TypeError: unsupported operand type(s): a bug" in shown
    assert not teacher_server.requests


def slow_unless_an_error(batch: dict[str, Any]) -> dict[str, Any]:
    if not batch["error"][0]:
        time.sleep(4.0)  # still running when the error row has stopped the stream
    return batch


@pytest.mark.ray_driver
def test_a_stream_stopped_by_an_error_shuts_its_executor_down_before_ray_does(ray_cluster):
    """CI once hung here: the error stopped the stream, the driver called `ray.shutdown()`, and Ray
    Data's scheduling thread (shut down only when the garbage collector got to the iterator) then
    started a private cluster in the driver, which never exited. The stream now closes the iterator."""
    from refinevla.annotate import ray_backend

    ray = ray_backend.connect(ray_cluster.address)
    try:
        rows = [{"payload": b"", "error": "corrupt record in episode 0"}] + [{"payload": b"", "error": ""}] * 2
        ds = ray.data.from_items(rows, override_num_blocks=3).map_batches(slow_unless_an_error, batch_size=1)
        stream = ray_backend.PreparedStream(ds, expected=3)
        with pytest.raises(RefineError, match="corrupt record in episode 0") as caught:
            next(stream)
        assert caught.value.__traceback__ is not None  # it holds the stream's frame, the iterator in it
        running = [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor-")]
        assert not running  # ...and its executor is shut down all the same
    finally:
        ray.shutdown()


def test_the_tests_that_drive_ray_in_their_own_process_pass_in_a_pytest_of_their_own(
    ray_cluster: LocalRayCluster, request: pytest.FixtureRequest
) -> None:
    """The `ray_driver` tests make their process a Ray driver (`ray.init` in it, to patch what the driver runs):
    Ray ends such a process when it frees an ObjectRef after `ray.shutdown()` (exit 1, "The core worker has
    already been shutdown"; a test's exception holds Ray Data's frames, freed whenever the garbage collector gets
    to them), and in CI that took a pytest-xdist worker down in the middle of a later test. So they run here, in a
    pytest of their own on the session's cluster, and the suite's own run deselects them (tests/conftest.py)."""
    drivers = request.config.stash.get(RAY_DRIVER_TESTS, [])
    if not drivers:  # none was collected beside this test (e.g. `pytest -m ray_driver` ran them itself)
        pytest.skip("this run deselected no ray_driver test")
    given = {"address": ray_cluster.address, "temp_dir": str(ray_cluster.temp_dir)}
    env = {**os.environ, RAY_DRIVER_CHILD: json.dumps(given)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-m", "ray_driver", *drivers]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0 and re.search(rf"\b{len(drivers)} passed", summary), (r.stdout + r.stderr)[-4000:]
    assert not re.search(r"failed|skipped|error|deselected", summary), summary


# A driver of its own (not this pytest worker: Ray ends a process whose thread touches it after shutdown)
STOPPED_UNDER_A_BLOCK = """
import pathlib, pickle, sys, threading, time
from refinevla.annotate import ray_backend

hold = pathlib.Path(sys.argv[2])
hold.touch()

def held(batch):
    while hold.exists():  # the block the cluster still prepares when the run stops
        time.sleep(0.05)
    return batch

ray = ray_backend.connect(sys.argv[1])
ds = ray.data.from_items([{"payload": pickle.dumps(7), "error": ""}]).map_batches(held, batch_size=1)
stream = ray_backend.PreparedStream(ds, expected=1)
got = []
waiting = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)  # the engine's producer
waiting.start()
time.sleep(1.0)
inside = not stream.wait_idle(0)
threading.Timer(2.0, hold.unlink).start()  # the block comes 2 s after the run has stopped
t0 = time.monotonic()
ray_backend.shut_down(ray, stream)  # the driver's exit, as after a max-cost stop
print(inside, got, round(time.monotonic() - t0, 1), flush=True)
"""


def test_ray_is_shut_down_only_once_no_thread_waits_on_the_stream(ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    """CI once failed here: a --max-cost run (test below) exited 1 with Ray's "The core worker has already been
    shutdown ... The process will exit". The stop left the engine's producer inside `next` for a block the
    cluster was still preparing, longer than the engine waits for it (10 s), and `ray.shutdown()` under it made
    Ray end the process. The driver now waits for the stream to be idle, closes it, and only then shuts down."""
    r = subprocess.run(
        [sys.executable, "-c", STOPPED_UNDER_A_BLOCK, ray_cluster.address, str(tmp_path / "hold")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **DRIVER_ENV},
    )
    assert r.returncode == 0 and "already been shutdown" not in r.stderr, r.stdout + r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    inside, got, waited = line.split()
    assert (inside, got) == ("True", "[7]"), line  # a thread was inside; shut_down waited for its block ...
    assert float(waited) >= 1.9, line  # ... the 2 s until the block came


def test_a_user_error_in_a_preparation_task_is_one_line(tiny_rlds, teacher_server, ray_cluster, tmp_path):
    uri = tiny_rlds(4)
    (shard,) = Path(uri.removeprefix("rlds:")).glob("*.tfrecord*")
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # the last record's bytes: its CRC no longer matches, found by the task that reads it
    shard.write_bytes(bytes(data))
    r = finish(on_ray(uri, teacher_server.url, tmp_path / "o", ray_cluster))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("episodes ")]  # progress
    assert len(lines) == 1 and "corrupt record at byte offset" in lines[0] and str(shard) in lines[0], r.stderr


def test_ctrl_c_stops_a_ray_run_cleanly_and_the_rerun_resumes(tiny_rlds, teacher_server, ray_cluster, tmp_path):
    uri = tiny_rlds(16)
    out = tmp_path / "out"
    teacher_server.latency = 0.3
    proc = on_ray(uri, teacher_server.url, out, ray_cluster)
    wait_until(lambda: len(answered(out)) >= 2, "the first answers")
    proc.send_signal(signal.SIGINT)
    stopped = finish(proc, timeout=60)
    assert stopped.returncode == 130, stopped.stderr
    assert "Resume with: refine-data annotate" in stopped.stderr and "Traceback" not in stopped.stderr
    committed = answered(out)
    assert json.loads((out / "refinevla.json").read_text())["stop_reason"] == "interrupted"
    before = len(teacher_server.requests)
    teacher_server.latency = 0.0
    rerun = finish(on_ray(uri, teacher_server.url, out, ray_cluster))
    assert rerun.returncode == 0, rerun.stderr
    assert not {q.seed for q in teacher_server.requests[before:]} & {seed(e) for e in committed}
    assert read(out, "episodes").height == 16


def test_max_cost_holds_for_the_whole_cluster_and_the_rerun_continues(tiny_rlds, teacher_server, ray_cluster, tmp_path):
    uri = tiny_rlds(12)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fake-model": {"input": 1.0, "output": 2.0}}))  # $0.0014 an answer here
    out = tmp_path / "out"
    capped = finish(on_ray(uri, teacher_server.url, out, ray_cluster, "--prices", str(prices), "--max-cost", "0.008"))
    assert capped.returncode == 0, capped.stderr
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["stop_reason"] == "max-cost" and manifest["cost_usd"] <= 0.008
    assert 0 < manifest["counts"]["episodes"] < 12
    rest = finish(on_ray(uri, teacher_server.url, out, ray_cluster, "--prices", str(prices), "--max-cost", "1"))
    assert rest.returncode == 0, rest.stderr
    assert read(out, "episodes").height == 12 and paid_twice(teacher_server) == 0
