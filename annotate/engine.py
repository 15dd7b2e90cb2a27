"""The annotation engine: keeps a teacher saturated, survives every fault, never pays twice.

For each episode: build the request (prompt + keyframes) and its key; if the store has an
answer for the key, use it (cached); otherwise ask the teacher under the concurrency, RPM
and TPM limits, retrying transient failures with exponential backoff + jitter (and the
server's `Retry-After`), never retrying a 400. Every raw answer is committed to the store
*before* it is used; an answer that fails the schema or the semantic checks is re-asked
with the errors, up to `max_attempts`, and then rejected with its reason. `--max-cost`
and Ctrl-C stop dispatching cleanly; what was in flight is finished and stored.

Requests are prepared (read, hashed, keyframes encoded) in a producer thread so the
event loop only does I/O and bookkeeping. This module is the dispatch only: how a request and
its key are built lives in `teacher_requests`, how an answer is checked, stored and turned into a
record lives in `records` (batch mode shares both).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..schemas import DEFAULT_SCHEMA_ID, SchemaDetail, backend_for, teacher_response_format
from .episode import Episode
from .errors import RefineError
from .pricing import PriceTable
from .prompts import FrameOptions, load_template, reask_messages
from .ratelimit import RateLimiter
from .records import (
    AnnotationOutcome,
    Status,
    assemble_record,
    check_answer,
    commit_response,
    invalid_reason,
    refused_reason,
)
from .store import ResultStore
from .teacher_requests import PreparedRequest, prepare_request, teacher_request
from .teachers.base import (
    PermanentTeacherError,
    Teacher,
    TeacherRequest,
    TeacherResponse,
    TransientTeacherError,
    redact,
)
from .teachers.refusals import (
    DEFAULT_REFUSALS_TO_STOP,
    RefusalStreak,
    is_episode_refusal,
    refusal_signature,
    repeated_refusal_error,
)

GAVE_UP = "gave up for this run after retries: "  # a failed episode's reason starts so (the summary strips it)


@dataclass
class EngineOptions:
    """How the engine asks (all of it is user-facing through the CLI flags of the same names)."""

    concurrency: int = 16  # requests in flight at most
    rpm: float | None = None  # requests per minute (None: unlimited)
    tpm: float | None = None  # tokens per minute, prompt + completion, estimated then settled
    timeout: float = 120.0  # seconds per request
    max_attempts: int = 3  # answers per episode (first ask + re-asks with the validation errors)
    max_retries: int = 6  # transient failures (429/5xx/timeout) retried per ask before giving up for this run
    retry_base: float = 1.0  # first backoff in seconds; doubles per retry, with jitter
    retry_max: float = 60.0  # longest backoff in seconds
    max_cost: float | None = None  # USD; stop dispatching when spent + in-flight estimate reaches it
    schema_id: str = DEFAULT_SCHEMA_ID
    schema_detail: SchemaDetail = "static"  # "episode": each request's schema carries its episode's facts
    schema_backend: str | None = None  # structured-output subset (schemas.BACKENDS); None: from the teacher
    template: str = "rationale-v1"  # prompt template version
    frames: FrameOptions = field(default_factory=FrameOptions)
    expected_completion_tokens: int = 1200  # estimate for TPM and budgets until real answers arrive
    ask: bool = True  # False: settle episodes from the store only (batch mode's final pass); the rest end "failed"
    unasked_reason: str = "not answered yet"  # the reason an episode the store cannot settle ends with (ask=False)
    retry_rejected: bool = False  # ask the store's rejects again where `Reject.retryable` (refusals, re-asks left)
    refusals_to_stop: int = DEFAULT_REFUSALS_TO_STOP  # identical refusals of distinct episodes in a row = setup error


@dataclass
class Counters:
    """Live numbers for the progress display and the manifest (this run only)."""

    total: int | None = None  # episodes selected, when known
    annotated: int = 0
    cached: int = 0
    rejected: int = 0
    failed: int = 0
    stopped: int = 0
    in_flight: int = 0
    requests: int = 0  # answers received (including invalid ones)
    retries: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.annotated + self.cached + self.rejected + self.failed + self.stopped

    def requests_per_minute(self) -> float:
        elapsed = max(1e-6, time.monotonic() - self.started)
        return self.requests * 60.0 / elapsed

    def eta_seconds(self) -> float | None:
        done_new = self.annotated + self.rejected + self.failed
        if self.total is None or done_new == 0:
            return None
        remaining = self.total - self.finished
        elapsed = time.monotonic() - self.started
        return max(0.0, remaining * elapsed / done_new)


class _Slot:
    """One task's hold on a concurrency slot; created held (the dispatcher acquired it)."""

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self.sem = sem
        self.held = True

    async def take(self) -> None:
        if not self.held:
            await self.sem.acquire()
            self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.sem.release()


