"""The durable request/answer store: what was paid for survives any crash.

SQLite in WAL mode, one transaction per write, `synchronous=FULL`: when `record_attempt`
or `commit_answer` returns, the answer is on disk, and only then does the engine use it.
A `kill -9` (or a power cut) can lose only requests still in flight and answers still on their
way into it (the engine holds at most --concurrency of each). A rerun reads the
store first and asks the teacher nothing it has an answer for.

Tables:
* `attempts` — every raw answer received (valid or not) with its tokens and cost, so money
  spent is accounted even for rejected answers, and an interrupted re-ask sequence resumes
  from the answers already received instead of starting over;
* `answers` — the validated teacher answer per request key;
* `rejects` — keys given up on, with the reason and the last raw answer;
* `batches`, `batch_items` — batch mode: each batch input file, the keys it holds (recorded
  before it is uploaded), its provider file and batch ids (committed the moment they are
  known) and its state; an item's outcome once its batch's results are ingested.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    episode_id TEXT NOT NULL,
    raw TEXT NOT NULL,
    finish_reason TEXT,
    errors TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    latency REAL,
    PRIMARY KEY (key, attempt)
);
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    episode_id TEXT NOT NULL,
    answer TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (
    key TEXT PRIMARY KEY,
    episode_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    local_id INTEGER PRIMARY KEY,
    tag TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    base_url TEXT,
    state TEXT NOT NULL,
    file_path TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    requests INTEGER NOT NULL,
    estimate REAL NOT NULL,
    provider_status TEXT,
    counts TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    key TEXT NOT NULL,
    local_id INTEGER NOT NULL,
    episode_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    context TEXT NOT NULL,
    outcome TEXT,
    PRIMARY KEY (key, local_id)
);
CREATE INDEX IF NOT EXISTS batch_items_by_batch ON batch_items (local_id);
"""


@dataclass(frozen=True)
class Attempt:
    """One raw answer as stored."""

    attempt: int
    raw: str
    finish_reason: str | None
    errors: list[str]  # why it was not accepted (empty for the accepted one)
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency: float | None = None  # seconds the answered request took (None: a batch line, an older store)


@dataclass(frozen=True)
class StoredAnswer:
    key: str
    episode_id: str
    answer: dict[str, Any]
    attempts: int
    model: str


REFUSED = "the teacher refused the request: "  # a refusal's reject reason starts so (what --retry-rejected asks again)


@dataclass(frozen=True)
class Reject:
    key: str
    episode_id: str
    reason: str
    raw: str
    attempts: int  # answers received before it was given up (0 for a refusal of the first ask)

    def retryable(self, max_attempts: int) -> bool:
        """Whether `--retry-rejected` asks it again: a refusal always (it cost nothing, and a fixed setup may
        answer it); answers that failed the checks only while `max_attempts` allows more than were received
        (the re-asks go on from the stored answers and their errors, so nothing is paid for twice)."""
        return retryable(self.reason, self.attempts, max_attempts)


def retryable(reason: str, attempts: int, max_attempts: int) -> bool:
    """`Reject.retryable` from a reject's reason and answer count."""
    return reason.startswith(REFUSED) or attempts < max_attempts


@dataclass(frozen=True)
class Lookup:
    """Everything the store holds for one request key, read in one go."""

    answer: StoredAnswer | None
    reject: Reject | None
    attempts: list[Attempt]


_HOLDS_KEY = (
    "SELECT EXISTS (SELECT 1 FROM answers WHERE key = ?) OR EXISTS (SELECT 1 FROM rejects WHERE key = ?) "
    "OR EXISTS (SELECT 1 FROM attempts WHERE key = ?)"
)


@dataclass(frozen=True)
class BatchRow:
    """One batch of batch mode, as the store knows it."""

    local_id: int
    tag: str  # refinevla-<run id>-<local id>: the name/metadata it carries at the provider
    provider: str
    model: str
    base_url: str | None
    state: str  # written | submitted | <provider state: pending, running, ...> | ingested
    file_path: str
    file_id: str | None
    batch_id: str | None
    requests: int
    estimate: float  # USD at batch prices, counted against --max-cost until answers are ingested
    provider_status: str | None
    counts: dict[str, int]


