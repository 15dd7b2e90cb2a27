"""`refine-eval run --backend ray`: one run's schedule spread over a Ray cluster's workers, one results folder.

The driver (the machine the command runs on) computes the schedule exactly as the local backend does
(`runner.schedule`: the same (task, configuration, repeat) keys, seeds, `--episodes-from` /
`--held-out-from`, minus what `episodes.jsonl` holds) and hands it out in batches of `--num-envs`
episodes to `--workers` Ray actors. Each actor (`EvalWorker`) loads the policy once — on its own GPU
when the cluster has GPUs, on the CPU otherwise — keeps one task's simulator open, and runs each batch
with the local backend's own `run_batch`. What a batch produced comes back to the driver, which alone
writes the results folder: `run.json`, one fsynced `episodes.jsonl` line per episode, and the videos.

Where the files land, and why: everything is written by the driver, on its own disk. A worker records a
`--video` mp4 in a scratch folder of its node and ships its bytes back with the episode (a WidowX
episode's video is a few hundred kB, next to seconds of simulation); `--log-actions` are part of the
episode's line anyway. So no storage shared by the nodes is needed for the results, the output lock
(`OUT/.refine/lock`, held by the driver) covers every file of the run, and a video is on disk before the
line that names it. What every node must read is the input: the checkpoint (or the `replay:` demos
folder) at the path given, and the simulator's assets — the driver's `MS_ASSET_DIR`, when set, is the
workers' too (assets on shared storage); unset, each node's own default.

Faults. A worker lost with its node (or its process killed): its batch goes back to the queue and runs
again on another worker, and a new worker is asked for in its place; an episode is written once, by key.
A killed driver takes its workers with it (Ray ends an owner's actors) and loses the batches in flight;
the same command runs only what `episodes.jsonl` lacks, as locally. Ctrl-C: exit 130 with the resume
line. Before any worker loads the policy, every node a worker could be placed on checks the simulator and
its assets (`runner.preflight`), so a cluster without them, like an `--ray-address` where nothing
answers, is one line.

The same numbers: a worker runs the local backend's code on the same seeds and configurations, so on
the CPU (deterministic physics, rendering and greedy decoding) a Ray run's episodes equal a local run's
field for field, wall time aside. On GPUs, batched kernels may pick other reduction orders for other
batch sizes or devices: a borderline episode can then differ, as it can between two local GPU runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..annotate.errors import RefineError
from .config import RunArgs
from .demos import DemoPairs
from .errors import EvalError
from .policy import PolicySetup
from .replay import PREFIX, is_replay
from .results import EpisodeLog, EpisodeResult, read_run, write_run
from .runner import (
    Planned,
    RunSummary,
    check_same_run,
    checked_run,
    holding,
    load_policy,
    make_simulator,
    open_task,
    policy_setup,
    preflight,
    record_episode,
    run_batch,
    run_fields,
    settled,
    start_results,
    tally,
)
from .suites import Task
from .zero import is_zero

WORKER_ENV = ("MS_ASSET_DIR",)  # the driver's, when set, are the workers' (the simulator reads them at import)
# A worker's thread pools, sized to the CPUs it reserved: OpenMP/BLAS (torch's CPU ops) and lavapipe's
# rasterizer (LP_NUM_THREADS; Mesa's default is one thread per core of the machine). Left at their
# defaults, each worker of a node spreads over every core, so W workers on a node contend instead of
# adding up (measured: benchmarks/eval_ray.py). Read when each library starts, hence set per actor.
WORKER_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LP_NUM_THREADS")
LOSSES_PER_WORKER = 3  # workers lost per worker asked for before the run gives up: the cluster keeps failing
WAITING_NOTE_S = 60.0  # say so when no worker has been alive for this long (the cluster cannot place one)
# ... and stop when none has been for --placement-timeout (this by default): on a cluster that can never place
# one (its only fitting node lost) the run would otherwise wait forever; an autoscaler adds a node in minutes.
PLACEMENT_TIMEOUT_S = 600.0
# Test hook: a directory every node can write (the tests' cluster is one machine). When the driver's
# environment names one, each worker appends a JSON line to DIR/batches.log when it starts a batch (its
# keys, node and pid) and when it ends one, and while DIR/hold exists waits after starting: a node can
# then be killed while its worker holds episodes. Unset (production), workers do none of this.
JOURNAL_ENV = "REFINEVLA_RAY_EVAL_JOURNAL"


@dataclass
class WorkerShape:
    """What each worker asks the cluster for, and how many there are."""

    cpus: int
    gpus: float
    workers: int
    nodes: list[dict[str, Any]]  # ray.nodes() entries of the alive nodes that can hold a worker


@dataclass
class Job:
    """One unit of work for a worker: open a task's simulator (its facts), or run a batch of its episodes."""

    task: Task
    batch: list[Planned] | None = None  # None: open the task


