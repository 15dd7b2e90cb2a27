"""`refine-eval demos --suite libero`: scripted pick-and-place demonstrations in LIBERO's scenes, as a LeRobot v3
dataset in the layout of LeRobot's LIBERO datasets.

LIBERO ships human demonstrations, but not for LIBERO-PRO's scenes nor for whatever a user wants to check end to
end offline; a scripted expert closes the loop (demos -> refine-train -> refine-eval) on this machine. It reads the
privileged poses of the object and the target of the task's BDDL goal (one `On` or `In`; the target may be a
region's site, a stove's cook region), then drives robosuite's OSC controller closed loop (a proportional step towards
each waypoint, clipped to the action's [-1, 1]): above the object -> down to it -> close -> lift (slowly) -> above
the target (the object's offset in the hand kept) -> down -> open -> off the rim -> up (a bowl is taken by its rim,
anything else about its origin), until the env's own success predicate holds (the episode ends there, as in
LIBERO's reference evaluation) or the suite's step limit passes. Only successful tries are kept; a dropped one
says why (the object did not come up, or where it was let go).
Made for the pick-and-place tasks of libero_object ("pick up the X and place it in the basket") and
libero_spatial ("pick up the black bowl ... and place it on the plate"); a task whose goal is not one such move
(open a drawer, turn on the stove, two objects), whose object starts in a drawer, or whose target is behind a
drawer or door is declined in one line before any env is built (`pick_and_place`).

What is stored is what the policy sees and does, in LeRobot's LIBERO layout: `observation.images.image`
(agentview) and `observation.images.wrist_image`, both turned 180 degrees as in the published datasets and as
`backends/libero.py` shows them to the policy, stored as PNG (lossless: a frame read back equals the one the
policy saw); `observation.state` (8-D: eef position, eef axis-angle, finger joints); `action` (7-D, the env's
own: OSC delta position and axis-angle in [-1, 1], gripper -1 open / +1 close); and the 7-D end-effector state
refinevla's motion primitives read (`observation.states.ee_state` xyz + roll/pitch/yaw, `observation.states.gripper`
the finger opening in 0..1). Per episode, `refinevla_demos.json` records its suite, task id, initial-state index and
seed (the scene it replays in), and `refinevla_source.json` declares the robot (`libero_panda`), that the actions
need no transform, and those two features as the state: `refine-data annotate` and `refine-train` take the folder
with no flag, and the trained policy declares LIBERO's conventions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..annotate.outputs import hold_output
from ..annotate.sources.base import DECLARATION_FILE
from ..annotate.sources.libero_layout import LIBERO_DECLARATION, LIBERO_ROBOT_TYPE, gripper_opening
from ..schemas.dataset_layout import PRIVATE_DIR
from .errors import EvalError
from .suites import Task, suite_tasks

if TYPE_CHECKING:
    from ..annotate.sources.lerobot_writer import ExtraColumn

SCENES_FILE = "refinevla_demos.json"  # episode index -> the LIBERO scene it was recorded in
DATASET_NAME = "libero_demos"
CAMERAS = ("image", "wrist_image")  # observation.images.<camera>, as LeRobot's LIBERO datasets name them
DECLARATION = {
    **LIBERO_DECLARATION,  # robot libero_panda, no transform: what the lerobot: reader infers for LIBERO's layout
    # what refinevla reads as the episodes' state (annotate's motion primitives, training): the 7-D one;
    # LIBERO's 8-D observation.state is there for policies that take it (`--state-key observation.state`)
    "state_key": ["observation.states.ee_state", "observation.states.gripper"],
    "why": "actions are the env's own (robosuite OSC_POSE deltas in [-1, 1], gripper -1 open / +1 close), as "
    "LeRobot's LIBERO datasets store them: trained and replayed as stored",
}
GAIN = 15.0  # action per metre of error: 1 (the controller's 5 cm) from about 7 cm away
HOVER, LIFT, PLACE = 0.12, 0.20, 0.12  # heights (m) of the approach, the carry and the release above the origins
FREE = 0.02  # after a rim release, the hand moves this far (m) towards the object's middle before it goes up
MISSED = 0.03  # an object that rose less than this (m) in the lift is not in the hand
DROP = 0.05  # `On` goals: the object's origin this far (m) above the target's when the gripper opens
GRIP_STEPS = 10  # steps spent closing or opening in place
APPROACH_SPEED = 1.0  # the largest action per axis on the way to the object (free space)
LIFT_SPEED = 0.25  # the largest action per axis in the lift's first BREAKAWAY: a rim-held bowl at 0.5 can slip out
BREAKAWAY = 0.05  # m: the slow start of the lift (all of it slow put a bowl from the cabinet top past the 220 steps)
# the 7-D state refine-data annotate's motion primitives need, as two features (LeRobot's LIBERO datasets name the
# first); the folder declares them as its state (DECLARATION), so annotate and refine-train read them unasked
EE_STATE_KEYS = ("observation.states.ee_state", "observation.states.gripper")
# where the fingers close, from the object's origin, by kind: a bowl by its rim, 5 cm off its centre along y (the
# fingers close along y: they straddle the rim's wall) and 2 cm up; anything else 1 cm below its origin
GRASP_AT = {"bowl": np.array([0.0, 0.05, 0.02])}
# fixtures whose inside regions (`wooden_cabinet_1_top_region`: a drawer) are reached only through a drawer or a door
# (LIBERO's articulated fixtures, `libero/envs/objects/articulated_objects.py`): a goal `In` one of them is declined
BEHIND_DOORS = ("cabinet", "microwave", "fridge")


@dataclass(frozen=True)
class Leg:
    """A stretch of the expert's motion: towards `goal` (None: hold still) with the gripper at `grip`."""

    phase: str
    goal: np.ndarray | None
    grip: float  # -1 open, +1 close (robosuite's sign)
    speed: float  # the largest action per axis
    tolerance: float  # metres: the leg ends within it (or when the arm stops moving, or after `limit` steps)
    limit: int


