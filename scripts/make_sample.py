r"""Generate refinevla's embedded sample: real ManiSkill3 episodes in BridgeData V2's RLDS layout.

The sample (``annotate/sources/sample/refinevla_sample/1.0.0``, read by ``open_source("sample")``)
lets every stage run offline on *real* robot trajectories rather than noise: a Franka Panda in
ManiSkill3's CPU simulator, driven by ManiSkill's own motion-planning solutions
(``mani_skill.examples.motionplanning.panda.solutions``), rendered by one camera and written by
refinevla's own writer (``refinevla.annotate.sources.rlds_writer.write_rlds``) with the exact
Bridge feature spec (``specs.bridge_features(cameras=1)``).

It runs in two stages because the simulator and refinevla want different environments
(mani-skill's planner, mplib 0.1.1, segfaults under numpy 2; refinevla's dev venv is not
touched):

1. ``simulate`` (simulator venv): solve the tasks, keep successful episodes, save one ``.npz``
   per episode (frames, TCP poses, gripper opening and commands) into a work directory.
2. ``write`` (refinevla venv): turn those into Bridge-convention steps and write the RLDS shards.

Exact commands (Debian bookworm, CPU only, run from the repository root)::

    # Vulkan for SAPIEN's CPU renderer: stock Mesa 22.3 lavapipe fails with
    # 'Failed to find a supported physical device "cpu"'; bookworm-backports' Mesa works.
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/backports.sources
    apt-get update
    apt-get install -y -t bookworm-backports mesa-vulkan-drivers libvulkan1

    # Simulator venv outside the repository. torch first, pinned to the CPU wheel
    # (an unpinned torch pulls a multi-GB CUDA build); numpy<2 for mplib's planner.
    python3 -m venv /work/simenv
    /work/simenv/bin/pip install torch==2.13.0
    /work/simenv/bin/pip install mani-skill==3.0.1 "numpy<2"

    # Stage 1: simulate (about 1 minute on 2 CPU cores). Assets for these four tasks ship
    # with mani-skill; nothing is downloaded.
    /work/simenv/bin/python scripts/make_sample.py simulate --work-dir /tmp/refinevla_sample_npz

    # Stage 2: write annotate/sources/sample/refinevla_sample/1.0.0 (replacing what is there),
    # with refinevla's dev venv (refinevla installed, e.g. `pip install -e .[dev]`).
    .venv/bin/python scripts/make_sample.py write --work-dir /tmp/refinevla_sample_npz

Both stages are deterministic: the episode plan (task, seeds, instruction) is fixed below, the
CPU physics and the screw-motion planner have no unseeded randomness, JPEG encoding is
deterministic, and the shards are re-serialised with deterministic protobuf map order, so a
regeneration is byte-identical (checked: two independent simulate + write runs gave the same
files). A seed whose plan fails is skipped and the next seed tried, so the set of seeds used is
itself a function of the plan. Versions used: mani-skill 3.0.1, sapien 3.0.3, mplib 0.1.1,
torch 2.13.0+cpu, numpy 1.26.4, Mesa 25.0.7 (bookworm-backports).

Conventions written (Bridge's):

* ``observation/state`` float32 (7,) = TCP ``[x, y, z, roll, pitch, yaw, gripper]`` in the world
  frame (metres, radians; roll/pitch/yaw extrinsic XYZ, unwrapped over time so they are
  continuous), gripper = finger opening / 0.08 m, so 1 = fully open and 0 = fully closed (about
  0.5 while holding a 4 cm cube).
* ``action`` float32 (7,): ``action[t, :6] = state[t + 1, :6] - state[t, :6]`` (delta EEF pose
  between consecutive recorded steps), zero on the last step; ``action[t, 6]`` = the planner's
  gripper command over that interval, 1 = open, 0 = close.
* Rate: ManiSkill controls at 20 Hz; every ``STRIDE``-th control step is kept (10 Hz), the
  final one always, so episodes are 25-60 steps (Bridge records at 5 Hz).
* ``image_0``: 256x256 RGB, JPEG, from the task's human render camera moved to an elevated spot
  at the robot's right, looking down at the table (in the spirit of Bridge's over-the-shoulder
  ``image_0``: the arm reaches into the scene from the top of the frame).
* ``language_embedding`` is all zeros: a placeholder with Bridge's shape, *not* a real
  sentence embedding.
* reward 1.0 on the last step (every kept episode is successful), discount 1.0,
  ``is_last``/``is_terminal`` on the last step.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_ROOT = os.path.join(REPO, "annotate", "sources", "sample")
NAME = "refinevla_sample"
VERSION = "1.0.0"

CONTROL_HZ = 20  # ManiSkill3 tabletop tasks: sim 100 Hz, control 20 Hz
STRIDE = 2  # keep every 2nd control step -> 10 Hz
IMAGE_SIZE = 256
JPEG_QUALITY = 75  # keeps the whole sample under 12 MB
GRIPPER_MAX_OPENING = 0.08  # Panda: two fingers, 0..0.04 m each

# Elevated camera at the robot's right (robot base at x = -0.615 facing +x), looking down at the
# workspace; fov in radians. Chosen by looking at renders so that the arm, the gripper, the
# objects and the targets are all in view and the gripper rarely hides the object it grasps.
CAMERA_EYE = (-0.15, -0.5, 0.6)
CAMERA_TARGET = (0.02, 0.02, 0.04)
CAMERA_FOV = 1.0


@dataclass(frozen=True)
class TaskPlan:
    """One task: which seeds to try, how many successes to keep, instructions matching the scene."""

    env_id: str
    solver: str  # function name in mani_skill.examples.motionplanning.panda.solutions
    first_seed: int
    count: int
    instructions: tuple[str, ...]  # cycled over the kept episodes; colours match the render


# Colours are the tasks' own: PickCube red cube + green goal ball; StackCube red cube A on
# green cube B; PushCube / PullCube blue cube + red-and-white target disc.
PLAN: tuple[TaskPlan, ...] = (
    TaskPlan(
        "PickCube-v1",
        "solvePickCube",
        100,
        4,
        (
            "pick up the red cube and lift it to the green ball",
            "grab the red block and raise it to the green marker",
            "lift the red cube up to the green target",
            "pick up the red cube",
        ),
    ),
    TaskPlan(
        "StackCube-v1",
        "solveStackCube",
        200,
        4,
        (
            "stack the red cube on top of the green cube",
            "put the red block on the green block",
            "place the red cube onto the green one",
            "pick up the red cube and stack it on the green cube",
        ),
    ),
    TaskPlan(
        "PushCube-v1",
        "solvePushCube",
        300,
        4,
        (
            "push the blue cube to the red and white target",
            "slide the blue block forward onto the target",
            "push the cube to the target",
            "push the blue cube away from the robot onto the target",
        ),
    ),
    TaskPlan(
        "PullCube-v1",
        "solvePullCube",
        400,
        3,
        (
            "pull the blue cube towards the robot onto the target",
            "drag the blue block back to the red and white target",
            "pull the cube back towards you",
        ),
    ),
)
MAX_TRIES = 10  # seeds tried per task beyond `count` before giving up


# --------------------------------------------------------------------------- #
# Stage 1: simulate (simulator venv)
# --------------------------------------------------------------------------- #


def _make_recorder(env: Any, stride: int) -> Any:
    """Wrap an env so every reset/step records what the dataset needs.

    The motion-planning solvers call ``env.reset`` and ``env.step`` themselves, so recording
    in a wrapper sees exactly the executed trajectory. Frames are rendered only for the
    control steps that will be kept (every ``stride``-th), which is most of the cost.
    """
    import gymnasium as gym

    class Recorder(gym.Wrapper):  # type: ignore[misc]
        def reset(self, **kwargs: Any) -> Any:
            out = self.env.reset(**kwargs)
            self.tcp_p: list[np.ndarray] = []
            self.tcp_q: list[np.ndarray] = []
            self.opening: list[float] = []
            self.command: list[float] = []  # gripper command of each executed action
            self.frames: dict[int, np.ndarray] = {}
            self._observe()
            return out

        def step(self, action: Any) -> Any:
            out = self.env.step(action)
            self.command.append(float(np.asarray(action).reshape(-1)[-1]))
            self._observe()
            return out

        def render_frame(self, index: int) -> None:
            if index not in self.frames:
                img = self.env.render()
                img = img.cpu().numpy() if hasattr(img, "cpu") else np.asarray(img)
                self.frames[index] = np.ascontiguousarray(img[0].astype(np.uint8))

        def _observe(self) -> None:
            base = self.env.unwrapped
            pose = base.agent.tcp.pose
            self.tcp_p.append(pose.p[0].cpu().numpy().astype(np.float64))
            self.tcp_q.append(pose.q[0].cpu().numpy().astype(np.float64))  # w, x, y, z
            qpos = base.agent.robot.get_qpos()[0].cpu().numpy()
            self.opening.append(float(qpos[-2:].sum()))
            index = len(self.tcp_p) - 1
            if index % stride == 0:
                self.render_frame(index)

    return Recorder(env)


def simulate(work_dir: str) -> list[str]:
    """Solve every planned episode and save the successful ones as .npz; return their paths."""
    import gymnasium as gym
    import mani_skill
    import mani_skill.envs  # registers the tasks with gymnasium
    from mani_skill.examples.motionplanning.panda import solutions
    from mani_skill.utils import sapien_utils

    os.makedirs(work_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(work_dir, "*.npz")):
        os.remove(stale)
    cam = sapien_utils.look_at(list(CAMERA_EYE), list(CAMERA_TARGET))
    cam_pose = [float(x) for x in np.asarray(cam.raw_pose).reshape(-1)[:7]]  # x y z qw qx qy qz
    written: list[str] = []
    for plan in PLAN:
        env = gym.make(
            plan.env_id,
            obs_mode="none",
            control_mode="pd_joint_pos",  # what the motion-planning solutions drive
            render_mode="rgb_array",
            sim_backend="cpu",
            max_episode_steps=1000,  # the solutions run past the RL time limit (50)
            human_render_camera_configs={
                "render_camera": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "pose": cam_pose, "fov": CAMERA_FOV}
            },
        )
        rec = _make_recorder(env, STRIDE)
        solve = getattr(solutions, plan.solver)
        kept = 0
        for seed in range(plan.first_seed, plan.first_seed + plan.count + MAX_TRIES):
            if kept == plan.count:
                break
            t0 = time.time()
            try:
                res = solve(rec, seed=seed, debug=False, vis=False)
            except Exception as exc:  # the solutions raise on unreachable poses
                print(f"{plan.env_id} seed {seed}: planner error {exc!r}", file=sys.stderr)
                continue
            success = res != -1 and bool(np.asarray(res[-1]["success"]).reshape(-1)[0])
            n_raw = len(rec.tcp_p)
            print(f"{plan.env_id} seed {seed}: {n_raw - 1} control steps, success={success}, {time.time() - t0:.1f}s")
            if not success:
                continue
            keep = list(range(0, n_raw, STRIDE))
            if keep[-1] != n_raw - 1:
                keep.append(n_raw - 1)
                rec.render_frame(n_raw - 1)  # the env still holds the final state
            path = os.path.join(work_dir, f"{plan.env_id}_seed{seed:04d}.npz")
            np.savez_compressed(
                path,
                env_id=plan.env_id,
                seed=seed,
                instruction=plan.instructions[kept % len(plan.instructions)],
                keep=np.asarray(keep, dtype=np.int64),
                frames=np.stack([rec.frames[i] for i in keep]),
                tcp_p=np.asarray(rec.tcp_p),
                tcp_q=np.asarray(rec.tcp_q),
                opening=np.asarray(rec.opening),
                command=np.asarray(rec.command),
                control_hz=CONTROL_HZ,
                maniskill_version=mani_skill.__version__,
            )
            written.append(path)
            kept += 1
        env.close()
        if kept < plan.count:
            raise RuntimeError(f"{plan.env_id}: only {kept}/{plan.count} successful episodes")
    return written


# --------------------------------------------------------------------------- #
# Stage 2: write (refinevla venv)
# --------------------------------------------------------------------------- #


def quat_wxyz_to_rpy(q: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) as w, x, y, z (SAPIEN's order) -> roll, pitch, yaw (extrinsic XYZ).

    Same convention as the reader's Fractal conversion, so all sources agree.
    """
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.stack([roll, pitch, yaw], axis=-1)