@dataclass
class BatchOutcome:
    """What a worker sends back for one batch."""

    episodes: list[tuple[EpisodeResult, bytes | None]] = field(default_factory=list)  # with the video's bytes
    forced_tags: int = 0
    assets: str | None = None  # the digest of the worker's simulator assets
    node: str = ""


def absolute(args: RunArgs) -> RunArgs:
    """The run's paths as every node reads them: absolute (a worker's working directory is not the driver's)."""
    policy = str(args.policy)
    if is_zero(policy):  # no path at all: the same on every node
        resolved = args.policy
    elif is_replay(policy):
        resolved = Path(f"{PREFIX}{Path(policy[len(PREFIX) :]).resolve()}")
    else:
        resolved = Path(policy).resolve()
    return replace(
        args,
        policy=resolved,
        out=args.out.resolve(),
        episodes_from=args.episodes_from.resolve() if args.episodes_from else None,
        held_out_from=args.held_out_from.resolve() if args.held_out_from else None,
    )


def worker_shape(ray: Any, args: RunArgs) -> WorkerShape:
    """Each worker's CPUs and GPUs (a GPU each on a cluster with GPUs), and how many workers run."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    has_gpus = sum(float(n.get("Resources", {}).get("GPU", 0.0)) for n in alive) > 0
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else 1
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if has_gpus else 0.0)

    def room(node: dict[str, Any]) -> int:
        res = node.get("Resources", {})
        fit = int(float(res.get("CPU", 0.0)) // cpus)
        return min(fit, int(float(res.get("GPU", 0.0)) // gpus)) if gpus else fit

    nodes = [n for n in alive if room(n) > 0]
    if not nodes:
        raise EvalError(
            f"no node of the Ray cluster has {cpus} CPU(s) and {gpus:g} GPU(s) free for a worker "
            f"({len(alive)} node(s)); lower --cpus-per-worker / --gpus-per-worker"
        )
    return WorkerShape(cpus, gpus, args.workers or sum(room(n) for n in nodes), nodes)


def worker_threads(cpus: int) -> dict[str, str]:
    """Each thread pool of a worker sized to its --cpus-per-worker (WORKER_THREADS says why)."""
    return {name: str(max(1, cpus)) for name in WORKER_THREADS}


def node_preflight(tasks: list[Task]) -> str:
    """On one node: '' if every task's simulator and assets are there, else what is missing (one line)."""
    try:
        for task in tasks:
            preflight(task)
    except RefineError as exc:
        return str(exc)
    return ""