def pick_and_place(problem: dict[str, Any], label: str) -> tuple[str, str, str]:
    """(relation `on` | `in`, object, target) of a task the expert can do, from its parsed BDDL problem; else an
    EvalError whose one line names the task and why. The expert does one grasp from above and one release: the goal
    must be a single `On` or `In` of a movable object (LIBERO's predicates, `predicates/base_predicates.py`), and
    the object must not start inside something (a bowl in a drawer: the fingers meet the cabinet on the way down).
    Goals such as opening a drawer, turning on the stove, or two objects to place (most of libero_10) are declined
    before any env is built, not tried and silently dropped."""
    goal = [list(p) for p in problem.get("goal_state", [])]

    def say(pred: list[str]) -> str:
        return "(" + " ".join(pred) + ")"

    head = f"{label}: declined by the LIBERO expert"
    if len(goal) != 1 or goal[0][0].lower() not in ("on", "in") or len(goal[0]) != 3:
        raise EvalError(
            f"{head}: its goal {' and '.join(say(p) for p in goal)} is not one object put on or in another "
            "(the expert does a single pick-and-place)"
        )
    relation, obj, target = goal[0]
    if relation.lower() == "in" and any(kind in target for kind in BEHIND_DOORS):
        raise EvalError(f"{head}: {say(goal[0])} is behind a drawer or door (the expert opens nothing)")
    inside = [say(p) for p in problem.get("initial_state", []) if p[0].lower() == "in" and p[1] == obj]
    if inside:
        raise EvalError(f"{head}: {obj} starts inside something {inside[0]} (the expert grasps from above only)")
    return relation.lower(), obj, target


def target_position(sim: Any, obs: dict[str, Any], name: str) -> np.ndarray:
    """Where `name` is: an object's own pose observation, or a region's site (a stove's cook region, a rack's top:
    LIBERO's `SiteObjectState`, what its `On`/`In` predicates test against)."""
    if f"{name}_pos" in obs:
        return np.asarray(obs[f"{name}_pos"], dtype=np.float64)
    states = getattr(getattr(sim.env, "env", sim.env), "object_states_dict", {})
    if name not in states:
        raise EvalError(f"{sim.label}: the LIBERO expert finds no pose for {name}")
    return np.asarray(states[name].get_geom_state()["pos"], dtype=np.float64)


