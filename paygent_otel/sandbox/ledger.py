"""The sandbox's SQLite ledger: what the local Paygent received, and every request it answered.

:class:`LedgerWriter` is the sandbox's single writer (one connection, one prepared
statement per table, one group commit per turn of the event loop). :class:`Ledger` is the
read side that tests, benchmarks and ``paygent-otel ledger`` use; it opens the same file
read-only, so it can run in another thread or process while the sandbox serves.

Tables:

``usage``
    One row per accepted ``POST /api/v2/usage`` (an idempotent repeat adds no row).
``request_log``
    One row per request to a Paygent API route, whatever it was answered, with the arrival
    time in Unix seconds (float, microsecond resolution).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, NamedTuple

from paygent_otel._output import PERIODS

__all__ = [
    "GROUP_COLUMNS",
    "PERIODS",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerWriter",
    "Outcome",
    "UsageRow",
]

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of a sandbox ledger; a file with another version is refused."""

GROUP_COLUMNS: Final = ("customer_id", "agent_id", "indicator", "kind", "provider", "model", "plan")
"""Columns :meth:`Ledger.totals` can group by."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id              INTEGER PRIMARY KEY,
    received_at     REAL    NOT NULL,
    idempotency_key TEXT,
    agent_id        TEXT    NOT NULL,
    customer_id     TEXT    NOT NULL,
    indicator       TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('stt', 'tts', 'sts')),
    provider        TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    plan            TEXT    NOT NULL,
    audio_minutes   REAL,
    characters      INTEGER,
    usage_metadata  TEXT,
    sts_tokens      INTEGER,
    sts_minutes     REAL,
    meta_tags       TEXT,
    body            TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS request_log (
    id              INTEGER PRIMARY KEY,
    received_at     REAL    NOT NULL,
    method          TEXT    NOT NULL,
    path            TEXT    NOT NULL,
    idempotency_key TEXT,
    status          INTEGER NOT NULL,
    outcome         TEXT    NOT NULL
);
"""

_INSERT_REQUEST = (
    "INSERT INTO request_log (received_at, method, path, idempotency_key, status, outcome) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class Outcome(StrEnum):
    """Values of ``request_log.outcome``: what the sandbox did with a request."""

    ACCEPTED = "accepted"
    """Valid usage, recorded in ``usage``."""
    DUPLICATE = "duplicate"
    """A repeated ``Idempotency-Key``: acknowledged like the first, not recorded again."""
    INVALID = "invalid"
    """Refused by validation (400, 415)."""
    UNAUTHORIZED = "unauthorized"
    """Missing or wrong ``paygent-api-key`` (401)."""
    INJECTED_FAILURE = "injected_failure"
    """Answered ``fail_status`` by fault injection."""
    INJECTED_REJECTION = "injected_rejection"
    """Answered 400 by fault injection."""
    CUSTOMER = "customer"
    """A ``create-or-get`` customer call (acknowledged, not stored)."""


class UsageRow(NamedTuple):
    """One accepted usage record, as stored in the ``usage`` table (fields in column order).

    A tuple, so it unpacks straight into the prepared INSERT's parameters."""

    received_at: float
    """Arrival time, Unix seconds."""
    idempotency_key: str | None
    agent_id: str
    customer_id: str
    indicator: str
    kind: str
    """``stt``, ``tts`` or ``sts``: which quantity field ``rawUsage`` carried."""
    provider: str
    model: str
    plan: str
    audio_minutes: float | None
    """``rawUsage.audioDuration`` (STT only)."""
    characters: int | None
    """``rawUsage.characterCount`` (TTS only)."""
    usage_metadata: str | None
    """``rawUsage.usageMetadata`` as JSON text (STS only)."""
    sts_tokens: int | None
    """Every ``tokens`` value in ``usageMetadata`` added up: input, output and cached (STS only)."""
    sts_minutes: float | None
    """Every ``minutes`` value in ``usageMetadata`` added up: input, output, connection (STS)."""
    meta_tags: str | None
    """``metaTags`` as JSON text, when sent."""
    body: str
    """The request body exactly as received."""


_USAGE_COLUMNS = ("id", *UsageRow._fields)
_INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(_USAGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _USAGE_COLUMNS)})"
)