def check_nodes(ray: Any, shape: WorkerShape, tasks: list[Task], runtime_env: dict[str, Any] | None) -> None:
    """Every node a worker may land on has the simulator and its assets; else one line naming a node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(node_preflight)
    refs = {
        check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), runtime_env=runtime_env
        ).remote(tasks): node
        for node in shape.nodes
    }
    for ref, node in refs.items():
        problem = ray.get(ref)
        if problem:
            raise EvalError(f"Ray node {node['NodeManagerAddress']} ({node['NodeID'][:8]}): {problem}")


class EvalWorker:
    """A Ray actor (`ray.remote` is applied by the driver): the policy, loaded once, and a task's simulator.

    Its methods answer a user's error (`RefineError`) as `{"error": message}`, which the driver raises as
    one line (raised here, Ray would deliver it wrapped, its class lost); a bug keeps its traceback.
    """

    def __init__(self, args: RunArgs, journal: str | None) -> None:
        self.args = args
        self.journal = Path(journal) if journal else None
        self.policy: Any = None
        self.task: Task | None = None
        self.sim: Any = None
        self.node = ""

    def placed(self) -> bool:
        """Answers once Ray has placed this actor (the driver then counts it alive while the policy loads)."""
        return True

    def start(self) -> dict[str, Any]:
        """Load the policy (on the worker's GPU if Ray gave it one, else on the CPU): its node and GPUs."""
        import ray

        gpus = [str(g) for g in ray.get_gpu_ids()]
        self.node = ray.get_runtime_context().get_node_id()
        scratch = Path(tempfile.mkdtemp(prefix="refine-eval-"))  # videos wait here until shipped
        args = replace(self.args, out=scratch)
        if not gpus:  # never a GPU the worker was not given (another worker's)
            args = replace(args, device=args.device or "cpu", sim_backend=args.sim_backend or "cpu")
        self.args = args
        try:
            self.policy = load_policy(args)
        except RefineError as exc:
            return {"error": str(exc)}
        return {"node": self.node, "gpus": gpus}

    def _open(self, task: Task) -> Any:
        if self.task != task:
            if self.sim is not None:
                self.sim.close()
                self.sim = None
            self.sim = make_simulator(task, self.args)
            self.task = task
        return self.sim

    def open(self, task: Task) -> dict[str, Any]:
        """The task's simulator facts the schedule and run.json need."""
        try:
            sim = self._open(task)
        except RefineError as exc:
            return {"error": str(exc)}
        return {"n_configs": sim.n_configs, "description": sim.description}

    def run(self, task: Task, batch: list[Planned]) -> BatchOutcome | dict[str, str]:
        """One batch in lock step, with the local backend's `run_batch`; each video's bytes shipped back."""
        try:
            sim = self._open(task)
            self._note("start", task, batch)
            summary = RunSummary()
            results = run_batch(sim, self.policy, task, batch, self.args, summary)
        except RefineError as exc:
            return {"error": str(exc)}
        outcome = BatchOutcome(forced_tags=summary.forced_tags, node=self.node)
        outcome.assets = sim.description.get("assets", {}).get("digest")
        for result in results:
            video = None
            if result.video:
                path = self.args.out / result.video
                video = path.read_bytes()
                path.unlink()
            outcome.episodes.append((result, video))
        self._note("done", task, batch)
        return outcome

    def _note(self, event: str, task: Task, batch: list[Planned]) -> None:
        """The test hook (JOURNAL_ENV): a line per batch started or done; held after starting while DIR/hold is."""
        if self.journal is None:
            return
        line = {
            "event": event,
            "node": self.node,
            "pid": os.getpid(),
            "episodes": [[task.name, c, r] for c, r, _ in batch],
            "threads": {name: os.environ.get(name) for name in WORKER_THREADS},
            "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
        }
        with open(self.journal / "batches.log", "a") as f:  # one short append: whole lines from every worker
            f.write(json.dumps(line) + "\n")
        while event == "start" and (self.journal / "hold").exists():
            time.sleep(0.05)


def write_video(out: Path, rel: str, data: bytes) -> None:
    """A shipped video into the results folder, whole or not at all (its episode's line comes after)."""
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


class Dispatch:
    """The driver's loop: jobs to idle workers, outcomes into the results folder, lost workers replaced."""

    def __init__(
        self,
        ray: Any,
        args: RunArgs,
        shape: WorkerShape,
        runtime_env: dict[str, Any] | None,
        demos: DemoPairs | None,
        log: EpisodeLog,
        progress: Callable[[str], None],
    ) -> None:
        self.ray, self.args, self.shape, self.demos, self.log, self.progress = ray, args, shape, demos, log, progress
        self.worker_class = ray.remote(EvalWorker).options(
            num_cpus=shape.cpus, num_gpus=shape.gpus, runtime_env=runtime_env, max_restarts=0
        )
        self.journal = os.environ.get(JOURNAL_ENV) or None
        self.summary = RunSummary()
        self.jobs: deque[Job] = deque()
        self.starting: dict[Any, Any] = {}  # start() ref -> worker
        self.placing: dict[Any, Any] = {}  # placed() ref -> its worker's start() ref: ready once Ray placed it
        self.loading: set[Any] = set()  # start() refs of workers placed and loading the policy (alive)
        self.running: dict[Any, tuple[Any, Job]] = {}  # job ref -> (worker, job)
        self.idle: list[Any] = []
        self.assets: dict[str, str | None] = {}  # task env id -> the asset digest recorded
        self.lost = 0
        self.started = 0
        self.nodes: set[str] = set()

    def add_worker(self) -> None:
        worker = self.worker_class.remote(self.args, self.journal)
        placed = worker.placed.remote()  # answers as soon as the actor exists: a policy may load for minutes
        start = worker.start.remote()
        self.starting[start] = worker
        self.placing[placed] = start

    def run(self, tasks: list[Task]) -> RunSummary:
        self.jobs.extend(Job(task) for task in tasks)
        for _ in range(self.shape.workers):
            self.add_worker()
        limit = self.args.placement_timeout or PLACEMENT_TIMEOUT_S
        alive = time.monotonic()  # the last time a worker was alive (or the run began)
        while self.jobs or self.running:
            while self.idle and self.jobs:
                worker, job = self.idle.pop(), self.jobs.popleft()
                ref = worker.open.remote(job.task) if job.batch is None else worker.run.remote(job.task, job.batch)
                self.running[ref] = (worker, job)
            wait = min(WAITING_NOTE_S, max(0.0, limit - (time.monotonic() - alive)))
            ready, _ = self.ray.wait([*self.running, *self.starting, *self.placing], num_returns=1, timeout=wait)
            if ready and ready[0] in self.placing:
                self.loading.add(self.placing.pop(ready[0]))
            if self.running or self.idle or self.loading:
                alive = time.monotonic()
            if not ready:
                self.no_worker_for(time.monotonic() - alive, limit)
                continue
            if ready[0] not in self.starting and ready[0] not in self.running:  # a placed() answer
                continue
            if ready[0] in self.starting:
                self.started_one(ready[0])
            else:
                self.finished(ready[0])
        return self.summary

    def no_worker_for(self, seconds: float, limit: float) -> None:
        """No worker alive (none placed yet, or all lost): a note each minute, and one line at --placement-timeout."""
        shape = f"{self.shape.cpus} CPU(s) and {self.shape.gpus:g} GPU(s) each"
        if seconds >= limit:
            alive = len([n for n in self.ray.nodes() if n.get("Alive")])
            raise EvalError(
                f"no Ray worker ({shape}) could be placed in {limit:g} s (--placement-timeout) on the cluster's "
                f"{alive} node(s); finished episodes are in {self.args.out}: run the same command again once the "
                "cluster has room, or ask for less with --cpus-per-worker / --gpus-per-worker"
            )
        if seconds >= WAITING_NOTE_S:
            self.progress(f"waiting for the cluster to place a worker ({shape})")

    def answer(self, ref: Any, worker: Any) -> Any:
        """The job's answer; None when its worker was lost (then replaced); a user's error raised as one line."""
        from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

        try:
            out = self.ray.get(ref)
        except (RayActorError, ObjectLostError, NodeDiedError, WorkerCrashedError) as exc:
            self.lost += 1
            if self.lost > LOSSES_PER_WORKER * self.shape.workers:
                raise EvalError(f"{self.lost} Ray workers lost, the last: {str(exc).splitlines()[0]}") from None
            self.ray.kill(worker, no_restart=True)
            self.add_worker()
            return None
        if isinstance(out, dict) and out.get("error"):
            raise EvalError(out["error"])
        return out

    def started_one(self, ref: Any) -> None:
        worker = self.starting.pop(ref)
        self.loading.discard(ref)
        self.placing = {p: s for p, s in self.placing.items() if s != ref}  # lost before it was placed
        info = self.answer(ref, worker)
        if info is not None:
            self.started += 1
            self.nodes.add(info["node"])
            self.idle.append(worker)

    def finished(self, ref: Any) -> None:
        worker, job = self.running.pop(ref)
        out = self.answer(ref, worker)
        if out is None:  # its episodes run again on another worker
            where = f"{len(job.batch)} episode(s) of {job.task.name}" if job.batch else f"opening {job.task.name}"
            self.progress(f"  a Ray worker was lost; {where} go back to the queue")
            self.jobs.appendleft(job)
            return
        self.idle.append(worker)
        if job.batch is None:
            self.opened(job.task, out)
        else:
            self.record(job.task, out)

    def opened(self, task: Task, facts: dict[str, Any]) -> None:
        description = facts["description"]
        todo = open_task(
            task, facts["n_configs"], description, self.args, self.log, self.demos, self.summary, self.progress
        )
        self.assets[task.env_id] = description.get("assets", {}).get("digest")
        step = self.args.num_envs
        self.jobs.extend(Job(task, todo[i : i + step]) for i in range(0, len(todo), step))

    def record(self, task: Task, outcome: BatchOutcome) -> None:
        if outcome.assets != self.assets[task.env_id]:  # every node must simulate on the same scene files
            raise EvalError(
                f"Ray node {outcome.node[:8]} has {task.env_id} assets {outcome.assets}, not the run's "
                f"{self.assets[task.env_id]}: give every node the same MS_ASSET_DIR"
            )
        self.summary.forced_tags += outcome.forced_tags
        for result, video in outcome.episodes:
            if result.key in self.log.done:  # a batch run twice (its first worker lost late) counts once
                continue
            if result.video and video is not None:
                write_video(self.args.out, result.video, video)
            record_episode(self.log, result, self.summary, self.progress)


def run_on_ray(args: RunArgs, progress: Callable[[str], None] = print) -> RunSummary:
    """`refine-eval run --backend ray`: the run's checks and lock as on this machine, its episodes on the cluster."""
    tasks, demos = checked_run(args)
    with holding(args):
        return run_held(args, tasks, progress, demos)


def run_held(args: RunArgs, tasks: list[Task], progress: Callable[[str], None], demos: DemoPairs | None) -> RunSummary:
    """The run, its workers on the cluster at --ray-address, while this process holds --out."""
    from ..annotate.ray_backend import connect

    setup = policy_setup(args)  # no weights: the workers load them
    run = run_fields(args, setup)  # the paths as given, as a local run records them
    check_same_run(args.out, run)
    finished = settled(args, tasks, demos, progress)
    if finished is not None:  # nothing to run: no cluster to join, no worker to start
        return finished
    args = absolute(args)
    ray = connect(args.ray_address)
    try:
        shape = worker_shape(ray, args)
        env_vars = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
        # before any worker loads the policy
        check_nodes(ray, shape, tasks, {"env_vars": env_vars} if env_vars else None)
        if isinstance(setup, PolicySetup) and setup.budget_warning:
            progress(f"warning: {setup.budget_warning}")
        alive = len([n for n in ray.nodes() if n.get("Alive")])
        cluster = {
            "name": "ray",
            "address": args.ray_address or "local",  # as given ('auto', 'local', HOST:PORT)
            "gcs_address": ray.get_runtime_context().gcs_address,  # the cluster it joined (a private one: its own)
            "nodes": alive,
            "workers": shape.workers,
            "cpus_per_worker": shape.cpus,
            "gpus_per_worker": shape.gpus,
            "gpus": float(ray.cluster_resources().get("GPU", 0.0)),
        }
        log = start_results(args.out, {**run, "cluster": cluster})
        progress(
            f"ray: {alive} node(s), {shape.workers} worker(s) of {shape.cpus} CPU(s) and {shape.gpus:g} GPU(s) "
            f"each, {args.num_envs} env(s) per worker"
        )
        runtime_env = {"env_vars": {**env_vars, **worker_threads(shape.cpus)}}
        dispatch = Dispatch(ray, args, shape, runtime_env, demos, log, progress)
        summary = dispatch.run(tasks)
        final = read_run(args.out)
        final["cluster"] = {**cluster, "worker_nodes": len(dispatch.nodes), "workers_lost": dispatch.lost}
        write_run(args.out, final)
        return tally(args.out, summary)
    finally:
        ray.shutdown()
