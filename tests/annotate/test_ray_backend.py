"""`annotate --backend ray` on a real two-node Ray cluster on 127.0.0.1, against the fault-injecting teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.annotate.conftest import SECRET, answered, start_annotate
from tests.annotate.test_crash_resume import seed

pytest.importorskip("ray.data", reason="needs the [ray] extra")

from tests.annotate.ray_cluster import ENV, RayCluster, running_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with running_cluster() as c:
        yield c


@pytest.fixture
def own_cluster() -> Iterator[RayCluster]:
    """A cluster for one test that loses a node."""
    with running_cluster() as c:
        yield c


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():  # the annotate processes join the test cluster, which has no token
        monkeypatch.setenv(k, v)


def on_ray(uri: str, url: str, out: Path, cluster: RayCluster, *extra: str) -> subprocess.Popen[str]:
    return start_annotate(uri, url, out, "--backend", "ray", "--ray-address", cluster.address, *extra)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def read(out: Path, sub: str) -> pl.DataFrame:
    order = ["episode_id", "step"] if sub == "data" else ["episode_id"]
    return pl.read_parquet(out / sub / "train-00000-of-00001.parquet").sort(order)


def test_a_ray_run_writes_the_local_rows_and_its_rerun_pays_nothing(tiny_rlds, teacher_server, cluster, tmp_path):
    uri = tiny_rlds(9)
    local = finish(start_annotate(uri, teacher_server.url, tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    asked_locally = len(teacher_server.requests)
    r = finish(on_ray(uri, teacher_server.url, tmp_path / "ray", cluster))
    assert r.returncode == 0, r.stderr
    assert sorted(q.seed for q in teacher_server.requests[asked_locally:]) == list(range(9))  # each asked once
    for sub in ("data", "episodes"):
        a, b = read(tmp_path / "ray", sub), read(tmp_path / "local", sub)
        assert a.height > 0 and a.equals(b), sub
    manifest = json.loads((tmp_path / "ray" / "refinevla.json").read_text())
    assert manifest["backend"] == {"name": "ray", "address": cluster.address, "nodes": 2, "cpus": 3.0, "workers": 3}
    assert manifest["counts"]["episodes"] == 9 and manifest["complete"]
    assert "ray: 2 node(s), 3 CPUs" in r.stderr

    before = len(teacher_server.requests)
    again = finish(on_ray(uri, teacher_server.url, tmp_path / "ray", cluster, "--ray-workers", "1"))
    assert again.returncode == 0, again.stderr
    assert len(teacher_server.requests) == before  # the anti-join: nothing asked twice
    assert json.loads((tmp_path / "ray" / "refinevla.json").read_text())["counts"]["cached"] == 9
    assert read(tmp_path / "ray", "data").equals(read(tmp_path / "local", "data"))
    every_output = r.stdout + r.stderr + again.stdout + again.stderr
    assert SECRET not in every_output and "Traceback" not in every_output
    assert not any(SECRET.encode() in f.read_bytes() for f in (tmp_path / "ray").rglob("*") if f.is_file())
    assert not cluster.logs_contain(SECRET)


def test_rate_limits_server_errors_and_invalid_answers_are_settled_per_row(
    tiny_rlds, teacher_server, cluster, tmp_path
):
    uri = tiny_rlds(6)
    teacher_server.scripts = {
        1: ["429", "ok"],
        2: ["500", "500", "ok"],
        3: ["schema", "schema", "schema"],  # invalid on every ask: rejected with the reason
        4: ["400"],  # refused: rejected, never retried
    }
    out = tmp_path / "out"
    r = finish(on_ray(uri, teacher_server.url, out, cluster, "--retry-base", "0.05"))
    assert r.returncode == 0, r.stderr
    asked = Counter(q.seed for q in teacher_server.requests)
    assert asked == {0: 1, 1: 2, 2: 3, 3: 3, 4: 1, 5: 1}
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 4 and manifest["counts"]["rejected"] == 2
    rejects = [json.loads(line) for line in (out / ".refine" / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(reasons) == 2 and any("refused" in x for x in reasons) and any("invalid" in x for x in reasons), reasons
    assert SECRET not in r.stderr + r.stdout


def wait_until(condition, what: str, deadline: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def paid_twice(server) -> int:  # type: ignore[no-untyped-def]
    """Answers asked for more than once (this test's teacher answers every ask)."""
    return sum(n - 1 for n in Counter(q.seed for q in server.requests).values())


def test_a_worker_node_lost_mid_run_then_the_same_command_finishes(tiny_rlds, teacher_server, own_cluster, tmp_path):
    uri = tiny_rlds(24)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    proc = on_ray(uri, teacher_server.url, out, own_cluster)
    wait_until(lambda: len(answered(out)) >= 3 or proc.poll() is not None, "the first answers")
    own_cluster.kill_worker_node()
    first = finish(proc)  # measured: Ray runs the lost node's tasks again on the head, and the run completes
    assert first.returncode in (0, 1) and "Traceback" not in first.stderr, first.stderr
    teacher_server.latency = 0.0
    rerun = finish(on_ray(uri, teacher_server.url, out, own_cluster))  # the head alone now
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] + manifest["counts"]["rejected"] == 24
    # (not asserted: the node count, which the GCS lowers only once the lost node's health checks time out)
    assert read(out, "episodes").height == 24
    assert paid_twice(teacher_server) <= 2  # at most the requests in flight (--concurrency 2)


