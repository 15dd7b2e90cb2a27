"""`refine-eval demos`: scripted demonstrations in SimplerEnv's own WidowX scenes, as BridgeData V2 RLDS.

SimplerEnv ships no demonstrations and ManiSkill's motion planners drive the Panda, so a closed loop
(demos -> `refine-data annotate` -> `refine-train` -> `refine-eval`) needs an expert of our own. It
reads the privileged object poses and drives the task's own controller
(`arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos`) through the same waypoints a person
would: above the source object (turning the gripper to the object's yaw) -> down -> close -> up ->
above the target -> down -> open -> up. Each waypoint gets a little noise from the episode's seed, so
demonstrations of one configuration are not one trajectory. Only successful episodes are kept.

Every action is written in Bridge's conventions — world vector (the translation command, in the
robot's base frame, as the controller takes it), roll/pitch/yaw delta, absolute open-gripper
(1 = open) — and sent to the env through `robots.env_actions`, SimplerEnv's WidowX post-processing,
so replaying a stored action through refine-eval reproduces the expert's command exactly.

The stored actions are the expert's commands, not Bridge's relabelled reached-state deltas:
training them through the `bridge_orig` transform would teach actions under which the demos no
longer replay. So the folder declares its transform (`none`) and robot (`widowx`) in
`refinevla_source.json`, which refinevla's RLDS reader exposes and `--transform auto` obeys.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..annotate.outputs import hold_output
from ..annotate.sources.rlds import DECLARATION_FILE
from ..annotate.sources.rlds_writer import encode_jpeg, write_rlds
from ..annotate.sources.specs import bridge_example, bridge_features
from ..schemas.dataset_layout import PRIVATE_DIR
from ..train.policy import resize_image
from .errors import EvalError
from .robots import GripperState, env_actions, flat_env_action
from .suites import Task, suite_tasks

DATASET_NAME = "simpler_widowx"  # the RLDS builder name: episode ids read simpler_widowx/simpler/<ENV_ID>/...
IMAGE_SIZE = (256, 256)  # Bridge stores image_0 at 256x256
MAX_STEP_M = 0.03  # translation per control step at most (Bridge's teleoperation moves about this fast)
MAX_TURN_RAD = 0.2  # yaw per control step at most
REACHED_M = 0.012  # a waypoint within this distance counts as reached
GRIP_STEPS = 4  # steps spent closing or opening the gripper in place
DECLARATION = {
    "transform": "none",
    "robot": "widowx",
    "why": "actions are the scripted expert's own commands (Bridge conventions, robot base frame); they replay "
    "as stored, so they are trained without a relabelling transform",
}


@dataclass(frozen=True)
class Waypoints:
    """Heights (m) of the expert's waypoints relative to the objects' origins."""

    hover: float = 0.08  # above the source before descending
    grasp: float = 0.015  # where the fingers close
    carry: float = 0.10  # lifted, above source and target
    place: float = 0.05  # above the target's origin where the gripper opens
    leave: float = 0.12  # where it rests after letting go


WAYPOINTS = {  # per SimplerEnv task name: the same motion, its own heights where an object needs them
    "carrot_on_plate": Waypoints(),
    "spoon_on_towel": Waypoints(),
    "stack_green_on_yellow": Waypoints(),
    "eggplant_in_basket": Waypoints(),
}


@dataclass
class Demo:
    """One recorded episode: per step the frame (JPEG), the base-frame state and the Bridge action."""

    task: Task
    config: int
    seed: int
    instruction: str
    frames: list[bytes] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    success: bool = False

    @property
    def file_path(self) -> str:
        return episode_path(self.task.env_id, self.config, self.seed)


@dataclass
class DemosSummary:
    tried: dict[str, int] = field(default_factory=dict)  # per task
    kept: dict[str, int] = field(default_factory=dict)
    out: Path | None = None


def episode_path(env_id: str, config: int, seed: int) -> str:
    """`episode_metadata/file_path` of a demonstration: which scene configuration and reset seed it is."""
    return f"simpler/{env_id}/episode_{config}/seed_{seed}"


def parse_episode_path(path: str) -> tuple[str, int, int] | None:
    """(env id, configuration, seed) of a demonstration's file_path, or None for any other episode."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "simpler" or not parts[2].startswith("episode_"):
        return None
    try:
        return parts[1], int(parts[2].removeprefix("episode_")), int(parts[3].removeprefix("seed_"))
    except ValueError:
        return None


@dataclass(frozen=True)
class DemoPairs:
    """The (configuration, seed) pairs a demos folder holds, per simulator task."""

    folder: Path
    by_env: dict[str, list[tuple[int, int]]]

    def pairs(self, env_id: str) -> list[tuple[int, int]]:
        return sorted(self.by_env.get(env_id, []))


Scene = tuple[str, int, int]  # (env id, configuration, seed) of a demonstration