class LedgerWriter:
    """The sandbox's only writer: creates the schema, stores requests, remembers idempotency keys.

    Used from one event loop only. Writes are buffered and stored once per turn of the loop,
    in one transaction with one prepared INSERT per table (a group commit: under load it
    costs a fifth of a commit per request). A handler awaits :meth:`committed` before it
    answers, so what a client was told is stored is already readable through :class:`Ledger`.

    Idempotency keys are checked against memory, not against an index: a unique index on
    random keys tripled the cost of a write. So one ledger file takes one sandbox at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        """The SQLite file (created when missing)."""
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot create the ledger {self.path}: the folder {self.path.parent} does not "
                "exist (create it, or pass another --db)"
            )
        # The event loop thread that uses it is not the thread that opened it.
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            _check_version(self._db, self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is a write to the WAL, no fsync; a crash of the machine
            # (not of the process) can lose the last commits, which a sandbox can afford.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.commit()
            self._usage_ids: dict[str, int] = dict(
                self._db.execute(
                    "SELECT idempotency_key, id FROM usage WHERE idempotency_key IS NOT NULL"
                )
            )
            (last_id,) = self._db.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()
        except BaseException:
            self._db.close()
            raise
        # Ids are handed out before the INSERT runs, so the answer can carry them.
        self._next_id: int = last_id + 1
        self._usage_rows: list[tuple[Any, ...]] = []
        self._log_rows: list[tuple[Any, ...]] = []
        self._commit: asyncio.Future[None] | None = None

    def usage_id(self, idempotency_key: str) -> int | None:
        """The ``usage.id`` recorded under this key, or None when the key is new."""
        return self._usage_ids.get(idempotency_key)

    def record_usage(self, row: UsageRow, method: str, path: str) -> int:
        """Buffer one accepted record and its request-log line; its id. Await :meth:`committed`."""
        usage_id = self._next_id
        self._next_id += 1
        self._usage_rows.append((usage_id, *row))
        self._log_rows.append(
            (row.received_at, method, path, row.idempotency_key, 200, Outcome.ACCEPTED)
        )
        if row.idempotency_key is not None:
            self._usage_ids[row.idempotency_key] = usage_id
        return usage_id

    def log_request(
        self,
        received_at: float,
        method: str,
        path: str,
        idempotency_key: str | None,
        status: int,
        outcome: Outcome,
    ) -> None:
        """Buffer one request-log line for a request that added no usage row."""
        self._log_rows.append((received_at, method, path, idempotency_key, status, outcome))

    def committed(self) -> asyncio.Future[None]:
        """Resolves once everything buffered so far is committed (raises if the commit failed)."""
        if self._commit is None:
            loop = asyncio.get_running_loop()
            self._commit = loop.create_future()
            # call_soon runs after the callbacks already queued for this turn, so every
            # request the loop is handling right now joins this commit.
            loop.call_soon(self._commit_now)
        return self._commit

    def _commit_now(self) -> None:
        done, self._commit = self._commit, None
        assert done is not None
        try:
            self._write()
        except sqlite3.Error as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _write(self) -> None:
        usage, self._usage_rows = self._usage_rows, []
        log, self._log_rows = self._log_rows, []
        try:
            with self._db:  # one transaction; rolled back on error
                if usage:
                    self._db.executemany(_INSERT_USAGE, usage)
                if log:
                    self._db.executemany(_INSERT_REQUEST, log)
        except sqlite3.Error:
            # Forget what was never stored, so a retry of those requests is recorded.
            for usage_id, *row in usage:
                key = row[1]
                if key is not None and self._usage_ids.get(key) == usage_id:
                    del self._usage_ids[key]
            if usage:
                self._next_id = usage[0][0]
            raise

    def close(self) -> None:
        """Store what is buffered and close the connection (idempotent)."""
        with contextlib.suppress(sqlite3.ProgrammingError):  # already closed
            self._write()
        self._db.close()


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version not in (0, SCHEMA_VERSION):
        raise ValueError(
            f"{path} has schema version {version}, not a paygent sandbox ledger "
            f"(version {SCHEMA_VERSION}); use another --db file"
        )


class Ledger:
    """Read-only queries over a sandbox ledger file; safe while the sandbox is writing.

    Each call opens its own short-lived read-only connection, so one ``Ledger`` can be used
    from any thread, and sees every request answered before the call.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        """The SQLite file the sandbox writes."""

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.is_file():
            raise FileNotFoundError(f"no sandbox ledger at {self.path}")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
            try:
                found = db.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name IN ('usage', 'request_log')"
                ).fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"{self.path} is not a sandbox ledger: {exc}") from None
            if found != 2:
                raise ValueError(
                    f"{self.path} is not a sandbox ledger (it has no usage table"
                    + (
                        "; it looks like a spool: see `paygent-otel spool status --spool "
                        f"{self.path}`)"
                        if db.execute(
                            "SELECT 1 FROM sqlite_master WHERE name = 'pending'"
                        ).fetchone()
                        else ")"
                    )
                )
            db.row_factory = sqlite3.Row
            yield db

    def rows(self) -> list[dict[str, Any]]:
        """Every usage row, oldest first, as dicts with the ``usage`` columns.

        ``usage_metadata`` and ``meta_tags`` are decoded from JSON (None when absent);
        ``body`` is the raw request body.
        """
        with self._connect() as db:
            result = [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
        for row in result:
            for column in ("usage_metadata", "meta_tags"):
                if row[column] is not None:
                    row[column] = json.loads(row[column])
        return result

    def count(self) -> int:
        """Number of usage rows (accepted records)."""
        with self._connect() as db:
            (n,) = db.execute("SELECT count(*) FROM usage").fetchone()
        return int(n)

    def totals(
        self,
        by: Sequence[str] = ("customer_id", "kind", "model"),
        *,
        since: float | None = None,
        until: float | None = None,
        tz: tzinfo = UTC,
    ) -> list[dict[str, Any]]:
        """Totals per group of ``by`` columns, sorted by group, of the usage received in
        ``[since, until)`` (Unix seconds; None: no bound).

        ``by`` holds any of :data:`GROUP_COLUMNS` and of :data:`PERIODS` (``hour``, ``day``,
        ``month`` of the arrival time, in ``tz``). Each dict has the group columns, then
        ``calls``, ``audio_minutes``, ``characters``, ``sts_tokens`` and ``sts_minutes``.
        Counts are exact integer sums; minutes are summed with :func:`math.fsum`, so the
        order rows arrived in does not change the result.
        """
        unknown = [c for c in by if c not in GROUP_COLUMNS and c not in PERIODS]
        if unknown:
            raise ValueError(
                f"cannot group by {unknown}; choose from {', '.join((*GROUP_COLUMNS, *PERIODS))}"
            )
        columns = [c if c in GROUP_COLUMNS else "received_at" for c in by]
        select = ", ".join((*columns, "audio_minutes", "characters", "sts_tokens", "sts_minutes"))
        where, params = [], []
        if since is not None:
            where.append("received_at >= ?")
            params.append(since)
        if until is not None:
            where.append("received_at < ?")
            params.append(until)
        sql = f"SELECT {select} FROM usage" + (f" WHERE {' AND '.join(where)}" if where else "")
        formats = [PERIODS.get(c) for c in by]
        groups: dict[tuple[str, ...], _Group] = {}
        with self._connect() as db:
            for row in db.execute(sql, params):
                key = tuple(
                    value if fmt is None else datetime.fromtimestamp(value, tz).strftime(fmt)
                    for value, fmt in zip(row[: len(by)], formats, strict=True)
                )
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group()
                group.add(*row[len(by) :])
        return [
            {**dict(zip(by, key, strict=True)), **groups[key].as_dict()} for key in sorted(groups)
        ]

    def duplicate_count(
        self, key: str | None = None, *, since: float | None = None, until: float | None = None
    ) -> int:
        """Idempotent repeats acknowledged and not recorded: in total, or for one key, of
        the requests received in ``[since, until)``."""
        sql = "SELECT count(*) FROM request_log WHERE outcome = ?"
        params: tuple[str | float, ...] = (Outcome.DUPLICATE,)
        if key is not None:
            sql += " AND idempotency_key = ?"
            params += (key,)
        if since is not None:
            sql += " AND received_at >= ?"
            params += (since,)
        if until is not None:
            sql += " AND received_at < ?"
            params += (until,)
        with self._connect() as db:
            (n,) = db.execute(sql, params).fetchone()
        return int(n)

    def request_log(self) -> list[dict[str, Any]]:
        """Every logged request, in arrival order: ``id``, ``received_at`` (Unix seconds),
        ``method``, ``path``, ``idempotency_key``, ``status``, ``outcome``.

        ``id`` is the order of the answers, which can differ from the order of arrival when
        requests wait on injected latency."""
        with self._connect() as db:
            return [
                dict(r) for r in db.execute("SELECT * FROM request_log ORDER BY received_at, id")
            ]

    def keys(self) -> list[str]:
        """Idempotency keys of the recorded usage rows, in the order they were recorded."""
        with self._connect() as db:
            return [
                k
                for (k,) in db.execute(
                    "SELECT idempotency_key FROM usage "
                    "WHERE idempotency_key IS NOT NULL ORDER BY id"
                )
            ]


class _Group:
    """Running totals of one group (exact ints, minutes kept for one fsum at the end)."""

    __slots__ = ("audio_minutes", "calls", "characters", "sts_minutes", "sts_tokens")

    def __init__(self) -> None:
        self.calls = 0
        self.audio_minutes: list[float] = []
        self.characters = 0
        self.sts_tokens = 0
        self.sts_minutes: list[float] = []

    def add(
        self,
        audio_minutes: float | None,
        characters: int | None,
        sts_tokens: int | None,
        sts_minutes: float | None,
    ) -> None:
        self.calls += 1
        if audio_minutes is not None:
            self.audio_minutes.append(audio_minutes)
        if characters is not None:
            self.characters += characters
        if sts_tokens is not None:
            self.sts_tokens += sts_tokens
        if sts_minutes is not None:
            self.sts_minutes.append(sts_minutes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "audio_minutes": math.fsum(self.audio_minutes),
            "characters": self.characters,
            "sts_tokens": self.sts_tokens,
            "sts_minutes": math.fsum(self.sts_minutes),
        }
