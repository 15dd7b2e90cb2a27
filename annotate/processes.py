"""How many engine processes `annotate` runs (`--processes`, default auto), and why.

One engine process tops out at a few hundred requests per second against a fast server (one core's
worth of Python: reading, preparing, asking, storing). Where the teacher is a self-hosted server
(vLLM, SGLang behind `--teacher openai-compatible`), its rate is the machine's and the server's, and a
process per core uses the machine (`parallel` runs them). Where it is a hosted API, the rate is the
provider's quota, shared by every process, so more processes only split it; a local vLLM engine holds
its GPUs in one process; the rule-based teacher waits for nothing. The choice is printed in the run's
first line and recorded in the manifest (`backend.processes`, `backend.processes_chosen`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import RefineError

AUTO = "auto"  # --processes default: chosen from the cores and the teacher (`choose_processes`)
AUTO_MAX_PROCESSES = 4  # auto never starts more: past a few, the one server (not the client) sets the rate
EPISODES_PER_PROCESS = 256  # auto: a worker's start-up (~1.5 s of imports, source, client) pays off past this
# teachers whose rate is the machine's and the server's, not a provider's quota: more processes can help
SELF_HOSTED_TEACHERS = frozenset({"openai-compatible"})


@dataclass(frozen=True)
class ProcessChoice:
    """How many engine processes a run uses, and why (printed in the run's first line, kept in the manifest)."""

    count: int
    requested: str  # "auto" or the number given
    why: str

    def line(self) -> str:
        plural = "es" if self.count != 1 else ""
        return f"annotate: {self.count} engine process{plural} ({self.requested}: {self.why})"


def parse_processes(value: str) -> int | None:
    """`--processes`: None for auto, else the number (at least 1); anything else is one line."""
    if value.strip().lower() == AUTO:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise RefineError(f"--processes must be auto or a number of at least 1, not {value!r}")
    return number


def choose_processes(
    value: str, teacher: str, episodes: int, cores: int | None = None, alone: str | None = None
) -> ProcessChoice:
    """The process count for `--processes VALUE`: the number given, or for auto one per core (at most
    AUTO_MAX_PROCESSES, at least EPISODES_PER_PROCESS episodes each) where the teacher is a self-hosted
    server, and 1 where more cannot help: a hosted API whose rate limit is the provider's (shared by
    all processes, which would only split it), a local vLLM engine (one process holds the GPUs), the
    rule-based teacher (nothing to wait for), or a run that is one process anyway (`alone`: --batch,
    --backend ray, --dry-run)."""
    number = parse_processes(value)
    if number is not None:
        return ProcessChoice(number, value, "as given")
    if alone is not None:
        return ProcessChoice(1, AUTO, alone)
    if teacher not in SELF_HOSTED_TEACHERS:
        why = {"vllm": "the local vLLM engine runs in one process", "rule-based": "no teacher to wait for"}
        return ProcessChoice(1, AUTO, why.get(teacher, f"{teacher} is a rate-limited API: more processes cannot help"))
    cores = cores or os.cpu_count() or 1
    count = max(1, min(cores, AUTO_MAX_PROCESSES, episodes // EPISODES_PER_PROCESS))
    if count < min(cores, AUTO_MAX_PROCESSES):
        return ProcessChoice(count, AUTO, f"{teacher} server, {cores} cores, {episodes} episodes to read")
    return ProcessChoice(count, AUTO, f"{teacher} server, {cores} cores")