def bridge_arrays(rec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Recorded raw control steps -> Bridge (states, actions), both float32 (T, 7), at the kept rate.

    The top-down Panda grasp has roll near +-pi, so Euler angles are unwrapped over time;
    otherwise a +pi/-pi flip would show up as a 2*pi rotation in the deltas.
    """
    keep = np.asarray(rec["keep"])
    rpy = np.unwrap(quat_wxyz_to_rpy(np.asarray(rec["tcp_q"])), axis=0)
    opening = np.clip(np.asarray(rec["opening"]) / GRIPPER_MAX_OPENING, 0.0, 1.0)
    states = np.concatenate([np.asarray(rec["tcp_p"]), rpy, opening[:, None]], axis=1)[keep]
    actions = np.zeros_like(states)
    actions[:-1, :6] = states[1:, :6] - states[:-1, :6]
    # Gripper command over interval t -> t+1: the last raw action before reaching step t+1
    # (planner: +1 open, -1 closed). The last step holds the final command.
    command = np.asarray(rec["command"])
    idx = np.append(keep[1:] - 1, len(command) - 1)
    actions[:, 6] = (command[idx] > 0).astype(np.float64)
    return states.astype(np.float32), actions.astype(np.float32)


def build_episode(rec: Any, episode_id: int) -> dict[str, Any]:
    """One .npz record -> a TFDS example dict in Bridge's layout (images as JPEG bytes)."""
    from refinevla.annotate.sources.rlds_writer import encode_jpeg
    from refinevla.annotate.sources.specs import bridge_example

    states, actions = bridge_arrays(rec)
    frames = np.asarray(rec["frames"])
    return bridge_example(
        episode_id,
        states,
        actions,
        {"image_0": [encode_jpeg(frame, quality=JPEG_QUALITY) for frame in frames[: len(states)]]},
        instruction=str(rec["instruction"]),
        file_path=f"maniskill3/{rec['env_id']}/seed_{int(rec['seed'])}",
    )


def _interleaved(paths: list[str]) -> list[str]:
    """Round-robin over tasks (in PLAN order, then by seed) so any prefix shows every task."""
    by_task = {p.env_id: sorted(q for q in paths if os.path.basename(q).startswith(p.env_id + "_")) for p in PLAN}
    out: list[str] = []
    for i in range(max(len(v) for v in by_task.values())):
        out.extend(v[i] for v in by_task.values() if i < len(v))
    return out


def write(work_dir: str) -> str:
    """Write the .npz episodes in `work_dir` as the package's RLDS sample; return its directory."""
    from refinevla.annotate.sources.rlds_writer import write_rlds
    from refinevla.annotate.sources.specs import bridge_features

    paths = _interleaved(glob.glob(os.path.join(work_dir, "*.npz")))
    if not paths:
        raise SystemExit(f"no .npz episodes in {work_dir}: run the simulate stage first")
    episodes = []
    version = "?"
    for i, path in enumerate(paths):
        with np.load(path) as rec:
            episodes.append(build_episode(rec, i))
            version = str(rec["maniskill_version"])
    tasks = ", ".join(p.env_id for p in PLAN)
    description = (
        f"refinevla's embedded sample: {len(episodes)} simulated Franka Panda episodes from ManiSkill3 {version} "
        f"({tasks}), solved by ManiSkill's motion planner, in BridgeData V2's RLDS layout. One camera, "
        f"image_0 ({IMAGE_SIZE}x{IMAGE_SIZE}, elevated view from the robot's right). "
        f"Recorded at {CONTROL_HZ // STRIDE} Hz (1 in {STRIDE} of the {CONTROL_HZ} Hz control steps). "
        "State = TCP xyz, roll/pitch/yaw, gripper opening (1 open, 0 closed); "
        "action = delta of consecutive states + gripper command (1 open, 0 close). "
        "language_embedding is zeros (not a real embedding). Generated by scripts/make_sample.py."
    )
    target = os.path.join(SAMPLE_ROOT, NAME, VERSION)
    if os.path.isdir(target):
        shutil.rmtree(target)  # stale shards from a different shard count would linger
    out = write_rlds(
        SAMPLE_ROOT,
        bridge_features(cameras=1),
        episodes,
        name=NAME,
        version=VERSION,
        num_shards=2,
        description=description,
    )
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {len(episodes)} episodes, {size / 1e6:.2f} MB -> {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("simulate", "write"))
    parser.add_argument("--work-dir", default="/tmp/refinevla_sample_npz", help="where the .npz episodes go")
    args = parser.parse_args(argv)
    if args.stage == "simulate":
        paths = simulate(args.work_dir)
        print(f"{len(paths)} episodes in {args.work_dir}")
    else:
        write(args.work_dir)


if __name__ == "__main__":
    main()
