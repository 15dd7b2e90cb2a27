"""`refine-eval demos`: scripted demonstrations in SimplerEnv's own WidowX scenes, as BridgeData V2 RLDS.

SimplerEnv ships no demonstrations and ManiSkill's motion planners drive the Panda, so a closed loop
(demos -> `refine-data annotate` -> `refine-train` -> `refine-eval`) needs an expert of our own. It
reads the privileged object poses once, at reset, and plans the waypoints a person would: above the
source object (turning the gripper across the object's yaw on the way) -> down -> close -> up -> above
the target -> down -> open -> up, then holds still. Each leg is cut into equal steps (at most 3 cm per
axis) and sent open loop through the task's own controller
(`arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos`, which adds each delta to its target, so the
target lands on every waypoint exactly). Open loop on purpose: the action is then constant along a leg
and changes only where the arm has visibly moved on, so a policy that sees one frame can learn it. A
closed-loop expert (P-control, a 'waypoint reached' tolerance, slowing down near it) switched phase on
sub-pixel differences and crept at the end: frames that look alike with different actions, which a
single-frame policy cannot imitate. Each waypoint gets a little noise from the episode's seed, so
demonstrations of one configuration are not one trajectory. Only successful episodes are kept.

Every action is written in Bridge's conventions — world vector (the translation command, in the
robot's base frame, as the controller takes it), roll/pitch/yaw delta, absolute open-gripper
(1 = open) — and sent to the env through `robots.env_actions`, SimplerEnv's WidowX post-processing,
so replaying a stored action through refine-eval reproduces the expert's command exactly.

The stored actions are the expert's commands, not Bridge's relabelled reached-state deltas:
training them through the `bridge_orig` transform would teach actions under which the demos no
longer replay. So the folder declares its transform (`none`) and robot (`widowx`) in
`refinevla_source.json`, which refinevla's RLDS reader exposes and `--transform auto` obeys.

Beside it, `refinevla_truth.json` (`refinevla.schemas.truth`; the RLDS reader's `truth()`) holds what the
simulator knew about each kept episode, by the reader's episode id, for `refine-data audit` to hold a
teacher's rationales against: the expert's legs (phases named where the plan is built: approach, descend,
grasp, lift, transport, place, release, retreat, then hold) as executed, cut short where the step limit ended
the episode; the grasp and release steps as `annotate.primitives.gripper_events` finds them in the stored
states (one step after the grasp / release legs start); and the task's objects as the instruction names them
(OBJECT_NAMES), each with its tight box on the stored first frame: the visible pixels of the renderer's
segmentation at reset (the Bridge twins render it anyway, for their green screen), in the 256x256 frame's
pixels with continuous edges (mask columns c0..c1 -> x c0..c1+1, scaled by 256/640 and 256/480), None where
the camera does not see the object. The eggplant task's basket is the invisible plane SimplerEnv scores it
against, which lies in the photographed basket: its box is the basket's inside, not its rim.
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
from ..annotate.primitives import gripper_events
from ..annotate.sources.base import DECLARATION_FILE
from ..annotate.sources.rlds_writer import encode_jpeg, write_rlds
from ..annotate.sources.specs import bridge_example, bridge_features
from ..annotate.video import write_mp4
from ..schemas.dataset_layout import PRIVATE_DIR
from ..schemas.truth import Box, EpisodeTruth, Leg, TruthObject, write_truth
from ..train.policy import resize_image
from .errors import EvalError
from .robots import GripperState, env_actions, flat_env_action
from .suites import Task, suite_tasks

DATASET_NAME = "simpler_widowx"  # the RLDS builder name: episode ids read simpler_widowx/simpler/<ENV_ID>/...
IMAGE_SIZE = (256, 256)  # Bridge stores image_0 at 256x256
MAX_STEP_M = 0.03  # translation per control step at most (Bridge's teleoperation moves about this fast)
MAX_TURN_RAD = 0.2  # yaw per control step at most
GRIP_STEPS = 2  # steps spent closing or opening the gripper in place (few: the frame barely changes meanwhile)
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
    grasp: float = 0.0  # where the fingers close (at the origin: the open-loop target lands exactly there)
    carry: float = 0.10  # lifted, above source and target
    place: float = 0.05  # above the target's origin where the gripper opens
    leave: float = 0.12  # where it rests after letting go


WAYPOINTS = {  # per SimplerEnv task name: the same motion, its own heights where an object needs them
    "carrot_on_plate": Waypoints(),
    "spoon_on_towel": Waypoints(),
    "stack_green_on_yellow": Waypoints(),
    "eggplant_in_basket": Waypoints(),
}
# The simulator's actors by what the tasks' instructions call them: the truth file's object names. The eggplant
# task's target is an invisible plane lying in the basket of the scene's photograph (SimplerEnv scores the
# eggplant against it); its mask is the basket's inside, where the eggplant must land, not the basket's rim.
OBJECT_NAMES = {
    "bridge_carrot_generated_modified": "carrot",
    "bridge_plate_objaverse_larger": "plate",
    "bridge_spoon_generated_modified": "spoon",
    "table_cloth_generated_shorter": "towel",
    "baked_green_cube_3cm": "green block",
    "baked_yellow_cube_3cm": "yellow block",
    "eggplant": "eggplant",
    "dummy_sink_target_plane": "basket",
    "sink": "sink",
}
STAGE_ACTORS = ("arena",)  # the table/sink stage SimplerEnv's Bridge scenes build: background, not an object


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
    camera: list[np.ndarray] = field(default_factory=list)  # full-size frames, kept only for --video
    phases: list[str] = field(default_factory=list)  # per step, the expert's phase (schemas.truth.PHASES)
    objects: tuple[TruthObject, ...] = ()  # the task's objects (source, target), boxed on the first frame
    scene_objects: tuple[str, ...] = ()  # every object in the scene (the robot and stage aside)
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
    """The source of a demos folder (RLDS; LIBERO's: LeRobot); one line naming `what` asked for it if it is none."""
    from ..annotate.errors import RefineError
    from ..annotate.sources import open_source

    kind = "lerobot" if (folder / "meta" / "info.json").is_file() else "rlds"
    try:
        return open_source(f"{kind}:{folder}")
    except RefineError as exc:
        raise EvalError(f"{what}: not a refine-eval demos folder ({exc})") from None


def demo_episodes(source: Any, what: str) -> Iterator[tuple[Scene, Any]]:
    """Each episode of an opened demos folder with its scene; one line for an episode that is no demo."""
    from ..annotate.errors import RefineError
    from ..annotate.sources import ReadOptions
    from .libero_demos import libero_scenes

    libero = libero_scenes(source, what)
    try:
        for episode in source.iter_episodes(ReadOptions()):
            if libero is not None:
                yield libero(episode), episode
                continue
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


@dataclass(frozen=True)
class Segment:
    """`steps` equal control steps of the expert's `phase` (one of schemas.truth.PHASES): each moves the
    target by `move` (robot base frame, m) and turns it by `yaw` (rad), with the gripper commanded to `grip`
    (1 open, 0 closed). The phase is named where the plan is built, so the truth file's legs are the plan's."""

    phase: str
    move: np.ndarray
    yaw: float
    grip: float
    steps: int


class ScriptedExpert:
    """Waypoints planned once from the privileged poses, in Bridge's action conventions (see the module doc).

    The plan is open loop: every leg between two waypoints is cut into equal steps of at most
    MAX_STEP_M per axis, so an action is constant along a leg and a leg's length is fixed when the episode
    starts. The controller accumulates commanded deltas into its target, so the target lands on each
    waypoint exactly however the arm lags. This is what makes the demonstrations learnable from single
    frames: the action changes only where the arm has visibly moved to a new leg, never by a sub-pixel
    'reached' test or a pose-dependent slow-down, and a finished episode holds still.
    """

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

        # turn the fingers across the object: its yaw relative to the gripper's start, folded to [-pi/2, pi/2]
        object_yaw = float(_rotation(src_q).as_euler("xyz")[2])
        turn = (object_yaw - np.pi) % np.pi
        turn = turn - np.pi if turn > np.pi / 2 else turn
        w = waypoints
        self.plan: list[Segment] = []
        self._at = _pose(self.ee.pose)[0]
        self._leg("approach", above(src_p, w.hover, noisy=True), 1.0, turn)  # the whole turn on the way over
        self._leg("descend", above(src_p, w.grasp), 1.0)
        self.plan.append(Segment("grasp", np.zeros(3), 0.0, 0.0, GRIP_STEPS))
        self._leg("lift", above(src_p, w.carry, noisy=True), 0.0)
        self._leg("transport", above(tgt_p, w.carry, noisy=True), 0.0)
        self._leg("place", above(tgt_p, w.place), 0.0)
        self.plan.append(Segment("release", np.zeros(3), 0.0, 1.0, GRIP_STEPS))
        self._leg("retreat", above(tgt_p, w.leave), 1.0)
        self.segment = 0
        self.taken = 0  # steps taken in the current segment
        self.open = 1.0
        self.phase = self.plan[0].phase  # the phase of the last action returned ("hold" once the plan is done)

    def _leg(self, phase: str, goal: np.ndarray, grip: float, turn: float = 0.0) -> None:
        """Plan the straight leg `phase` from the last waypoint to `goal` (world frame) in equal steps."""
        delta = goal - self._at
        steps = max(1, int(np.ceil(max(np.abs(delta).max() / MAX_STEP_M, abs(turn) / MAX_TURN_RAD) - 1e-9)))
        self.plan.append(Segment(phase, self.root.inv().apply(delta / steps), turn / steps, grip, steps))
        self._at = goal

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
        while self.segment < len(self.plan) and self.taken >= self.plan[self.segment].steps:
            self.segment, self.taken = self.segment + 1, 0
        if self.segment == len(self.plan):  # done: hold still, gripper as last commanded
            self.phase = "hold"
            return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, self.open], dtype=np.float32)
        seg = self.plan[self.segment]
        self.taken += 1
        self.open = seg.grip
        self.phase = seg.phase
        return np.array([*seg.move, 0.0, 0.0, seg.yaw, seg.grip], dtype=np.float32)


