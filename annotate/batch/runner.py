"""Batch mode: fill the run's store through a provider's Batch API, in rounds, never paying twice.

A round streams the selected episodes, builds each request exactly as live mode would (same
`Engine.prepare`, key, prompt, schema and re-ask messages) and writes the requests whose key the
store cannot settle into batch input files, within the provider's per-file limits. Then the
batches in flight are polled; each finished batch's result lines are committed to the store one
by one — validated like a live answer, at batch prices — and the next round asks again what is
left: re-asks of invalid answers with their errors, and lines that expired or failed at the
provider (bounded by `max_resubmits`; a 400 is never resubmitted). When no key is left to ask,
the live engine writes the dataset from the store (every answer is then a store hit), so rows,
manifest and card are live mode's own.

What survives a crash or `kill -9`, and how a rerun carries on:

* the keys a batch holds are recorded (`ResultStore.add_batch`) before its file is uploaded;
* the file id and the batch id are committed the moment they are known;
* a batch recorded but without a stored file or batch id (the crash came between the provider's
  answer and the commit) is looked up by its tag — `refinevla-<run id>-<n>`, carried in the
  file name and the batch metadata — before anything is uploaded or created again;
* keys in a batch whose results are not ingested yet are never put in another batch;
* ingesting a batch twice is harmless (the store's writes are keyed by request key and attempt).

Ctrl-C while waiting leaves the batches running at the provider: the same command resumes.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...schemas import SemanticContext
from ..engine import Engine
from ..episode import Episode
from ..errors import RefineError
from ..prompts import reask_messages
from ..records import check_answer, commit_response, invalid_reason, refused_reason
from ..store import Attempt, BatchRow, ResultStore
from ..teacher_requests import PreparedRequest, teacher_request
from ..teachers.base import TeacherConfigError, redact
from ..teachers.refusals import is_episode_refusal, refusal_signature, repeated_refusal_error, setup_refusal
from .provider import BatchProvider, BatchState

REASK_MODES = ("batch", "live")


@dataclass
class BatchOptions:
    """How batch mode submits and waits (the CLI flags of the same names)."""

    reask: str = "batch"  # batch: re-asks go in the next round's batch; live: the live engine re-asks at the end
    poll_interval: float = 30.0  # seconds between two looks at the batches in flight
    max_resubmits: int = 3  # times a key's line may fail at the provider (expired, 5xx) before it is given up
    max_requests: int | None = None  # requests per input file (default: the provider's limit)


@dataclass
class BatchSummary:
    """What batch mode did in this invocation (for the summary line and the manifest)."""

    batches_submitted: int = 0  # new batches created this run
    requests_submitted: int = 0
    answered: int = 0  # valid answers ingested
    invalid: int = 0  # answers ingested that failed validation (re-asked or rejected)
    rejected: int = 0
    line_errors: Counter[str] = field(default_factory=Counter)  # why lines failed at the provider
    given_up: int = 0  # keys whose lines failed more than max_resubmits times (left for a later run)
    rounds: int = 0
    stop_reason: str | None = None  # "max-cost" when the budget stopped new submissions


class BatchRunner:
    """Runs batch mode for one output directory's store."""

    def __init__(
        self,
        provider: BatchProvider,
        engine: Engine,
        store: ResultStore,
        options: BatchOptions,
        folder: Path,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.provider = provider
        self.engine = engine
        self.store = store
        self.options = options
        self.folder = folder  # where input files are written (OUT/.refine/batches)
        self.progress = progress
        self.model = engine.teacher.model
        self.schema_id = engine.options.schema_id
        self.max_attempts = engine.options.max_attempts
        self.summary = BatchSummary()
        self.retry: set[str] = set()  # --retry-rejected: the store's rejects to submit again (each once)
        limit = options.max_requests or provider.max_requests
        self.max_requests = max(1, min(limit, provider.max_requests))

    # ----------------------------------------------------------------- the run
    def run(self, episodes: Callable[[], Iterable[Episode]]) -> BatchSummary:
        """Rounds of submit -> wait -> ingest until no key is left to ask (or the budget stops it).

        `episodes` gives a fresh pass over the selection for each round. KeyboardInterrupt
        propagates; what was submitted keeps running at the provider.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.engine.options.retry_rejected:
            self.retry = {r.key for r in self.store.rejects() if r.retryable(self.max_attempts)}
        self.submit_recorded()
        while True:
            self.summary.rounds += 1
            if self.summary.stop_reason is None:
                self.submit_round(episodes())
            if not self.in_flight():
                return self.summary
            self.wait_and_ingest()

    def in_flight(self) -> list[BatchRow]:
        return [b for b in self.store.batches() if b.state != "ingested"]

    # ----------------------------------------------------------------- submitting
    def submit_round(self, episodes: Iterable[Episode]) -> None:
        """Put every key the store cannot settle (and no batch holds) into new batches.

        Request lines go straight to the input file on disk (a keyframe request is ~80 KB; a
        provider's file holds up to 50,000), so memory stays flat whatever the batch size.
        """
        in_flight = self.store.keys_in_flight()
        failures = self.store.line_errors()
        budget = self.engine.options.max_cost
        committed = self.store.spend().cost + sum(b.estimate for b in self.in_flight())
        pending: _InputFile | None = None
        try:
            for episode in episodes:
                item = self.engine.prepare(episode)
                if item.key in in_flight:
                    continue
                request = self._next_request(item, failures)
                if request is None:
                    continue
                messages, attempt = request
                reasks = messages[len(item.bundle.messages) :]  # re-ask text: 4 characters a token
                prompt_tokens = item.estimated_prompt_tokens + sum(len(str(m["content"])) for m in reasks) // 4
                cost = self.engine.prices.cost(
                    self.model, prompt_tokens, self.engine.options.expected_completion_tokens, batch=True
                )
                if budget is not None and committed + (pending.estimate if pending else 0.0) + cost > budget:
                    self.summary.stop_reason = "max-cost"
                    break
                line = self.provider.request_line(item.key, teacher_request(item, messages, attempt))
                if pending is not None and (
                    len(pending.items) >= self.max_requests or pending.size + len(line) + 1 > self.provider.max_bytes
                ):
                    committed += pending.estimate
                    self._seal(pending)
                    pending = None
                if pending is None:
                    pending = _InputFile(self.folder / f"input-{uuid.uuid4().hex}.jsonl")
                pending.add(line, (item.key, item.episode_id, attempt, _context_json(item.context)), cost)
                in_flight.add(item.key)  # the selection may hold the same episode twice
            if pending is not None:
                self._seal(pending)
                pending = None
        finally:
            if pending is not None:  # stopped mid-file (Ctrl-C, an error): nothing recorded, nothing sent
                pending.discard()

    def _next_request(self, item: PreparedRequest, failures: dict[str, int]) -> tuple[list[dict[str, Any]], int] | None:
        """(messages, attempt number) to ask for `item`, or None when the store settles it."""
        look = self.store.lookup(item.key)
        if look.answer is not None:
            return None
        if look.reject is not None:
            if item.key not in self.retry:
                return None
            self.retry.discard(item.key)  # asked again once per invocation: a new reject of it stands
        for att in look.attempts:
            if not att.errors:  # stored valid but not committed (a crash in between): commit it now
                self.store.commit_answer(item.key, item.episode_id, json.loads(att.raw), att.attempt, self.model)
                return None
        if len(look.attempts) >= self.max_attempts:
            self._reject(item.key, item.episode_id, look.attempts[-1], len(look.attempts))
            return None
        if look.attempts and self.options.reask == "live":
            return None  # the live engine re-asks it at the end, with the errors
        if failures.get(item.key, 0) > self.options.max_resubmits:
            self.summary.given_up += 1
            return None
        messages = list(item.bundle.messages)
        for att in look.attempts:
            messages += reask_messages(self.engine.template, att.raw, att.errors)
        return messages, len(look.attempts) + 1

    def _seal(self, pending: _InputFile) -> None:
        """Close an input file, record it and its keys in the store, then upload and create the batch."""
        pending.close()
        base_url = getattr(self.engine.teacher, "base_url", None)
        row = self.store.add_batch(
            self.provider.name, self.model, base_url, str(pending.path), pending.items, pending.estimate
        )
        self._submit(row, fresh=True)
        self.summary.batches_submitted += 1
        self.summary.requests_submitted += len(pending.items)

    def submit_recorded(self) -> None:
        """Finish submitting batches an earlier run recorded but did not see created."""
        for row in self.store.batches():
            if row.state == "written":
                self._submit(row, fresh=False)

    def _submit(self, row: BatchRow, fresh: bool) -> None:
        """Upload and create, each at most once: an earlier run's half-done steps are looked up by tag."""
        file_id = row.file_id or (None if fresh else self.provider.find_file(row.tag))
        if file_id is None:
            file_id = self.provider.upload(Path(row.file_path), row.tag)
        self.store.update_batch(row.local_id, file_id=file_id)
        batch_id = row.batch_id or (None if fresh else self.provider.find_batch(row.tag))
        if batch_id is None:
            batch_id = self.provider.create(file_id, row.tag)
        self.store.update_batch(row.local_id, batch_id=batch_id, state="submitted")
        self.progress(f"batch {row.tag}: {row.requests} requests submitted ({batch_id})")

    # ----------------------------------------------------------------- waiting
    def wait_and_ingest(self) -> None:
        """Poll the batches in flight until each is final, ingesting each as it finishes."""
        while True:
            pending = self.in_flight()
            if not pending:
                return
            states: list[BatchState] = []
            for row in pending:
                if row.batch_id is None:  # recorded, not created: submit_recorded handles it
                    self._submit(row, fresh=False)
                    row = self.store.batch(row.local_id)
                try:
                    state = self.provider.get(str(row.batch_id))
                except RefineError as exc:
                    if not getattr(exc, "transient", False):
                        raise
                    self.progress(f"batch {row.tag}: the provider did not answer this time ({exc}); polling again")
                    continue
                self.store.update_batch(
                    row.local_id, state=state.state, provider_status=state.provider_status, counts=state.counts
                )
                states.append(state)
                if state.final:
                    if state.state != "completed":
                        why = "; ".join(state.errors[:3]) or "no reason given"
                        self.progress(f"batch {row.tag} ended {state.provider_status}: {why}")
                    self.ingest(row, state)
            self.progress(self.status_line(states))
            if len(states) < len(pending) or any(not s.final for s in states):
                time.sleep(self.options.poll_interval)

    def status_line(self, states: list[BatchState]) -> str:
        rows = self.store.batches()
        running = sum(1 for s in states if not s.final)
        done = sum(1 for b in rows if b.state == "ingested")
        counts = self.store.counts()
        provider = ", ".join(
            f"{s.id} {s.provider_status} ({s.counts.get('completed', 0)}/{s.counts.get('total', '?')})"
            for s in states
            if not s.final
        )
        return (
            f"batches: {len(rows)} submitted, {running} in progress, {done} done | answers {counts['answers']}, "
            f"rejects {counts['rejects']} | cost ${self.store.spend().cost:.4f} (batch prices)"
            + (f" | provider: {provider}" if provider else "")
        )

    # ----------------------------------------------------------------- ingesting
    def ingest(self, row: BatchRow, state: BatchState) -> None:
        """Commit every result line of a finished batch; lines without a result are marked for resubmission.

        Refused lines are judged once the whole batch is read (`_judge_refusals`): a refusal of the setup
        stops the run here, after the batch is marked ingested, with nothing stored for its lines.
        """
        items = {it.key: it for it in self.store.batch_items(row.local_id)}
        seen: set[str] = set()
        refused: list[_RefusedLine] = []
        answered = 0  # lines with an answer, valid or not: the provider takes the run's requests
        for line in self.provider.results(state):
            it = items.get(line.key)
            if it is None or line.key in seen:
                continue  # not ours, or a duplicate line
            seen.add(line.key)
            if line.response is None:
                refusal = self._line_failed(it.key, it.episode_id, row.local_id, line.error or "no answer", line.status)
                if refusal is not None:
                    refused.append(refusal)
                continue
            answered += 1
            response = line.response
            context = SemanticContext(
                it.context["num_steps"],
                it.context["num_segments"],
                tuple(it.context["image_size"]) if it.context.get("image_size") else None,
            )
            answer, errors = check_answer(response, context, self.schema_id)
            cost = self.engine.prices.cost(self.model, response.prompt_tokens, response.completion_tokens, batch=True)
            stored = commit_response(
                self.store, it.key, it.episode_id, self.model, it.attempt, response, answer, errors, cost
            )
            if answer is not None:
                self.store.set_item_outcome(it.key, row.local_id, "answered")
                self.summary.answered += 1
                continue
            self.store.set_item_outcome(it.key, row.local_id, "invalid")
            self.summary.invalid += 1
            if it.attempt >= self.max_attempts:
                self._reject(it.key, it.episode_id, stored, it.attempt)
        for key, it in items.items():
            if key not in seen and it.outcome is None:
                self._line_failed(key, it.episode_id, row.local_id, f"no result line (batch {state.state})", None)
        setup_error = self._judge_refusals(refused, answered)
        self.store.update_batch(row.local_id, state="ingested")
        if setup_error is not None:
            raise setup_error

    def _line_failed(
        self, key: str, episode_id: str, local_id: int, error: str, status: int | None
    ) -> _RefusedLine | None:
        """Count a line that came back without an answer; a refusal (a 4xx) is returned to be judged with the
        batch's others, anything else is marked for resubmission."""
        if status is None:
            found = re.match(r"HTTP (\d{3})", error)
            status = int(found.group(1)) if found else None
        self.summary.line_errors[_reason(error)] += 1
        if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
            # the request itself is wrong: asking again gives the same answer (live mode never retries a 400)
            return _RefusedLine(key, episode_id, local_id, error, status)
        self.store.set_item_outcome(key, local_id, f"error: {redact(error)}")
        return None

    def _judge_refusals(self, refused: list[_RefusedLine], answered: int) -> TeacherConfigError | None:
        """Reject each refused line's episode, unless the refusals are of the run's setup (`teachers.refusals`):
        a setup refusal (a model without images, a schema it cannot compile...), or the same refusal for
        --refusals-to-stop distinct episodes of a batch that answered none. Those store nothing (a rerun after
        the fix submits them again, their failures not counted against --max-resubmits); the error is returned."""
        teacher = self.engine.teacher
        where = getattr(teacher, "base_url", None) or f"the {self.provider.name} Batch API"
        error: TeacherConfigError | None = None
        setup: set[str] = set()  # keys refused by the setup
        for line in refused:
            kind = setup_refusal(line.status, line.error)
            if kind is not None:
                setup.add(line.key)
                error = error or TeacherConfigError(redact(kind.explain(self.model, where, line.error)))
        limit = self.engine.options.refusals_to_stop
        if error is None and not answered and limit >= 1:
            alike: dict[str, list[_RefusedLine]] = {}
            for line in refused:
                if not is_episode_refusal(line.error):
                    alike.setdefault(refusal_signature(line.status, line.error), []).append(line)
            for lines in alike.values():
                count = len({line.episode_id for line in lines})
                if count >= limit:
                    setup = {line.key for line in lines}
                    error = repeated_refusal_error(count, lines[0].error, self.model, where)
                    break
        for line in refused:
            if line.key in setup:
                self.store.set_item_outcome(line.key, line.local_id, f"setup: {redact(line.error)}")
                continue
            self.store.set_item_outcome(line.key, line.local_id, f"error: {redact(line.error)}")
            self.store.commit_reject(line.key, line.episode_id, refused_reason(line.error), "", 0)
            self.summary.rejected += 1
        return error

    def _reject(self, key: str, episode_id: str, last: Attempt, attempts: int) -> None:
        self.store.commit_reject(key, episode_id, invalid_reason(attempts, last.errors), last.raw, attempts)
        self.summary.rejected += 1

    # ----------------------------------------------------------------- cancelling
    def cancel_all(self) -> list[str]:
        """Cancel every batch not final at the provider; returns their ids."""
        cancelled = []
        for row in self.in_flight():
            if row.batch_id is not None and row.state not in ("completed", "failed", "expired", "cancelled"):
                self.provider.cancel(row.batch_id)
                cancelled.append(row.batch_id)
        return cancelled


@dataclass(frozen=True)
class _RefusedLine:
    """A result line the provider refused (a 4xx), until the batch's refusals are judged together."""

    key: str
    episode_id: str
    local_id: int
    error: str
    status: int


class _InputFile:
    """A batch input file being written: its lines on disk, its keys and estimate in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("wb")
        self.items: list[tuple[str, str, int, dict[str, Any]]] = []
        self.size = 0
        self.estimate = 0.0

    def add(self, line: bytes, item: tuple[str, str, int, dict[str, Any]], cost: float) -> None:
        self._fh.write(line + b"\n")
        self.items.append(item)
        self.size += len(line) + 1
        self.estimate += cost

    def close(self) -> None:
        """Flush to disk before the store records the file (the rerun uploads this very file)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def _context_json(context: SemanticContext) -> dict[str, Any]:
    return {
        "num_steps": context.num_steps,
        "num_segments": context.num_segments,
        "image_size": list(context.image_size) if context.image_size else None,
    }


def _reason(error: str) -> str:
    """A line error's reason for counting: its status or code, without the per-request details."""
    found = re.match(r"(HTTP \d{3}|[a-z_]+(?=:))", error)
    return found.group(1) if found else error[:60]