def test_the_driver_killed_then_the_same_command_finishes(tiny_rlds, teacher_server, cluster, tmp_path):
    uri = tiny_rlds(16)
    out = tmp_path / "out"
    teacher_server.latency = 0.25
    proc = on_ray(uri, teacher_server.url, out, cluster)
    wait_until(lambda: len(answered(out)) >= 3, "the first answers")
    proc.kill()  # SIGKILL: no cleanup at all
    proc.communicate(timeout=30)
    committed = len(answered(out))
    assert 3 <= committed < 16
    teacher_server.latency = 0.0
    rerun = finish(on_ray(uri, teacher_server.url, out, cluster))
    assert rerun.returncode == 0, rerun.stderr
    assert read(out, "episodes").height == 16
    assert paid_twice(teacher_server) <= 2  # in flight when it died


def test_an_address_where_no_cluster_answers_is_one_line(tiny_rlds, tmp_path):
    from tests.annotate.ray_cluster import free_port

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


def test_vllm_replicas_on_a_cluster_without_gpus_is_one_line(tiny_rlds, cluster, tmp_path):
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "refinevla.annotate.cli", "annotate", tiny_rlds(2), "--out", str(tmp_path / "o")),
            *("--teacher", "vllm", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--backend", "ray"),
            *("--ray-address", cluster.address),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "needs GPUs: the cluster has 0" in lines[0], proc.stderr


def test_ctrl_c_stops_a_ray_run_cleanly_and_the_rerun_resumes(tiny_rlds, teacher_server, cluster, tmp_path):
    uri = tiny_rlds(16)
    out = tmp_path / "out"
    teacher_server.latency = 0.3
    proc = on_ray(uri, teacher_server.url, out, cluster)
    wait_until(lambda: len(answered(out)) >= 2, "the first answers")
    proc.send_signal(signal.SIGINT)
    stopped = finish(proc, timeout=60)
    assert stopped.returncode == 130, stopped.stderr
    assert "Resume with: refine-data annotate" in stopped.stderr and "Traceback" not in stopped.stderr
    committed = answered(out)
    assert json.loads((out / "refinevla.json").read_text())["stop_reason"] == "interrupted"
    before = len(teacher_server.requests)
    teacher_server.latency = 0.0
    rerun = finish(on_ray(uri, teacher_server.url, out, cluster))
    assert rerun.returncode == 0, rerun.stderr
    assert not {q.seed for q in teacher_server.requests[before:]} & {seed(e) for e in committed}
    assert read(out, "episodes").height == 16


def test_max_cost_holds_for_the_whole_cluster_and_the_rerun_continues(tiny_rlds, teacher_server, cluster, tmp_path):
    uri = tiny_rlds(12)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fake-model": {"input": 1.0, "output": 2.0}}))  # $0.0014 an answer here
    out = tmp_path / "out"
    capped = finish(on_ray(uri, teacher_server.url, out, cluster, "--prices", str(prices), "--max-cost", "0.008"))
    assert capped.returncode == 0, capped.stderr
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["stop_reason"] == "max-cost" and manifest["cost_usd"] <= 0.008
    assert 0 < manifest["counts"]["episodes"] < 12
    rest = finish(on_ray(uri, teacher_server.url, out, cluster, "--prices", str(prices), "--max-cost", "1"))
    assert rest.returncode == 0, rest.stderr
    assert read(out, "episodes").height == 12 and paid_twice(teacher_server) == 0