def open_demos(folder: Path, what: str) -> Any:
    """The RLDS source of a demos folder; one line naming `what` asked for it if it is none."""
    from ..annotate.errors import RefineError
    from ..annotate.sources import open_source

    try:
        return open_source(f"rlds:{folder}")
    except RefineError as exc:
        raise EvalError(f"{what}: not a refine-eval demos folder ({exc})") from None


def demo_episodes(source: Any, what: str) -> Iterator[tuple[Scene, Any]]:
    """Each episode of an opened demos folder with its scene; one line for an episode that is no demo."""
    from ..annotate.errors import RefineError
    from ..annotate.sources import ReadOptions

    try:
        for episode in source.iter_episodes(ReadOptions()):
            path = str(episode.metadata.get("file_path", ""))
            scene = parse_episode_path(path)
            if scene is None:
                raise EvalError(
                    f"{what}: episode {episode.episode_id} is not a refine-eval demos episode: its file_path {path!r} "
                    "is not a refine-eval demos path (simpler/<ENV_ID>/episode_<k>/seed_<s>)"
                )
            yield scene, episode
    except RefineError as exc:
        raise EvalError(f"{what}: not a refine-eval demos folder ({exc})") from None


def read_demo_pairs(folder: Path, flag: str) -> DemoPairs:
    """Read which scenes a `refine-eval demos` folder recorded; one line if it is no such folder."""
    what = f"{flag} {folder}"
    by_env: dict[str, list[tuple[int, int]]] = {}
    for (env_id, config, seed), _ in demo_episodes(open_demos(folder, what), what):
        by_env.setdefault(env_id, []).append((config, seed))
    return DemoPairs(folder, by_env)


