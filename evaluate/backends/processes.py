"""n single-scene simulators in n processes, stepped in lock step, as one batched `Simulator`.

ManiSkill3's CPU physics and SAPIEN 2 (the original SimplerEnv) hold one scene per env and are
not thread-safe, so parallel episodes on those backends are parallel processes. Driving them in
lock step keeps the runner's contract: one (B, H, W, 3) batch per step, answered by one forward
pass of the policy. Workers are spawned (not forked: a forked renderer or CUDA context breaks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import EvalError
from .base import Simulator, StepOutput


def serve(conn: Any, factory: Callable[[], Simulator]) -> None:
    """Worker: build one simulator, report its facts, then answer reset/step/close over the pipe."""
    try:
        sim = factory()
    except Exception as exc:  # report any failure to the parent instead of dying silently
        conn.send(("error", str(exc)))
        return
    facts = {
        "n_configs": sim.n_configs,
        "max_steps": sim.max_steps,
        "control_freq": sim.control_freq,
        "description": sim.description,
    }
    conn.send(("ready", facts))
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "reset":
                conn.send(("ok", sim.reset([arg[0]], [arg[1]])))
            elif cmd == "step":
                conn.send(("ok", sim.step(arg)))
            else:
                sim.close()
                conn.send(("ok", None))
                return
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessSims:
    """`n_envs` simulators made by `factory` (picklable: a module-level class or a partial of one)."""

    def __init__(self, n_envs: int, factory: Callable[[], Simulator]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.n_envs = n_envs
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for _ in range(n_envs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(child, factory), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            ready = [self._recv(c) for c in self._conns]
        except BaseException:
            self.close()
            raise
        first = ready[0]
        self.n_configs = int(first["n_configs"])
        self.max_steps = int(first["max_steps"])
        self.control_freq = float(first["control_freq"])
        self.description: dict[str, Any] = {**first["description"], "n_envs": n_envs, "processes": n_envs}
        self.active = n_envs

    @staticmethod
    def _recv(conn: Any) -> Any:
        status, payload = conn.recv()
        if status == "error":
            raise EvalError(payload)
        return payload

    def _gather(self, outs: list[StepOutput]) -> StepOutput:
        return StepOutput(
            np.concatenate([o.images for o in outs]),
            [i for o in outs for i in o.infos],
            all(o.done for o in outs),
            [t for o in outs for t in o.instructions],
            {k: np.concatenate([o.extras[k] for o in outs]) for k in outs[0].extras},
        )

    def reset(self, seeds: Sequence[int], configs: Sequence[int]) -> StepOutput:
        """Reset the first len(seeds) workers; the others idle until the next reset."""
        self.active = min(len(seeds), self.n_envs)
        for conn, seed, config in zip(self._conns, seeds, configs, strict=False):
            conn.send(("reset", (int(seed), int(config))))
        return self._gather([self._recv(c) for c in self._conns[: self.active]])

    def step(self, actions: np.ndarray) -> StepOutput:
        for conn, row in zip(self._conns[: self.active], np.asarray(actions), strict=True):
            conn.send(("step", row[None]))
        return self._gather([self._recv(c) for c in self._conns[: self.active]])

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", None))
                conn.recv()
            except (OSError, EOFError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