class LiberoExpert:
    """Privileged pick-and-place: the legs above, each a few dozen steps at most."""

    def __init__(self, sim: Any, obs: dict[str, Any], problem: dict[str, Any] | None = None) -> None:
        got = problem if problem is not None else getattr(getattr(sim.env, "env", sim.env), "parsed_problem", {})
        self.relation, self.obj, self.target = pick_and_place(got, sim.label)
        if f"{self.obj}_pos" not in obs:
            raise EvalError(f"{sim.label}: declined by the LIBERO expert: {self.obj} has no pose (not movable)")
        self.sim = sim
        up = np.array([0.0, 0.0, 1.0])
        self.grasp = next((g for kind, g in GRASP_AT.items() if kind in self.obj), -0.01 * up)
        self.start = np.asarray(obs[f"{self.obj}_pos"], dtype=np.float64)
        o = self.start + self.grasp
        self.legs = [
            Leg("approach", o + HOVER * up, -1.0, APPROACH_SPEED, 0.006, 60),
            Leg("descend", o, -1.0, 0.5, 0.008, 40),  # re-aimed when it starts: the object may have settled
            Leg("grasp", None, 1.0, 0.0, 0.0, GRIP_STEPS),
            Leg("lift", o + LIFT * up, 1.0, LIFT_SPEED, 0.02, 60),
            Leg("transport", None, 1.0, 0.5, 0.02, 90),  # goal set at the end of the lift (the hand's offset)
            Leg("place", None, 1.0, 0.5, 0.01, 40),
            Leg("release", None, -1.0, 0.0, 0.0, GRIP_STEPS),
            Leg("free", None, -1.0, 0.3, 0.005, 10),  # set at the release: off the rim, towards the bowl's middle
            Leg("retreat", None, -1.0, 1.0, 0.02, 30),
        ]
        self.leg = 0
        self.t = 0
        self.offset = np.zeros(3)  # the hand's offset from the object, measured after the lift
        self.rise = 0.0  # how far the object came up with the hand in the lift (m): a missed grasp leaves it at 0
        self.gap = np.zeros(3)  # object - target when the gripper opened
        self.hold = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.last = self.hold.copy()

    def _enter(self, obs: dict[str, Any]) -> None:
        """Start the next leg: goals that depend on where the object ended up are set now."""
        self.leg += 1
        self.t = 0
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.hold = eef.copy()
        if self.leg >= len(self.legs):
            return
        leg = self.legs[self.leg]
        target = target_position(self.sim, obs, self.target)
        obj = np.asarray(obs[f"{self.obj}_pos"], dtype=np.float64)
        in_hand = eef - obj
        hang = in_hand[2]  # how far the hand is above the object's origin
        in_hand[2] = 0.0  # the object hangs off the grasp point: aim the object, not the hand, at the target
        if leg.phase == "descend":
            self.legs[self.leg] = Leg(leg.phase, obj + self.grasp, *_rest(leg))
        elif leg.phase == "transport":
            self.rise = float(obj[2] - self.start[2])
            self.offset = in_hand
            self.legs[self.leg] = Leg(leg.phase, target + self.offset + [0, 0, LIFT], *_rest(leg))
        elif leg.phase == "place":
            # measured again: a rim-held bowl swings in the carry. On a surface (`On`), the object is let go just
            # above it (its origin DROP over the target's): dropped from the carry height a bowl lands on its
            # rim and slides off the plate; into a basket (`In`), the hand stops PLACE above the basket's origin
            self.offset = in_hand
            height = DROP + hang if self.relation == "on" else PLACE
            self.legs[self.leg] = Leg(leg.phase, target + self.offset + [0, 0, height], *_rest(leg))
        elif leg.phase == "release":
            self.gap = obj - target
        elif leg.phase == "free":
            # a rim grasp (the hand off the object's middle) leaves a finger against the wall: lifted straight up,
            # the open fingers carried the bowl up and dropped it off the plate; 2 cm towards its middle frees them
            side = np.linalg.norm(self.offset)
            away = -FREE * self.offset / side if side > 0.01 else np.zeros(3)
            self.legs[self.leg] = Leg(leg.phase, eef + away, *_rest(leg))
        elif leg.phase == "retreat":
            self.legs[self.leg] = Leg(leg.phase, eef + 0.1 * np.array([0.0, 0.0, 1.0]), *_rest(leg))

    @property
    def phase(self) -> str:
        return self.legs[min(self.leg, len(self.legs) - 1)].phase

    def failure(self) -> str:
        """Why a try that ended without the env's success failed, from where the expert got to: what the
        `dropped` line says, so a task the expert cannot do reads as a reason, not a bare 0/N."""
        phases = [leg.phase for leg in self.legs]
        if self.leg <= phases.index("lift"):
            return f"the step limit came in the {self.phase}"
        if self.rise < MISSED:
            return f"{self.obj} did not come up with the hand ({100 * self.rise:.1f} cm): the grasp missed or slipped"
        if self.leg <= phases.index("place"):
            return f"the step limit came in the {self.phase}"
        gap = ", ".join(f"{100 * v:+.1f}" for v in self.gap)
        return f"let go at ({gap}) cm from {self.target}'s origin and it did not end {self.relation} it"

    def action(self, obs: dict[str, Any]) -> np.ndarray:
        """The next 7-D env action (after the last leg: hold still, gripper open)."""
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        while self.leg < len(self.legs):
            leg = self.legs[self.leg]
            goal = self.hold if leg.goal is None else leg.goal
            error = goal - eef
            stalled = self.t > 3 and np.linalg.norm(eef - self.last) < 5e-4 and leg.goal is not None
            reached = leg.goal is not None and np.linalg.norm(error) < leg.tolerance
            if self.t >= leg.limit or reached or stalled:
                self._enter(obs)
                continue
            self.t += 1
            self.last = eef
            out = np.zeros(7)
            speed = leg.speed
            if leg.phase == "lift" and eef[2] - self.hold[2] > BREAKAWAY:
                speed = 0.5  # off the table the hold is sure: the rest of the lift at the carry's speed
            out[:3] = np.clip(error * GAIN, -speed, speed) if leg.goal is not None else 0.0
            out[6] = leg.grip
            return out
        out = np.zeros(7)
        out[6] = -1.0
        return out