class _RetriesExhausted(Exception):
    pass


class _BudgetReached(Exception):
    pass


_END = object()
PRODUCER_CLOSE_S = 10.0  # how long a stopped run waits for the producer to close its source


class Engine:
    """Runs one annotation pass over episodes; results go to `sink` as they finish."""

    def __init__(
        self,
        teacher: Teacher,
        store: ResultStore,
        options: EngineOptions,
        prices: PriceTable | None = None,
        sink: Callable[[AnnotationOutcome], None] | None = None,
    ) -> None:
        self.teacher = teacher
        self.store = store
        self.options = options
        self.prices = prices or PriceTable({})
        self.sink = sink or (lambda result: None)
        self.counters = Counters()
        self.template = load_template(options.template)
        self.schema_backend = options.schema_backend or backend_for(teacher.name).name
        # `static`: one response format for the run, serialised once by the teacher; `episode`: one per request.
        self.response_format = teacher_response_format(options.schema_id, self.schema_backend)
        self.stop_reason: str | None = None  # "interrupted", "max-cost", or None for a full pass
        self._stop = asyncio.Event()
        self._hard_stop = False
        self._fatal: Exception | None = None  # e.g. the key was refused: every request would fail alike
        self._pause_until = 0.0  # a 429's Retry-After pauses every new request, not just the one
        # refusals held (not stored) while they may turn out to be one refusal of the whole setup
        self._streak: RefusalStreak[tuple[PreparedRequest, str]] = RefusalStreak(options.refusals_to_stop)
        self._rpm = RateLimiter(options.rpm) if options.rpm else None
        self._tpm = RateLimiter(options.tpm) if options.tpm else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reserved = 0.0  # estimated cost of asks in flight (for --max-cost)
        self._prior_cost = 0.0  # spent by earlier runs on this store (counts against --max-cost)
        # Every store call runs on one thread: the fsync of a commit never blocks the event loop,
        # and the SQLite connection is only ever used from that thread.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refinevla-store")
        # Answers that arrived and wait for their commit, at most --concurrency: an answer's slot is given back
        # when it arrives, so without this bound a store slower than the teacher (fsyncs on a loaded disk) lets
        # the asks run ahead of the commits, and a kill loses every answer queued (13 of 16 in a CI run). With it,
        # a killed run has paid for at most 2 x --concurrency answers it did not keep.
        self._storing = asyncio.Semaphore(options.concurrency)

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))

    # ----------------------------------------------------------------- request preparation
    def prepare(self, episode: Episode) -> PreparedRequest:
        """Prompt, key and facts of an episode as this engine asks it (CPU work; runs in the producer thread)."""
        opts = self.options
        return prepare_request(
            episode,
            teacher=self.teacher,
            template=self.template,
            frames=opts.frames,
            schema_id=opts.schema_id,
            schema_detail=opts.schema_detail,
            schema_backend=self.schema_backend,
            static_response_format=self.response_format,
        )

    # ----------------------------------------------------------------- control
    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop dispatching; a second call also cancels what is in flight (nothing committed is lost)."""
        if self._stop.is_set():
            self._hard_stop = True
            for task in list(self._tasks):
                task.cancel()
            return
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def _estimated_cost(self, prompt_tokens: int) -> float:
        return self.prices.cost(self.teacher.model, prompt_tokens, self.options.expected_completion_tokens)

    def _spent(self) -> float:
        return self.counters.cost + self._prior_cost

    def _over_budget(self, extra: float) -> bool:
        limit = self.options.max_cost
        return limit is not None and self._spent() + self._reserved + extra > limit

    # ----------------------------------------------------------------- the run
    async def run(self, episodes: Iterable[Episode | PreparedRequest], total: int | None = None) -> Counters:
        """Annotate every episode (or until stopped). Returns this run's counters.

        `episodes` may also yield requests prepared already (by `ray_backend` on a cluster): they
        are dispatched as they are, with this engine's limits, store and checks.
        """
        self.counters.total = total
        if self.options.max_cost is not None:
            self._prior_cost = (await self._db(self.store.spend)).cost
        loop = asyncio.get_running_loop()
        # Prepared requests wait in `queue`; `room` bounds how many (the producer stays ahead
        # of the dispatcher by at most that much). Handing an item over is one thread-safe
        # callback, and the dispatcher only waits on the queue when the producer fell behind.
        queue: asyncio.Queue[Any] = asyncio.Queue()
        room = threading.Semaphore(max(8, self.options.concurrency * 2))
        producer_stop = threading.Event()
        producer_error: list[BaseException] = []

        # The producer also reads what the store has for each key, on its own connection: the
        # dispatch of the next request then waits for no store round trip (and not behind the
        # fsyncs of the answers being committed on the store thread).
        reader = self.store.reader()

        def hand_over(item: Any) -> bool:
            while not room.acquire(timeout=0.1):
                if producer_stop.is_set():
                    return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the run is over
                return False
            return True

        source = iter(episodes)

        def produce() -> None:
            try:
                for episode in source:
                    if producer_stop.is_set():
                        return
                    # prepared elsewhere (`--backend ray` prepares on the cluster), or here
                    item = episode if isinstance(episode, PreparedRequest) else self.prepare(episode)
                    if reader is not None:
                        item.stored = reader.lookup(item.key)
                    if not hand_over(item):
                        return
            except BaseException as exc:  # surfaced in the event loop below
                producer_error.append(exc)
            finally:
                if reader is not None:
                    reader.close()
                close_source()
                if not producer_stop.is_set():
                    hand_over(_END)

        def close_source() -> None:
            """Close the source where it runs (a generator cannot be closed from another thread), so a
            stopped run releases what it holds now: the reader's files, the Ray cluster's executor."""
            close = getattr(source, "close", None)
            if close is None:
                return
            try:
                close()
            except BaseException as exc:  # the run's own error, if any, is already first in the list
                producer_error.append(exc)

        producer = threading.Thread(target=produce, name="refinevla-prepare", daemon=True)
        producer.start()
        sem = asyncio.Semaphore(self.options.concurrency)
        started = False  # the teacher starts at the first episode the store cannot settle: settling from the
        # store needs none, so a finished run's rerun opens no client and loads no vLLM engine
        try:
            while not self._stop.is_set():
                if queue.empty():  # the producer fell behind: wait for it, or for a stop
                    get = asyncio.ensure_future(queue.get())
                    stop = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if not get.done():
                        get.cancel()
                        break
                    item = get.result()
                else:
                    item = queue.get_nowait()
                room.release()
                if item is _END:
                    break
                if await self._from_store(item):
                    continue
                if not self.options.ask:
                    self._finish(item, "failed", reason=self.options.unasked_reason)
                    continue
                est = self._estimated_cost(item.estimated_prompt_tokens)
                if self._over_budget(est):
                    self.stop_reason = self.stop_reason or "max-cost"
                    self._finish(item, "stopped", reason="max-cost reached before asking")
                    break
                if not started:
                    started = True
                    await self.teacher.start()
                await sem.acquire()
                if self._stop.is_set():
                    sem.release()
                    self._finish(item, "stopped", reason=self.stop_reason)
                    break
                self._reserved += est
                task = asyncio.create_task(self._annotate(item, est, sem))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            # fewer identical refusals than make a setup error: each is its episode's reject
            await self._settle_refusals(stored=self._fatal is None)
        finally:
            producer_stop.set()  # a producer waiting for room sees this within 0.1 s
            # ...and then closes the source: the caller may tear down what the source reads from
            # (`--backend ray` shuts Ray down) only after that
            await asyncio.to_thread(producer.join, PRODUCER_CLOSE_S)
            await self.teacher.close()
            self._io.shutdown(wait=True)
        if self._fatal is not None:
            raise self._fatal
        if producer_error and not self._stop.is_set():
            raise producer_error[0]
        return self.counters

    async def _from_store(self, item: PreparedRequest) -> bool:
        """Settle an episode from the store (answered or rejected in an earlier run)."""
        if item.stored is None:
            item.stored = await self._db(self.store.lookup, item.key)
        stored = item.stored.answer
        if stored is not None:
            record = assemble_record(item, stored.answer, self.options.schema_id)
            self._finish(item, "cached", record=record, attempts=stored.attempts)
            return True
        rejected = item.stored.reject
        if rejected is not None:
            if self.options.ask and self.options.retry_rejected and rejected.retryable(self.options.max_attempts):
                return False  # asked again; the reject stays in the store until the new ask settles the key
            self._finish(item, "rejected", reason=rejected.reason, attempts=rejected.attempts, count_as_cached=True)
            return True
        return False

    def _finish(
        self,
        item: PreparedRequest,
        status: Status,
        *,
        record: dict[str, Any] | None = None,
        reason: str | None = None,
        attempts: int = 0,
        count_as_cached: bool = False,
    ) -> None:
        c = self.counters
        if count_as_cached:
            c.cached += 1
        else:
            setattr(c, status, getattr(c, status) + 1)
        self.sink(
            AnnotationOutcome(
                episode_id=item.episode_id,
                dataset=item.dataset,
                instruction=item.instruction,
                actions=item.actions,
                states=item.states,
                key=item.key,
                status=status,
                record=record,
                reason=reason,
                attempts=attempts,
            )
        )

    async def _annotate(self, item: PreparedRequest, reserved: float, sem: asyncio.Semaphore) -> None:
        """Ask (and re-ask) until a valid answer, a reject, or a give-up for this run.

        The dispatcher took a concurrency slot for the first ask. A slot stands for a request
        in flight: it is given back as soon as the answer arrives (the next episode's request
        goes out while this answer is checked, stored and written) and taken again for a re-ask.
        """
        opts = self.options
        slot = _Slot(sem)
        try:
            # an interrupted re-ask sequence resumes here
            previous = item.stored.attempts if item.stored else await self._db(self.store.attempts, item.key)
            messages = list(item.bundle.messages)
            for att in previous:
                if not att.errors:  # crashed between storing a valid answer and committing it
                    answer = json.loads(att.raw)
                    await self._db(
                        self.store.commit_answer, item.key, item.episode_id, answer, att.attempt, self.teacher.model
                    )
                    self._accept(item, answer, att.attempt)
                    return
                messages += reask_messages(self.template, att.raw, att.errors)
            attempt = len(previous)
            last_raw, last_errors = (previous[-1].raw, previous[-1].errors) if previous else ("", [])
            while attempt < opts.max_attempts:
                attempt += 1
                request = teacher_request(item, messages, attempt)
                await slot.take()
                try:
                    response = await self._ask(request, item.estimated_prompt_tokens)
                    await self._storing.acquire()
                finally:
                    slot.give_back()
                try:
                    if self._streak.held:  # the teacher answers this setup: the refusals held were its episodes'
                        await self._settle_refusals(stored=True)
                    answer, errors = check_answer(response, request.context, opts.schema_id)
                    cost = self.prices.cost(self.teacher.model, response.prompt_tokens, response.completion_tokens)
                    # Committed before anything else looks at it: a crash from here on never pays again.
                    await self._db(
                        commit_response,
                        self.store,
                        item.key,
                        item.episode_id,
                        self.teacher.model,
                        attempt,
                        response,
                        answer,
                        errors,
                        cost,
                    )
                finally:
                    self._storing.release()
                c = self.counters
                c.requests += 1
                c.prompt_tokens += response.prompt_tokens
                c.completion_tokens += response.completion_tokens
                c.cost += cost
                if answer is not None:
                    self._accept(item, answer, attempt)
                    return
                last_raw, last_errors = response.text, errors
                if attempt < opts.max_attempts:
                    c.reasks += 1
                    messages = messages + reask_messages(self.template, response.text, errors)
            reason = invalid_reason(attempt, last_errors)
            await self._db(self.store.commit_reject, item.key, item.episode_id, reason, last_raw, attempt)
            self._finish(item, "rejected", reason=reason, attempts=attempt)
        except PermanentTeacherError as exc:
            await self._refused(item, exc)
        except _RetriesExhausted as exc:
            self._finish(item, "failed", reason=redact(f"{GAVE_UP}{exc}"))
        except _BudgetReached:
            self._finish(item, "stopped", reason="max-cost reached")
        except RefineError as exc:  # not about this episode (a refused key, a model without images): stop the run
            self._stop_run(item, exc)
        except asyncio.CancelledError:
            self._finish(item, "stopped", reason="cancelled")
        except Exception as exc:  # the store cannot write (a full disk) or a bug: stop asking at once
            # (an answer that cannot be committed must not be paid for again and again), and let
            # `run` raise it once the requests in flight are settled
            self._fatal = self._fatal or exc
            if not self._stop.is_set():
                self.request_stop("error")
            self._finish(item, "stopped", reason=f"{type(exc).__name__}: {exc}")
        finally:
            self._reserved -= reserved
            slot.give_back()

    def _stop_run(self, item: PreparedRequest, exc: RefineError) -> None:
        """End the run on an error that is not about `item` (a refused key, a setup refusal); reject nothing."""
        self._fatal = self._fatal or exc
        if not self._stop.is_set():  # a second stop would cancel requests in flight elsewhere
            self.request_stop("error")
        self._finish(item, "stopped", reason=str(exc))

    async def _refused(self, item: PreparedRequest, exc: PermanentTeacherError) -> None:
        """An episode the teacher refused (a 400 that `refusals` did not name a setup error).

        A refusal naming the episode (its length, its content) is its reject at once. Any other is held,
        unstored, while the refusals in a row share its signature: `refusals_to_stop` distinct episodes
        refused alike stop the run with nothing stored for them (the setup is wrong; a rerun after the fix
        asks them); an answer, another refusal or the run's end first makes each held one its episode's reject.
        """
        reason = refused_reason(str(exc))
        if self._fatal is not None:  # the run is stopping on a setup error: this is most likely the same one
            self._finish(item, "stopped", reason=reason)
            return
        if self._streak.limit < 1 or is_episode_refusal(str(exc)):
            await self._settle_refusals(stored=True)
            await self._reject_refused(item, reason)
            return
        broken, setup_error = self._streak.add(refusal_signature(exc.status, str(exc)), item.episode_id, (item, reason))
        await self._reject_all(broken)
        if setup_error:
            held = self._streak.take()
            where = getattr(self.teacher, "base_url", None) or self.teacher.name
            self._stop_run(item, repeated_refusal_error(len(held), str(exc), self.teacher.model, where))
            for _, (other, why) in held:
                if other is not item:
                    self._finish(other, "stopped", reason=why)

    async def _settle_refusals(self, *, stored: bool) -> None:
        """Judge the refusals held: each its episode's reject (`stored`), or nothing stored (the run stops)."""
        held = self._streak.take()
        if stored:
            await self._reject_all(held)
            return
        for _, (item, reason) in held:
            self._finish(item, "stopped", reason=reason)

    async def _reject_all(self, held: list[tuple[str, tuple[PreparedRequest, str]]]) -> None:
        for _, (item, reason) in held:
            await self._reject_refused(item, reason)

    async def _reject_refused(self, item: PreparedRequest, reason: str) -> None:
        await self._db(self.store.commit_reject, item.key, item.episode_id, reason, "", 0)
        self._finish(item, "rejected", reason=reason)

    def _accept(self, item: PreparedRequest, answer: dict[str, Any], attempts: int) -> None:
        """Use an answer that is already committed to the store."""
        record = assemble_record(item, answer, self.options.schema_id)
        self._finish(item, "annotated", record=record, attempts=attempts)

    async def _ask(self, request: TeacherRequest, estimated_prompt: int) -> TeacherResponse:
        """One answer, retrying transient failures with backoff + jitter, honouring Retry-After."""
        opts = self.options
        estimate = estimated_prompt + opts.expected_completion_tokens
        for retry in range(opts.max_retries + 1):
            # Re-asks and retries spend money too: respect the budget before each one.
            if (request.attempt > 1 or retry > 0) and opts.max_cost is not None and self._spent() >= opts.max_cost:
                self.stop_reason = self.stop_reason or "max-cost"
                raise _BudgetReached()
            wait = self._pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(estimate)
            self.counters.in_flight += 1
            sent = time.monotonic()
            try:
                # The client enforces the timeout; this is the backstop for a teacher that does not.
                response = await _within(self.teacher.complete(request, opts.timeout), opts.timeout + 5.0)
                response.latency = time.monotonic() - sent  # stored with the attempt: a pilot's p50/p95
            except (TransientTeacherError, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    exc = TransientTeacherError(f"timed out after {opts.timeout:g}s")
                if self._tpm:
                    self._tpm.settle(-estimate)  # nothing was used
                if retry >= opts.max_retries:
                    raise _RetriesExhausted(str(exc)) from None
                delay = min(opts.retry_max, opts.retry_base * 2**retry) * random.uniform(0.5, 1.0)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                    self._pause_until = max(self._pause_until, time.monotonic() + exc.retry_after)
                self.counters.retries += 1
                await asyncio.sleep(delay)
                continue
            finally:
                self.counters.in_flight -= 1
            if self._tpm:
                self._tpm.settle(response.prompt_tokens + response.completion_tokens - estimate)
            return response
        raise _RetriesExhausted("no attempt made")  # unreachable: the loop returns or raises


async def _within(awaitable: Awaitable[TeacherResponse], seconds: float) -> TeacherResponse:
    """`await awaitable`, or asyncio.TimeoutError after `seconds`.

    `asyncio.timeout` (3.11+) cancels the request in place; `wait_for` before 3.12 wraps it in
    one more task per request.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def iter_selected(episodes: Iterator[Episode], limit: int | None) -> Iterator[Episode]:
    """The first `limit` episodes (all when None)."""
    for i, episode in enumerate(episodes):
        if limit is not None and i >= limit:
            return
        yield episode