def record(sim: Any, task: Task, config: int, seed: int, noise: float, video: bool = False) -> Demo:
    """Run the expert once in `sim` (a one-env `ManiSkillSim`) and record what the camera saw (and, for
    `video`, the full-size frames too)."""
    rng = np.random.default_rng([seed, config])
    out = sim.reset([seed], [config])
    expert = ScriptedExpert(sim.env, WAYPOINTS[task.name], rng, noise)
    gripper = GripperState("widowx", 1)
    demo = Demo(task, config, seed, out.instructions[0] if out.instructions else "")
    u = sim.env.unwrapped
    demo.objects, demo.scene_objects = scene_truth(sim.actor_masks(), u.source_obj_name, u.target_obj_name)
    for _ in range(sim.max_steps):
        state = expert.state()
        action = expert.action()
        demo.phases.append(expert.phase)
        demo.frames.append(encode_jpeg(resize_image(out.images[0], IMAGE_SIZE), quality=95))
        if video:
            demo.camera.append(out.images[0])
        demo.states.append(state)
        demo.actions.append(action)
        out = sim.step(flat_env_action(env_actions(action[None], gripper)))
        if out.done:
            break
    if video:
        demo.camera.append(out.images[0])  # the video ends on the outcome, after the last action
    demo.success = bool(out.infos[0].get("success", False))
    return demo