def _rest(leg: Leg) -> tuple[float, float, float, int]:
    return (leg.grip, leg.speed, leg.tolerance, leg.limit)


@dataclass
class LiberoDemo:
    """One try: per step the two turned frames, the 8-D state and the env action."""

    task: Task
    config: int
    seed: int
    instruction: str
    images: list[np.ndarray] = field(default_factory=list)
    wrists: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    ee_states: list[np.ndarray] = field(default_factory=list)  # 7-D: eef xyz, roll/pitch/yaw, gripper opening
    phases: list[str] = field(default_factory=list)
    success: bool = False
    failure: str = ""  # why a try without success failed (LiberoExpert.failure)

    def scene(self) -> dict[str, Any]:
        suite, task_id = self.task.name.split("/")
        return {"suite": suite, "task_id": int(task_id), "init_state": self.config, "seed": self.seed}


def ee_state(obs: dict[str, Any]) -> np.ndarray:
    """[x, y, z, roll, pitch, yaw, gripper opening in 0..1]: the 7-D end-effector state refinevla's motion
    primitives read (`refine-data annotate --state-key` EE_STATE_KEYS), beside LIBERO's own 8-D state."""
    from scipy.spatial.transform import Rotation

    rpy = Rotation.from_quat(np.asarray(obs["robot0_eef_quat"], dtype=np.float64)).as_euler("xyz")  # xyzw
    opening = gripper_opening(np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64))
    return np.concatenate([obs["robot0_eef_pos"], rpy, [opening]]).astype(np.float32)