def demo_tries(n_configs: int, episodes: int, base_seed: int) -> list[tuple[int, int]]:
    """(configuration, seed) of each try: every configuration in turn, a new seed each round."""
    return [(i % n_configs, base_seed + i // n_configs) for i in range(episodes)]


def _pose(p: Any) -> tuple[np.ndarray, np.ndarray]:
    """(position, quaternion wxyz) of the first env's pose."""
    return np.asarray(p.p[0].cpu(), dtype=np.float64), np.asarray(p.q[0].cpu(), dtype=np.float64)


def _rotation(q_wxyz: np.ndarray) -> Any:
    from scipy.spatial.transform import Rotation

    return Rotation.from_quat(q_wxyz[[1, 2, 3, 0]])


class ScriptedExpert:
    """Waypoint following with privileged poses, in Bridge's action conventions (see the module doc)."""

    def __init__(self, env: Any, waypoints: Waypoints, rng: np.random.Generator, noise: float) -> None:
        u = env.unwrapped
        self.ee = u.agent.robot.links_map["ee_gripper_link"]
        root_p, root_q = _pose(u.agent.robot.pose)
        self.root_p, self.root = root_p, _rotation(root_q)
        src_p, src_q = _pose(u.objs[u.source_obj_name].pose)
        tgt_p, _ = _pose(u.objs[u.target_obj_name].pose)

        def above(p: np.ndarray, height: float, noisy: bool = False) -> np.ndarray:
            shift = np.array([*(rng.uniform(-noise, noise, 2) if noisy else (0.0, 0.0)), height])
            out: np.ndarray = p + shift
            return out

        w = waypoints
        self.plan: list[tuple[str, np.ndarray | None, float]] = [  # (kind, world position, open gripper)
            ("move", above(src_p, w.hover, noisy=True), 1.0),
            ("move", above(src_p, w.grasp), 1.0),
            ("grip", None, 0.0),
            ("move", above(src_p, w.carry, noisy=True), 0.0),
            ("move", above(tgt_p, w.carry, noisy=True), 0.0),
            ("move", above(tgt_p, w.place), 0.0),
            ("grip", None, 1.0),
            ("move", above(tgt_p, w.leave), 1.0),
        ]
        # turn the fingers across the object: its yaw relative to the gripper's start, folded to [-pi/2, pi/2]
        object_yaw = float(_rotation(src_q).as_euler("xyz")[2])
        turn = (object_yaw - np.pi) % np.pi
        turn = turn - np.pi if turn > np.pi / 2 else turn
        self.target_yaw = self._ee_yaw() + turn
        self.phase = 0
        self.held = 0
        self.open = 1.0

    def _ee_yaw(self) -> float:
        return float(_rotation(_pose(self.ee.pose)[1]).as_euler("xyz")[2])

    def state(self) -> np.ndarray:
        """[x, y, z, roll, pitch, yaw, gripper] of the end effector in the robot's base frame (Bridge's
        `observation/state`); gripper = the open command in force (1 open, 0 closed)."""
        p, q = _pose(self.ee.pose)
        local = self.root.inv()
        xyz = local.apply(p - self.root_p)
        rpy = (local * _rotation(q)).as_euler("xyz")
        return np.array([*xyz, *rpy, self.open], dtype=np.float32)

    def action(self) -> np.ndarray:
        """The next Bridge action: world vector (base frame), roll/pitch/yaw delta, open gripper."""
        while True:
            kind, goal, grip = self.plan[min(self.phase, len(self.plan) - 1)]
            if kind == "grip":
                self.held += 1
                if self.held > GRIP_STEPS:
                    self.phase, self.held = self.phase + 1, 0
                    continue
                move = np.zeros(3)
                break
            assert goal is not None
            delta = goal - _pose(self.ee.pose)[0]
            if np.linalg.norm(delta) < REACHED_M:
                if self.phase < len(self.plan) - 1:
                    self.phase += 1
                    continue
                delta = np.zeros(3)  # done: hold still (no creeping residuals a policy could not tell apart)
            move = np.clip(delta, -MAX_STEP_M, MAX_STEP_M)
            break
        yaw = 0.0
        if self.phase <= 1:  # turn on the way down, so the fingers close across the object
            error = (self.target_yaw - self._ee_yaw() + np.pi) % (2 * np.pi) - np.pi
            yaw = float(np.clip(error, -MAX_TURN_RAD, MAX_TURN_RAD))
        self.open = grip
        return np.array([*self.root.inv().apply(move), 0.0, 0.0, yaw, grip], dtype=np.float32)


def record(sim: Any, task: Task, config: int, seed: int, noise: float) -> Demo:
    """Run the expert once in `sim` (a one-env `ManiSkillSim`) and record what the camera saw."""
    rng = np.random.default_rng([seed, config])
    out = sim.reset([seed], [config])
    expert = ScriptedExpert(sim.env, WAYPOINTS[task.name], rng, noise)
    gripper = GripperState("widowx", 1)
    demo = Demo(task, config, seed, out.instructions[0] if out.instructions else "")
    for _ in range(sim.max_steps):
        state = expert.state()
        action = expert.action()
        demo.frames.append(encode_jpeg(resize_image(out.images[0], IMAGE_SIZE), quality=95))
        demo.states.append(state)
        demo.actions.append(action)
        out = sim.step(flat_env_action(env_actions(action[None], gripper)))
        if out.done:
            break
    demo.success = bool(out.infos[0].get("success", False))
    return demo


def record_demos(
    suite: str,
    tasks: list[str] | None,
    episodes: int,
    out: Path,
    seed: int = 0,
    noise: float = 0.01,
    progress: Callable[[str], None] = print,
) -> DemosSummary:
    """Try `episodes` demonstrations per task, keep the successful ones, write them to `out` as Bridge RLDS."""
    from .backends.maniskill import ManiSkillSim, check_assets

    if suite != "widowx":
        raise EvalError(f"--suite {suite!r}: demonstrations are recorded in the widowx suite's scenes only")
    if episodes < 1:
        raise EvalError(f"--episodes {episodes}: must be at least 1")
    chosen = suite_tasks(suite, tasks)
    for task in chosen:  # the WidowX scenes are ManiSkill3's: a missing simulator or asset is one line now
        check_assets(task.env_id)
    if out.exists() and any(p.name != PRIVATE_DIR for p in out.iterdir()):
        raise EvalError(f"--out {out}: exists and is not empty; demonstrations are written to a new folder")
    summary = DemosSummary(out=out)
    kept: list[Demo] = []
    with hold_output(out, "refine-eval demos"):
        for task in chosen:
            sim = ManiSkillSim(task.env_id, 1, "cpu")
            try:
                for config, s in demo_tries(sim.n_configs, episodes, seed):
                    demo = record(sim, task, config, s, noise)
                    summary.tried[task.name] = summary.tried.get(task.name, 0) + 1
                    if demo.success:
                        kept.append(demo)
                        summary.kept[task.name] = summary.kept.get(task.name, 0) + 1
                    progress(f"  {task.name} config {config} seed {s}: {'kept' if demo.success else 'failed, dropped'}")
            finally:
                sim.close()
        if not kept:
            raise EvalError("the expert succeeded in no episode: nothing to write")
        write_demos(kept, out)
    return summary


def _examples(demos: list[Demo]) -> Iterator[dict[str, Any]]:
    for index, demo in enumerate(demos):
        yield bridge_example(
            index,
            np.stack(demo.states),
            np.stack(demo.actions),
            {"image_0": demo.frames},
            instruction=demo.instruction,
            file_path=demo.file_path,
        )


def write_demos(demos: list[Demo], out: Path) -> None:
    """The TFDS builder files in `out` itself (features.json, dataset_info.json, TFRecord shards), and the
    declaration of their transform and robot."""
    staging = out / PRIVATE_DIR / "demos.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        built = Path(
            write_rlds(
                staging,
                bridge_features(cameras=1, image_size=IMAGE_SIZE),
                _examples(demos),
                name=DATASET_NAME,
                description="Scripted demonstrations in SimplerEnv's WidowX scenes (refine-eval demos).",
            )
        )
        for path in sorted(built.iterdir()):
            path.replace(out / path.name)
        (out / DECLARATION_FILE).write_text(json.dumps(DECLARATION, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