def object_name(actor: str) -> str:
    """What the task calls a simulator actor (OBJECT_NAMES), else the actor's own name."""
    return OBJECT_NAMES.get(actor, actor)


def mask_box(mask: np.ndarray, size: tuple[int, int] = IMAGE_SIZE) -> Box | None:
    """The tight box of a camera-sized boolean mask's pixels in the stored frame of `size` (h, w), which is
    the camera's frame resized: continuous edges (pixel columns c0..c1 span x c0..c1+1), scaled by size over
    the mask's shape, rounded to 0.01 px. None for an empty mask (the camera does not see the object)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    sy, sx = size[0] / mask.shape[0], size[1] / mask.shape[1]
    x0, y0, x1, y1 = cols[0] * sx, rows[0] * sy, (cols[-1] + 1) * sx, (rows[-1] + 1) * sy
    return (round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2))


def scene_truth(
    masks: dict[str, np.ndarray], source: str, target: str
) -> tuple[tuple[TruthObject, ...], tuple[str, ...]]:
    """(the task's objects boxed from their masks, source first; every object's name, seen or not) of a
    scene from `ManiSkillSim.actor_masks` at reset, the stage left out."""
    objects = tuple(
        TruthObject(object_name(actor), role, mask_box(masks[actor]) if actor in masks else None)
        for actor, role in ((source, "source"), (target, "target"))
    )
    return objects, tuple(object_name(a) for a in masks if a not in STAGE_ACTORS)


def legs(phases: list[str]) -> tuple[Leg, ...]:
    """The runs of equal phase in a recorded episode's per-step phases: the legs as executed (a plan cut
    short by the step limit ends on a partial leg; a leg never reached is absent)."""
    out: list[Leg] = []
    for step, phase in enumerate(phases):
        if out and out[-1].phase == phase:
            out[-1] = Leg(phase, out[-1].start_step, step)
        else:
            out.append(Leg(phase, step, step))
    return tuple(out)


def demo_truth(demo: Demo, episode_id: str) -> EpisodeTruth:
    """What the simulator knew about a recorded demonstration, for the truth file: its legs, the steps its
    stored states first show the gripper closed / open again (`gripper_events`, as annotate computes them),
    and its objects."""
    events = gripper_events(np.stack(demo.states))
    grasp = next((e.step for e in events if e.kind == "close"), None)
    release = next((e.step for e in events if e.kind == "open" and grasp is not None and e.step > grasp), None)
    return EpisodeTruth(
        episode_id=episode_id,
        file_path=demo.file_path,
        task=demo.task.name,
        instruction=demo.instruction,
        num_steps=len(demo.actions),
        legs=legs(demo.phases),
        grasp_step=grasp,
        release_step=release,
        image_size=(IMAGE_SIZE[1], IMAGE_SIZE[0]),
        objects=demo.objects,
        scene_objects=demo.scene_objects,
    )


def video_path(demo: Demo) -> Path:
    """Where `--video` puts a try's mp4, relative to the demos folder: dropped tries apart, so a user
    looking at why the expert failed finds them, and a kept one is named by its scene like its episode."""
    name = f"config-{demo.config:03d}_seed-{demo.seed}.mp4"
    return Path("videos") / demo.task.name / ("" if demo.success else "failed") / name


def record_demos(
    suite: str,
    tasks: list[str] | None,
    episodes: int,
    out: Path,
    seed: int = 0,
    noise: float = 0.01,
    video: bool = False,
    progress: Callable[[str], None] = print,
) -> DemosSummary:
    """Try `episodes` demonstrations per task, keep the successful ones, write them to `out` as Bridge RLDS
    (and, with `video`, an mp4 of every try under `out/videos/`)."""
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
                    demo = record(sim, task, config, s, noise, video)
                    if video:
                        write_mp4(out / video_path(demo), demo.camera, sim.control_freq)
                        demo.camera = []  # ~55 MB per try at 640x480: not held until the dataset is written
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


def episode_ids(directory: Path) -> dict[str, str]:
    """file_path -> episode id of each episode in an RLDS folder, as refinevla's RLDS reader names it (read
    back, frames left encoded: the reader is the one authority on its ids)."""
    from ..annotate.sources import ReadOptions, open_source

    return {
        str(e.metadata["file_path"]): e.episode_id
        for e in open_source(f"rlds:{directory}").iter_episodes(ReadOptions())
    }


def write_demos(demos: list[Demo], out: Path) -> None:
    """The TFDS builder files in `out` itself (features.json, dataset_info.json, TFRecord shards), the
    declaration of their transform and robot, and the simulator's truth about each episode."""
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
        ids = episode_ids(built)
        write_truth(built, [demo_truth(d, ids[d.file_path]) for d in demos])
        for path in sorted(built.iterdir()):
            path.replace(out / path.name)
        (out / DECLARATION_FILE).write_text(json.dumps(DECLARATION, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