def record(sim: Any, task: Task, config: int, seed: int, problem: dict[str, Any] | None = None) -> LiberoDemo:
    """One scripted episode from initial state `config`; ends at the env's success or the step limit."""
    out = sim.reset([seed], [config])
    expert = LiberoExpert(sim, sim.obs, problem)
    demo = LiberoDemo(task, config, seed, out.instructions[0])
    while True:
        action = expert.action(sim.obs)
        demo.images.append(out.images[0])
        demo.wrists.append(out.extras["wrist"][0])
        demo.states.append(out.extras["state"][0])
        demo.ee_states.append(ee_state(sim.obs))
        demo.actions.append(action.astype(np.float32))
        demo.phases.append(expert.phase)
        out = sim.step(action[None])
        if out.done:
            demo.success = bool(out.infos[0]["success"])
            demo.failure = "" if demo.success else expert.failure()
            return demo


def record_libero_demos(
    suite: str,
    tasks: list[str] | None,
    episodes: int,
    out: Path,
    seed: int = 0,
    resolution: int | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[dict[str, int], dict[str, int]]:
    """Try initial states 0..episodes-1 of each task, keep the successes, write them to `out` (LeRobot v3).
    Returns (tries, kept) per task."""
    from .backends.libero import LiberoSim, import_libero, task_problem

    if suite != "libero":
        raise EvalError(f"--suite {suite!r}: LIBERO demonstrations are recorded in --suite libero's scenes")
    if episodes < 1:
        raise EvalError(f"--episodes {episodes}: must be at least 1")
    import_libero()
    chosen = suite_tasks(suite, tasks or ["libero_object"])
    if out.exists() and any(p.name != PRIVATE_DIR for p in out.iterdir()):
        raise EvalError(f"--out {out}: exists and is not empty; demonstrations are written to a new folder")
    problems: dict[str, dict[str, Any]] = {}
    declined: list[str] = []
    for task in chosen:  # decided from the BDDL alone: a declined task costs no env and no tries
        suite_name, task_id = task.name.split("/")
        problem = task_problem(suite_name, int(task_id))
        try:
            pick_and_place(problem, task.name)
        except EvalError as why:
            declined.append(str(why))
            continue
        problems[task.name] = problem
    if not problems:
        raise EvalError(declined[0] if len(declined) == 1 else f"every task declined ({len(declined)}): {declined[0]}")
    for line in declined:
        progress(f"  {line}")
    tried: dict[str, int] = {}
    kept_count: dict[str, int] = {}
    kept: list[LiberoDemo] = []
    with hold_output(out, "refine-eval demos"):
        for task in chosen:
            if task.name not in problems:
                continue
            suite_name, task_id = task.name.split("/")
            sim = LiberoSim(suite_name, int(task_id), resolution)
            failures: list[str] = []
            try:
                for config in range(min(episodes, sim.n_configs)):
                    demo = record(sim, task, config, seed + config, problems[task.name])
                    tried[task.name] = tried.get(task.name, 0) + 1
                    verdict = "kept" if demo.success else f"dropped ({demo.failure})"
                    progress(f"  {task.name} initial state {config}: {len(demo.actions)} steps, {verdict}")
                    if demo.success:
                        kept.append(demo)
                        kept_count[task.name] = kept_count.get(task.name, 0) + 1
                    else:
                        failures.append(demo.failure)
                if not kept_count.get(task.name) and failures:
                    common = max(set(failures), key=failures.count)
                    progress(
                        f"  {task.name}: the LIBERO expert could not do it in {len(failures)} tries "
                        f"({failures.count(common)} times: {common})"
                    )
            finally:
                sim.close()
        if not kept:
            raise EvalError(f"no try succeeded ({sum(tried.values())} tried); nothing written to {out}")
        write_libero_demos(kept, out, float(sim.control_freq))
    return tried, kept_count


def write_libero_demos(demos: list[LiberoDemo], out: Path, fps: float) -> None:
    """The LeRobot v3 dataset in `out` with the 7-D state beside LIBERO's 8-D one, its scenes file and its
    declaration."""
    import pyarrow as pa

    from ..annotate.sources.lerobot_writer import ExtraColumn

    pose, grip = EE_STATE_KEYS
    extras = {
        pose: ExtraColumn(
            [[s[:6].tolist() for s in d.ee_states] for d in demos],
            pa.list_(pa.float32()),
            {"dtype": "float32", "shape": [6], "names": ["x", "y", "z", "roll", "pitch", "yaw"]},
        ),
        grip: ExtraColumn(
            [[s[6:].tolist() for s in d.ee_states] for d in demos],
            pa.list_(pa.float32()),
            {"dtype": "float32", "shape": [1], "names": ["gripper"]},
        ),
    }
    write_libero_lerobot(demos, out, fps, extras)
    scenes = {str(i): {**d.scene(), "steps": len(d.actions), "phases": d.phases} for i, d in enumerate(demos)}
    (out / SCENES_FILE).write_text(json.dumps(scenes, indent=1) + "\n", encoding="utf-8")
    (out / DECLARATION_FILE).write_text(json.dumps(DECLARATION, indent=2) + "\n", encoding="utf-8")


def write_libero_lerobot(
    demos: list[LiberoDemo], out: Path, fps: float, extra_columns: dict[str, ExtraColumn] | None = None
) -> None:
    """`demos` as a LeRobot v3 dataset in `out`, in the layout of LeRobot's published LIBERO datasets (robot_type
    panda, the two cameras as PNG, the 8-D `observation.state`, the 7-D `action`) plus `extra_columns`; with
    none, exactly what such a published dataset holds (the tests read it as one)."""
    from ..annotate.episode import Episode, FrameSequence
    from ..annotate.sources.lerobot_writer import encode_png, write_lerobot

    def episode(i: int, demo: LiberoDemo) -> Episode:
        n = len(demo.actions)
        last = np.zeros(n, bool)
        last[-1] = True
        return Episode(
            episode_id=f"{DATASET_NAME}:episode_{i}",
            dataset=DATASET_NAME,
            instruction=demo.instruction,
            actions=np.stack(demo.actions).astype(np.float32),
            states=np.stack(demo.states).astype(np.float32),
            frames={
                CAMERAS[0]: FrameSequence([encode_png(f) for f in demo.images]),
                CAMERAS[1]: FrameSequence([encode_png(f) for f in demo.wrists]),
            },
            is_first=np.arange(n) == 0,
            is_last=last,
            is_terminal=last.copy(),
            rewards=last.astype(np.float32),  # LIBERO's sparse reward: 1 at the success
        )

    out.mkdir(parents=True, exist_ok=True)
    write_lerobot(
        out,
        (episode(i, d) for i, d in enumerate(demos)),
        fps=fps,
        robot_type=LIBERO_ROBOT_TYPE,
        camera_storage="image",
        extra_columns=extra_columns,
    )


def libero_scenes(source: Any, what: str) -> Callable[[Any], tuple[str, int, int]] | None:
    """For a LIBERO demos folder (a LeRobot source with its scenes file): episode -> (SUITE/ID, initial state,
    seed), what a replay and --episodes-from match scenes by; None for any other source."""
    root = getattr(source, "root", None)
    if root is None or not (Path(root) / SCENES_FILE).is_file():
        return None
    scenes = json.loads((Path(root) / SCENES_FILE).read_text(encoding="utf-8"))

    def scene(episode: Any) -> tuple[str, int, int]:
        index = str(episode.metadata.get("episode_index"))
        if index not in scenes:
            raise EvalError(f"{what}: episode {index} is not in {SCENES_FILE} (not a refine-eval demos episode)")
        got = scenes[index]
        return f"{got['suite']}/{got['task_id']}", int(got["init_state"]), int(got["seed"])

    return scene
