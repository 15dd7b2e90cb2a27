"""`RunArgs`: every `refine-eval run` flag, one field each; its help text is the documentation.

Light on purpose (no numpy, no simulator): `refine-eval --help` builds its options from these
fields. The flags `run` shares with `attention` (`--policy`, `--reasoning`, `--device`) are declared
once here as `Flag`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..annotate.cli_options import RAY_ADDRESS_FLAG, Conversion, Flag, option
from ..train.policy import TRUST_REMOTE_CODE


class OnOff(str, Enum):
    on = "on"
    off = "off"


def _task_list(value: str | None) -> list[str] | None:
    from ..annotate.source_args import split_keys

    return list(split_keys(value)) or None


ON_OFF = Conversion(  # a bool that the command line spells on | off
    cli_type=OnOff,
    to_field=lambda value: value is OnOff.on,
    to_cli=lambda value: OnOff.on if value else OnOff.off,
)
COMMA_LIST = Conversion(  # a list of names that the command line spells a,b,c
    cli_type=str | None,
    to_field=_task_list,
    to_cli=lambda value: ",".join(value) if value else None,
)

POLICY = Flag(
    "refine-train checkpoint folder (refinevla_policy.json); replay:DEMOS_DIR (a perfect imitator); "
    "zero: (the trivial policy: still, gripper open)."
)
REASONING = Flag("on: the policy writes its rationale, then the action; off: the action only.", conversion=ON_OFF)
DEVICE = Flag("torch device of the policy; default cuda if there.")


@dataclass
class RunArgs:
    policy: Path = option(help=POLICY)
    suite: str = option(
        help="widowx | google-vm | google-va | maniskill:ENV_ID (any ManiSkill3 task) | libero | libero_pro "
        "(LIBERO-PRO's perturbed suites). Needs the \\[libero] extra for libero*."
    )
    out: Path = option(help="Results folder (episodes.jsonl, run.json, videos/).")
    tasks: list[str] | None = option(
        None,
        "Comma-separated task names (carrot_on_plate, pick_coke_can, ...); default all. LIBERO: SUITE or "
        "SUITE/ID (libero_spatial,libero_object/3; libero_pro: libero_spatial_swap/0); default the four "
        "standard suites.",
        conversion=COMMA_LIST,
    )
    episodes_per_config: int = option(1, "Episodes per built-in task configuration (new seed each).")
    max_episodes: int | None = option(None, "Per task, run at most the first N episodes of the schedule.")
    num_envs: int = option(
        1, "Parallel envs, one policy forward pass for all (GPU: one scene batch; CPU: one process each)."
    )
    reasoning: bool = option(True, REASONING)
    max_rationale_tokens: int | None = option(
        None,
        "Rationale budget per step; then ACTION: is forced. Default: the policy's longest training rationale "
        "+ 25% (recorded in policy.json; 256 for checkpoints that do not record it).",
    )
    video: bool = option(False, "Write an mp4 per episode under videos/.")
    video_rationale: bool = option(
        False, "With --video: write each step's rationale in a panel under its frame (ECoT style)."
    )
    log_actions: bool = option(False, "Keep each step's raw_action and env_action in episodes.jsonl.")
    seed: int = option(0, "Base seed of the env resets.")
    episodes_from: Path | None = option(
        None, "A refine-eval demos folder: run exactly its (configuration, seed) pairs (overfit / replay checks)."
    )
    held_out_from: Path | None = option(
        None, "A refine-eval demos folder: run only the task's configurations it does not contain (held out)."
    )
    instruction: str | None = option(None, "maniskill:ENV_ID: the instruction given to the policy.")
    sim_backend: str | None = option(None, "ManiSkill3 physics: cpu | gpu (default gpu when CUDA is there).")
    camera: str | None = option(None, "maniskill:ENV_ID: the camera the policy sees (default the first).")
    control_mode: str | None = option(None, "maniskill:ENV_ID: a 7-d controller (default pd_ee_delta_pose).")
    robot: str | None = option(
        None, "Override the checkpoint's robot conventions: widowx | google_robot | libero_panda."
    )
    resolution: int | None = option(
        None, "LIBERO: camera height and width in pixels (default 256, what LIBERO's datasets were rendered at)."
    )
    max_steps: int | None = option(
        None, "Cap each episode below the task's own step limit (quick checks; not the benchmark's numbers)."
    )
    device: str | None = option(None, DEVICE)
    trust_remote_code: bool = option(False, TRUST_REMOTE_CODE)  # an OpenVLA checkpoint runs its own code
    backend: str = option(
        "local",
        "local | ray. ray: the run's schedule spread over a Ray cluster's workers, each an actor holding the policy "
        "(its GPU when the cluster has them) and --num-envs envs; this process writes episodes.jsonl and "
        "videos/ as local does. Needs the \\[ray] extra.",
    )
    ray_address: str | None = option(None, RAY_ADDRESS_FLAG)
    workers: int | None = option(
        None, "--backend ray: workers at once (default: as many as the cluster's GPUs, or CPUs, hold)."
    )
    gpus_per_worker: float | None = option(
        None, "--backend ray: GPUs per worker (default 1 on a cluster with GPUs, else 0: the policy on the CPU)."
    )
    cpus_per_worker: int | None = option(
        None, "--backend ray: CPUs per worker (default 1; CPU physics runs --num-envs processes: give as many)."
    )
    placement_timeout: float | None = option(
        None,
        "--backend ray: stop, in one line, once no worker has been alive for this many seconds (none placed, or "
        "all lost and none placed again); the same command continues the run. Default 600.",
    )


@dataclass
class DemosArgs:
    """`refine-eval demos`: scripted demonstrations in the WidowX scenes, written as BridgeData V2 RLDS."""

    out: Path = option(help="New folder for the dataset (features.json, TFRecord shards, refinevla_source.json).")
    suite: str = option(
        "widowx", "The suite whose scenes are recorded: widowx (Bridge RLDS) | libero (a LeRobot v3 dataset)."
    )
    tasks: list[str] | None = option(
        None,
        "Comma-separated WidowX tasks (carrot_on_plate, spoon_on_towel, ...); default all four.",
        conversion=COMMA_LIST,
    )
    episodes: int = option(
        24,
        "Tries per task: every configuration in turn, a new seed each round; failures dropped. LIBERO: initial "
        "states 0..N-1.",
    )
    seed: int = option(0, "Seed of the first round of resets (round r uses seed + r).")
    noise: float = option(0.01, "Waypoint noise in metres (uniform, x and y), so demos of a scene differ.")
    video: bool = option(False, "Write an mp4 of every try under OUT/videos/TASK/ (dropped ones under failed/).")
    resolution: int | None = option(None, "LIBERO: camera height and width in pixels (default 256).")