@dataclass(frozen=True)
class BatchItem:
    key: str
    local_id: int
    episode_id: str
    attempt: int  # which answer of the key this line asks for (1 = first ask, 2.. = re-asks)
    context: dict[str, Any]  # the SemanticContext the answer is checked against
    outcome: str | None  # None until ingested; "answered", "invalid", or "error: <why>"


_BATCH_COLUMNS = (
    "local_id, tag, provider, model, base_url, state, file_path, file_id, batch_id, requests, estimate, "
    "provider_status, counts"
)


@dataclass(frozen=True)
class Spend:
    """Totals over every attempt recorded (also those of earlier runs)."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


class ResultStore:
    """A SQLite file of attempts, answers and rejects, keyed by request key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the engine's event-loop thread only; writes are tiny.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._setup_schema()

    def _setup_schema(self, wait: float = 30.0) -> None:
        """WAL mode and the tables, waiting out other processes opening the same new file.

        Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
        locked" at once (no busy wait) to a second process doing the same at that moment, as
        `annotate --processes` workers starting together would.
        """
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._add_latency_column()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(0.5, delay * 2)

    def _add_latency_column(self) -> None:
        """Stores written before attempts had a latency get the column (NULL for their old rows)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(attempts)")}
        if "latency" not in columns:
            self._db.execute("ALTER TABLE attempts ADD COLUMN latency REAL")

    def close(self) -> None:
        self._db.close()

    def reader(self) -> ResultStore | None:
        """A second connection to the same file, for lookups from another thread.

        WAL lets it read while the writer commits, so looking up the next episodes never waits
        behind the fsyncs of the answers being stored. None for an in-memory store (one connection).
        """
        if str(self.path) == ":memory:":
            return None
        return ResultStore(self.path)

    def lookup(self, key: str) -> Lookup:
        """The answer, reject and attempts of `key` (what a rerun needs to skip or resume it).

        One query first says whether the store holds anything for the key: in a new run it holds nothing
        for almost every key, and three queries per request were a tenth of preparation's CPU."""
        held = self._db.execute(_HOLDS_KEY, (key, key, key)).fetchone()[0]
        if not held:
            return Lookup(None, None, [])
        return Lookup(self.answer(key), self.reject(key), self.attempts(key))

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        # Autocommit mode: each statement is its own durable transaction.
        self._db.execute(sql, params)

    def record_attempt(self, key: str, episode_id: str, model: str, attempt: Attempt) -> None:
        """Persist a raw answer the moment it arrives (before it is parsed or used)."""
        self._write(
            "INSERT OR REPLACE INTO attempts (key, attempt, episode_id, raw, finish_reason, errors, prompt_tokens, "
            "completion_tokens, cost, model, created, latency) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                key,
                attempt.attempt,
                episode_id,
                attempt.raw,
                attempt.finish_reason,
                json.dumps(attempt.errors),
                attempt.prompt_tokens,
                attempt.completion_tokens,
                attempt.cost,
                model,
                time.time(),
                attempt.latency,
            ),
        )

    def record_answer(self, key: str, episode_id: str, model: str, attempt: Attempt, answer: dict[str, Any]) -> None:
        """A valid answer: its attempt and the answer in one transaction (one fsync, not two)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self.record_attempt(key, episode_id, model, attempt)
            self.commit_answer(key, episode_id, answer, attempt.attempt, model)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def set_attempt_errors(self, key: str, attempt: int, errors: list[str]) -> None:
        self._write("UPDATE attempts SET errors = ? WHERE key = ? AND attempt = ?", (json.dumps(errors), key, attempt))

    def attempts(self, key: str) -> list[Attempt]:
        rows = self._db.execute(
            "SELECT attempt, raw, finish_reason, errors, prompt_tokens, completion_tokens, cost, latency "
            "FROM attempts WHERE key = ? ORDER BY attempt",
            (key,),
        ).fetchall()
        return [Attempt(a, raw, fr, json.loads(err), pt, ct, c, lat) for a, raw, fr, err, pt, ct, c, lat in rows]

    def commit_answer(self, key: str, episode_id: str, answer: dict[str, Any], attempts: int, model: str) -> None:
        """The validated answer of `key`; an earlier reject of it (asked again with --retry-rejected) goes in the
        same transaction, so the key is never both answered and rejected, nor neither."""
        own = not self._db.in_transaction
        if own:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?,?,?,?,?,?)",
                (key, episode_id, json.dumps(answer, ensure_ascii=False), attempts, model, time.time()),
            )
            self._db.execute("DELETE FROM rejects WHERE key = ?", (key,))
        except BaseException:
            if own:
                self._db.execute("ROLLBACK")
            raise
        if own:
            self._db.execute("COMMIT")

    def commit_reject(self, key: str, episode_id: str, reason: str, raw: str, attempts: int) -> None:
        self._write(
            "INSERT OR REPLACE INTO rejects VALUES (?,?,?,?,?,?)", (key, episode_id, reason, raw, attempts, time.time())
        )

    def answer(self, key: str) -> StoredAnswer | None:
        row = self._db.execute(
            "SELECT key, episode_id, answer, attempts, model FROM answers WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return StoredAnswer(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def reject(self, key: str) -> Reject | None:
        row = self._db.execute(
            "SELECT key, episode_id, reason, raw, attempts FROM rejects WHERE key = ?", (key,)
        ).fetchone()
        return Reject(*row) if row else None

    def settled_keys(self, retry_rejected_below: int | None = None) -> frozenset[str]:
        """Keys with a final outcome (an answer or a reject): nothing more is asked for them.

        `retry_rejected_below` (--retry-rejected: the run's --max-attempts) leaves out the rejects
        `Reject.retryable` asks again.
        """
        answered = {r[0] for r in self._db.execute("SELECT key FROM answers")}
        rejected = self._db.execute("SELECT key, reason, attempts FROM rejects")
        if retry_rejected_below is None:
            return frozenset(answered | {r[0] for r in rejected})
        kept = {k for k, reason, n in rejected if not retryable(reason, n, retry_rejected_below)}
        return frozenset(answered | kept)

    def open_attempts(self, retry_rejected_below: int | None = None) -> dict[str, list[tuple[str, list[str]]]]:
        """(raw, errors) of each stored attempt of keys with no outcome yet: re-ask sequences a run left unfinished.

        `retry_rejected_below` (--retry-rejected: the run's --max-attempts) adds the rejects
        `Reject.retryable` asks again, whose re-asks go on from their stored answers.
        """
        rows = self._db.execute(
            "SELECT key, raw, errors FROM attempts WHERE key NOT IN (SELECT key FROM answers) ORDER BY key, attempt"
        ).fetchall()
        rejected = {k: (reason, n) for k, reason, n in self._db.execute("SELECT key, reason, attempts FROM rejects")}
        out: dict[str, list[tuple[str, list[str]]]] = {}
        retried = retry_rejected_below
        for key, raw, errors in rows:
            if key in rejected and (retried is None or not retryable(*rejected[key], retried)):
                continue
            out.setdefault(key, []).append((raw, json.loads(errors)))
        return out

    def rejects(self) -> list[Reject]:
        rows = self._db.execute(
            "SELECT key, episode_id, reason, raw, attempts FROM rejects ORDER BY created"
        ).fetchall()
        return [Reject(*r) for r in rows]

    def spend(self) -> Spend:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost), 0) FROM attempts"
        ).fetchone()
        return Spend(int(row[0]), int(row[1]), int(row[2]), float(row[3]))

    def counts(self) -> dict[str, int]:
        return {
            "answers": self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0],
            "rejects": self._db.execute("SELECT COUNT(*) FROM rejects").fetchone()[0],
            "attempts": self._db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0],
        }

    # ----------------------------------------------------------------- batch mode
    def meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def run_id(self) -> str:
        """This store's batch-run id (made once, kept forever): the tag prefix of its remote objects."""
        found = self.meta("batch_run_id")
        if found is not None:
            return found
        import secrets

        self._write("INSERT OR IGNORE INTO meta VALUES (?, ?)", ("batch_run_id", secrets.token_hex(6)))
        return str(self.meta("batch_run_id"))

    def add_batch(
        self,
        provider: str,
        model: str,
        base_url: str | None,
        file_path: str,
        items: list[tuple[str, str, int, dict[str, Any]]],
        estimate: float,
    ) -> BatchRow:
        """Record a batch and the (key, episode_id, attempt, context) lines it holds, in one transaction,
        before anything is uploaded: a crash after this finds the batch again and submits it once."""
        run_id = self.run_id()
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            local_id = int(self._db.execute("SELECT COALESCE(MAX(local_id), 0) + 1 FROM batches").fetchone()[0])
            tag = f"refinevla-{run_id}-{local_id:05d}"
            self._db.execute(
                "INSERT INTO batches (local_id, tag, provider, model, base_url, state, file_path, requests, estimate, "
                "created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (local_id, tag, provider, model, base_url, "written", file_path, len(items), estimate, now, now),
            )
            self._db.executemany(
                "INSERT INTO batch_items (key, local_id, episode_id, attempt, context) VALUES (?,?,?,?,?)",
                [(k, local_id, e, a, json.dumps(c)) for k, e, a, c in items],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return self.batch(local_id)

    def update_batch(self, local_id: int, **fields: Any) -> None:
        """Set columns of a batch (file_id, batch_id, state, provider_status, counts) durably."""
        if "counts" in fields:
            fields["counts"] = json.dumps(fields["counts"])
        names = ", ".join(f"{name} = ?" for name in fields)
        self._write(
            f"UPDATE batches SET {names}, updated = ? WHERE local_id = ?", (*fields.values(), time.time(), local_id)
        )

    def batch(self, local_id: int) -> BatchRow:
        row = self._db.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE local_id = ?", (local_id,)).fetchone()
        return _batch_row(row)

    def batches(self) -> list[BatchRow]:
        rows = self._db.execute(f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY local_id").fetchall()
        return [_batch_row(r) for r in rows]

    def batch_items(self, local_id: int) -> list[BatchItem]:
        rows = self._db.execute(
            "SELECT key, local_id, episode_id, attempt, context, outcome FROM batch_items WHERE local_id = ? "
            "ORDER BY rowid",
            (local_id,),
        ).fetchall()
        return [BatchItem(k, i, e, a, json.loads(c), o) for k, i, e, a, c, o in rows]

    def set_item_outcome(self, key: str, local_id: int, outcome: str) -> None:
        self._write("UPDATE batch_items SET outcome = ? WHERE key = ? AND local_id = ?", (outcome, key, local_id))

    def keys_in_flight(self) -> set[str]:
        """Keys in a batch whose results are not ingested yet (never submitted again meanwhile)."""
        rows = self._db.execute(
            "SELECT i.key FROM batch_items i JOIN batches b ON b.local_id = i.local_id WHERE b.state != 'ingested'"
        ).fetchall()
        return {r[0] for r in rows}

    def line_errors(self) -> dict[str, int]:
        """Per key, how many of its batch lines failed at the provider (expired, 5xx, ...)."""
        rows = self._db.execute(
            "SELECT key, COUNT(*) FROM batch_items WHERE outcome LIKE 'error:%' GROUP BY key"
        ).fetchall()
        return {k: int(n) for k, n in rows}


def _batch_row(row: Any) -> BatchRow:
    values = list(row)
    values[-1] = json.loads(values[-1] or "{}")
    return BatchRow(*values)
