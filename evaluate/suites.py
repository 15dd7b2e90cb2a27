"""The benchmark's tasks: SimplerEnv's names, the simulator task behind each, and who runs it.

WidowX (Bridge) tasks run on ManiSkill3's GPU-parallel ports of SimplerEnv's scenes; Google
Robot tasks exist only in the original SimplerEnv (SAPIEN 2, ManiSkill2_real2sim).
`maniskill:ENV_ID` runs any ManiSkill3 task with the same policy and output.
LIBERO (`--suite libero`, and LIBERO-PRO's perturbed suites as `--suite libero_pro`) is another simulator
family: a task's `suite` is its LIBERO suite (libero_spatial, libero_spatial_swap, ...), so its rows are
reported under that suite, never beside SimplerEnv's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EvalError

SUITES = ("widowx", "google-vm", "google-va", "libero", "libero_pro")
LIBERO_FAMILIES = ("libero", "libero_pro")
WIDOWX_TASKS = {
    "spoon_on_towel": "PutSpoonOnTableClothInScene-v1",
    "carrot_on_plate": "PutCarrotOnPlateInScene-v1",
    "stack_green_on_yellow": "StackGreenCubeOnYellowCubeBakedTexInScene-v1",
    "eggplant_in_basket": "PutEggplantInBasketScene-v1",
}
GOOGLE_TASKS = {
    "pick_coke_can": "google_robot_pick_coke_can",
    "move_near": "google_robot_move_near",
    "open_drawer": "google_robot_open_drawer",
    "close_drawer": "google_robot_close_drawer",
    "place_apple_in_closed_top_drawer": "google_robot_place_apple_in_closed_top_drawer",
}
GOOGLE_DEFAULT = ("pick_coke_can", "move_near", "open_drawer", "close_drawer")


@dataclass(frozen=True)
class Task:
    suite: str  # widowx | google-vm | google-va | maniskill:ENV_ID
    name: str  # SimplerEnv's short name (the ENV_ID for maniskill:)
    env_id: str  # the simulator's task id
    backend: str  # maniskill3 | simpler_env | libero
    robot: str | None  # widowx | google_robot | libero_panda | None (take the checkpoint's)
    grasp: bool  # the task reports SimplerEnv's grasp metric


# the robot whose conventions a suite's tasks take (maniskill:ENV_ID: the checkpoint's)
SUITE_ROBOTS = {
    "widowx": "widowx",
    "google-vm": "google_robot",
    "google-va": "google_robot",
    "libero": "libero_panda",
    "libero_pro": "libero_panda",
}


def scene_key(task: Task) -> str:
    """What a demos folder and a replay name a task's scenes by: the simulator's task id, or for LIBERO its
    SUITE/ID (a LIBERO-PRO suite perturbs its base suite's tasks under the same task names)."""
    return task.name if task.backend == "libero" else task.env_id


def parse_suite(suite: str) -> str:
    if suite in SUITES or (suite.startswith("maniskill:") and len(suite) > len("maniskill:")):
        return suite
    raise EvalError(f"--suite {suite!r}: expected one of {', '.join(SUITES)} or maniskill:ENV_ID")


def suite_tasks(suite: str, names: list[str] | None = None) -> list[Task]:
    """The tasks to run: all of the suite's, or the named ones (in the order given)."""
    suite = parse_suite(suite)
    if suite.startswith("maniskill:"):
        env_id = suite.split(":", 1)[1]
        if names:
            raise EvalError("--tasks does not apply to maniskill:ENV_ID (the suite is that one task)")
        return [Task(suite, env_id, env_id, "maniskill3", None, False)]
    if suite in LIBERO_FAMILIES:
        from .backends.libero import libero_tasks

        # name = SUITE/ID (what --tasks takes), env_id = LIBERO's task name (its BDDL file)
        return [
            Task(t.suite, f"{t.suite}/{t.task_id}", t.name, "libero", "libero_panda", False)
            for t in libero_tasks(suite, names)
        ]
    table = WIDOWX_TASKS if suite == "widowx" else GOOGLE_TASKS
    chosen = names or (list(WIDOWX_TASKS) if suite == "widowx" else list(GOOGLE_DEFAULT))
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise EvalError(f"--tasks: unknown {suite} task(s) {', '.join(unknown)} (known: {', '.join(table)})")
    if suite == "widowx":
        return [Task(suite, n, table[n], "maniskill3", "widowx", True) for n in chosen]
    return [Task(suite, n, table[n], "simpler_env", "google_robot", False) for n in chosen]
