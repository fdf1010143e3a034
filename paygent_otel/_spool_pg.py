"""The PostgreSQL spool: one queue, one dead-letter table and one set of keys for many hosts.

Selected by a ``postgresql://`` URL wherever a spool path is accepted. Any number of bridge
replicas and exporters on any number of hosts share it:

- a record is committed (key + JSON body) before ``export()`` or the bridge's ack returns;
  its key is inserted into ``paygent_keys`` in the same transaction, so the same record
  handed to two replicas is stored, and therefore sent, once;
- :meth:`PostgresSpool.lease` reserves due records with ``FOR UPDATE SKIP LOCKED``: two
  workers never hold one record;
- a live worker renews its leases every ``lease_seconds / 4`` (a heartbeat carried by its
  own spool calls); the leases of a replica that died expire after ``lease_seconds`` and
  another replica sends those records, with the same key;
- the schema is versioned (``paygent_schema_version``) and migrated under an advisory lock
  by the first process that opens the database;
- at most ``pool_size`` connections per process; each has a connect timeout and a statement
  timeout, so a slow or unreachable server costs a bounded wait;
- while PostgreSQL cannot be reached, :meth:`PostgresSpool.add` commits records to a local
  SQLite file (the *fallback*) instead, and the worker moves them into PostgreSQL once it
  answers again: ``export()`` neither stalls nor loses records during an outage;
- the URL's password never appears in a log line or a repr (:class:`~._spool_url.SpoolUrl`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from ._config import (
    OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH,
    OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS,
    default_spool_path,
    read_setting,
)
from ._mapping import Rejection, UsageRecord, conflict_rejection
from ._spool import (
    _BODY_EXCERPT,
    DELIVERED_KEY_RETENTION,
    AddResult,
    DeadLetter,
    EndpointStatus,
    SpooledItem,
    SpoolStats,
    SqliteSpool,
    _held,
    _owner_token,
    endpoint_statuses,
    rejected_row,
)
from ._spool_url import SpoolUrl, redact

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH",
    "OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS",
    "SCHEMA_VERSION",
    "MoveResult",
    "PostgresSpool",
    "SpoolUnavailable",
    "default_fallback_path",
    "move_sqlite_records",
]

_logger = logging.getLogger("paygent_otel.spool")

DEFAULT_POOL_SIZE: Final = 4
"""Connections one process opens at most (the application's exports, the delivery worker,
the bridge's cumulative-metric state); a caller past it waits up to the connect timeout."""
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
"""Seconds a connection attempt may take before the server counts as unreachable."""
STATEMENT_TIMEOUT_MS: Final = 5000
"""Milliseconds one statement may run (``statement_timeout``) before it is cancelled."""
OUTAGE_PAUSE_SECONDS: Final = 2.0
"""After a failed connection, how long calls fail at once (or go to the fallback) before
the server is tried again: an outage costs the application one connect timeout, not one
per export. Doubles with each failed try, up to :data:`OUTAGE_PAUSE_MAX_SECONDS`."""
OUTAGE_PAUSE_MAX_SECONDS: Final = 30.0
"""The longest pause between two tries during an outage."""
FALLBACK_DRAIN_SECONDS: Final = 1.0
"""How often the worker looks for records the fallback took during an outage."""
PRUNE_SECONDS: Final = 600.0
"""How often delivered keys past the retention window are deleted."""
SCHEMA_VERSION: Final = 2
"""The newest schema this version creates and understands."""
_MIGRATION_LOCK: Final = 0x7061_7967  # "payg": one advisory lock id for migrations
_BATCH: Final = 500

_MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE paygent_keys (
            key text PRIMARY KEY,
            delivered double precision
        );
        CREATE INDEX paygent_keys_delivered ON paygent_keys (delivered)
            WHERE delivered IS NOT NULL;
        CREATE TABLE paygent_pending (
            id bigserial PRIMARY KEY,
            key text NOT NULL UNIQUE,
            dest text NOT NULL,
            body bytea NOT NULL,
            origin text NOT NULL DEFAULT '',
            created double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            next_attempt double precision NOT NULL,
            lease_owner text,
            lease_until double precision,
            last_error text
        );
        CREATE INDEX paygent_pending_due ON paygent_pending (dest, next_attempt);
        CREATE INDEX paygent_pending_owner ON paygent_pending (lease_owner)
            WHERE lease_owner IS NOT NULL;
        CREATE TABLE paygent_dead (
            id bigserial PRIMARY KEY,
            key text NOT NULL UNIQUE,
            dest text NOT NULL,
            body bytea NOT NULL,
            origin text NOT NULL DEFAULT '',
            created double precision NOT NULL,
            died double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            status text NOT NULL,
            reason text NOT NULL
        );
        CREATE TABLE paygent_streams (
            stream text PRIMARY KEY,
            start_ns bigint NOT NULL,
            time_ns bigint NOT NULL,
            int_value bigint,
            float_value double precision,
            updated double precision NOT NULL
        );
        CREATE TABLE paygent_stream_journal (
            batch text NOT NULL,
            stream text NOT NULL,
            start_ns bigint NOT NULL,
            time_ns bigint NOT NULL,
            int_value bigint,
            float_value double precision,
            PRIMARY KEY (batch, stream)
        );
        CREATE TABLE paygent_stream_journal_keys (
            batch text NOT NULL,
            key text NOT NULL,
            PRIMARY KEY (batch, key)
        );
        """,
    ),
    (
        2,
        """
        CREATE TABLE paygent_endpoints (
            dest text PRIMARY KEY,
            url text NOT NULL
        );
        """,
    ),
)
_TABLES: Final = ("paygent_pending", "paygent_dead", "paygent_keys")
_RECORD: Final = (("key", "text"), ("dest", "text"), ("body", "bytea"), ("origin", "text"),
                  ("created", "float8"))  # fmt: skip
_ADD_COLUMNS: Final = (*_RECORD, ("next_attempt", "float8"))
_IMPORT_COLUMNS: Final = (*_ADD_COLUMNS, ("attempts", "int"), ("last_error", "text"))
_REJECTED_COLUMNS: Final = (*_RECORD, ("died", "float8"), ("status", "text"), ("reason", "text"))
"""The columns of :func:`~._spool.rejected_row`."""
_DEAD_COLUMNS: Final = (*_REJECTED_COLUMNS, ("attempts", "int"))


class SpoolUnavailable(OSError):
    """The PostgreSQL server cannot be reached (or the URL cannot be used); the message says
    why, with the password masked."""


def default_fallback_path() -> Path:
    """``$XDG_STATE_HOME/paygent-otel/pg-fallback.sqlite3`` (beside the default spool)."""
    return default_spool_path().with_name("pg-fallback.sqlite3")


def _lease_seconds() -> float:
    return float(read_setting(OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS))


def _columns(items: Sequence[tuple[int, Any, str]]) -> list[list[Any]]:
    """(rowid, value, text) items as three arrays for ``unnest``, the text cut to an excerpt."""
    rowids, values, texts = ([*column] for column in zip(*items, strict=True))
    return [rowids, values, [text[:_BODY_EXCERPT] for text in texts]]


def _describe(exc: BaseException) -> str:
    # libpq's messages name host, port, user and database, never the password.
    return f"{type(exc).__name__}: {str(exc).strip()}"


_live_pools: weakref.WeakSet[_ConnectionPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ConnectionPool:
    """At most ``size`` autocommit connections, reused; broken ones are dropped.

    A forked child starts with no connection: the parent's sockets are not used (psycopg
    does not close a connection garbage-collected in another process).
    """

    def __init__(self, url: SpoolUrl, size: int, connect_timeout: float) -> None:
        self.url = url
        self.size = size
        self.connect_timeout = connect_timeout
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self.opened = 0
        """Connections opened by this process (for tests and status)."""
        _live_pools.add(self)

    def _after_fork(self) -> None:
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.size)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.url.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
            )
        except psycopg.Error as exc:
            reason = redact(_describe(exc), self.url.dsn)
            raise SpoolUnavailable(f"cannot connect to {self.url}: {reason}") from None
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        self.opened += 1
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one unit of work; back to the pool afterwards unless broken."""
        slots = self._slots
        if not slots.acquire(timeout=self.connect_timeout):
            raise SpoolUnavailable(
                f"all {self.size} connections to {self.url} are busy (waited "
                f"{self.connect_timeout:g} s)"
            )
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            try:
                yield conn
            finally:
                if not conn.closed and not conn.broken:
                    with self._lock:
                        self._idle.append(conn)
        finally:
            slots.release()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error):
                conn.close()


@dataclass(frozen=True, slots=True)
class MoveResult:
    """What :func:`move_sqlite_records` moved from a SQLite spool into PostgreSQL."""

    pending: int = 0
    """Pending records now pending in PostgreSQL."""
    dead_letters: int = 0
    """Dead letters now dead letters in PostgreSQL."""
    duplicates: int = 0
    """Records whose key PostgreSQL already knew (removed from the file, not sent twice)."""


class PostgresSpool:
    """The shared durable spool in a PostgreSQL database (same contract as ``SqliteSpool``)."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        max_bytes: int,
        fallback_path: str | os.PathLike[str] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        lease_seconds: float | None = None,
    ) -> None:
        """Connect and migrate the schema.

        With ``fallback_path``, an unreachable server is logged and records go to that
        SQLite file until it answers; without it (the ``spool`` commands) the error is
        raised as :class:`SpoolUnavailable`.
        """
        self.url = SpoolUrl(url)
        self.path = self.url
        """What status output and log lines show: the URL, password masked."""
        self.max_bytes = max_bytes
        self.lease_seconds = lease_seconds if lease_seconds is not None else _lease_seconds()
        self.pool = _ConnectionPool(self.url, pool_size, connect_timeout)
        """The process's connections to the server (shared with the cumulative-metric state)."""
        self.fallback_path = Path(fallback_path) if fallback_path is not None else None
        self._fallback: SqliteSpool | None = None
        self._fallback_lock = threading.Lock()
        self._owner = _owner_token()
        self._pid = os.getpid()
        self._schema_ready = False
        self._down_until = 0.0
        self._pause = OUTAGE_PAUSE_SECONDS
        self._outage: str | None = None
        self._last_beat = 0.0
        self._last_prune = 0.0
        self._last_drain = 0.0
        self._size_cache = (0.0, 0)
        self._last_pending = 0
        self._last_stats = SpoolStats(0, 0, 0, None, 0)
        try:
            with self.connection():
                pass
        except (SpoolUnavailable, psycopg.Error) as exc:
            # Not only an outage: a user without CREATE rights, a database that is missing.
            error = (
                exc
                if isinstance(exc, SpoolUnavailable)
                else SpoolUnavailable(f"PostgreSQL spool {self.url}: {self._reason(exc)}")
            )
            if self.fallback_path is None:
                raise error from None
            self._went_down(error)
        if self.fallback_path is not None and self.fallback_path.exists():
            self._open_fallback()  # records an earlier outage left go to PostgreSQL first

    def __repr__(self) -> str:
        return f"PostgresSpool({str(self.url)!r})"

    # ------------------------------------------------------------------ plumbing

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        if self._schema_ready:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS paygent_schema_version ("
                " version integer PRIMARY KEY, applied double precision NOT NULL,"
                " applied_by text NOT NULL)"
            )
            row = conn.execute("SELECT max(version) FROM paygent_schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise SpoolUnavailable(
                    f"the spool schema in {self.url} is version {current}, newer than this "
                    f"paygent-otel understands ({SCHEMA_VERSION}): upgrade paygent-otel"
                )
            for version, sql in _MIGRATIONS:
                if version > current:
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO paygent_schema_version VALUES (%s, %s, %s)",
                        (version, time.time(), self._owner),
                    )
                    _logger.info("spool %s: schema migrated to version %d", self.url, version)
        self._schema_ready = True

    def _reason(self, exc: BaseException) -> str:
        return redact(_describe(exc), self.url.dsn)

    def _went_down(self, exc: BaseException) -> None:
        # A server that drops packets costs a whole connect timeout per try: try less often.
        self._pause = (
            min(self._pause * 2, OUTAGE_PAUSE_MAX_SECONDS)
            if self._outage
            else (OUTAGE_PAUSE_SECONDS)
        )
        self._down_until = time.monotonic() + self._pause
        reason = self._reason(exc)
        if self._outage is None:
            where = (
                f"records go to the local fallback {self.fallback_path} and move to PostgreSQL "
                "once it answers"
                if self.fallback_path is not None
                else "nothing can be stored"
            )
            _logger.error("PostgreSQL spool %s is unreachable (%s); %s", self.url, reason, where)
        self._outage = reason

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection with the schema in place (also for the bridge's cumulative
        state); :class:`SpoolUnavailable` during an outage."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._owner = _owner_token()  # a forked child holds no lease of its parent's
        if time.monotonic() < self._down_until:
            raise SpoolUnavailable(f"PostgreSQL spool {self.url} is unreachable: {self._outage}")
        try:
            with self.pool.connection() as conn:
                self._ensure_schema(conn)
                yield conn
        except SpoolUnavailable as exc:
            self._went_down(exc)
            raise
        except psycopg.OperationalError as exc:
            # A dropped connection or a cancelled statement: the server is gone or stuck.
            self._went_down(exc)
            raise SpoolUnavailable(f"PostgreSQL spool {self.url}: {self._reason(exc)}") from None
        if self._outage is not None:
            _logger.warning("PostgreSQL spool %s answers again", self.url)
            self._outage = None

    def _open_fallback(self) -> SqliteSpool:
        with self._fallback_lock:
            if self._fallback is None:
                assert self.fallback_path is not None
                self._fallback = SqliteSpool(self.fallback_path, max_bytes=self.max_bytes)
            return self._fallback

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """Renew this process's leases: only a replica that stopped lets them expire."""
        now = time.time()
        if now - self._last_beat < self.lease_seconds / 4:
            return
        self._last_beat = now
        conn.execute(
            "UPDATE paygent_pending SET lease_until = %s WHERE lease_owner = %s",
            (now + self.lease_seconds, self._owner),
        )

    def _housekeeping(self) -> None:
        """Prune old keys and move the fallback's records in, each when it is time."""
        now = time.time()
        if now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            self.prune_delivered(now)
        if self.fallback_path is None or now - self._last_drain < FALLBACK_DRAIN_SECONDS:
            return
        self._last_drain = now
        fallback = self._fallback
        if fallback is not None and (fallback.pending() or fallback.dead_letter_counts()):
            moved = move_sqlite_records(fallback.path, self)
            if moved.pending or moved.dead_letters or moved.duplicates:
                _logger.warning(
                    "PostgreSQL spool %s: moved %d records and %d dead letters in from the "
                    "fallback %s (%d were already there)",
                    self.url,
                    moved.pending,
                    moved.dead_letters,
                    self.fallback_path,
                    moved.duplicates,
                )

    def size_bytes(self) -> int:
        """Bytes the spool's tables take (with indexes and TOAST); cached for a second."""
        at, size = self._size_cache
        if time.monotonic() - at < 1.0:
            return size
        with self.connection() as conn:
            row = conn.execute(
                "SELECT " + " + ".join(f"pg_total_relation_size('{t}')" for t in _TABLES)
            ).fetchone()
        size = int(row[0]) if row else 0
        self._size_cache = (time.monotonic(), size)
        return size

    # ------------------------------------------------------------------ producer side

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Commit valid records (each key once, ever, across every replica)."""
        if not records:
            return AddResult()
        unique = {r.idempotency_key: r for r in records}
        try:
            if self.size_bytes() >= self.max_bytes:
                return AddResult(refused=len(records))
            now = time.time()
            conflicts = self._conflicts(list(unique.values()))
            for conflict in conflicts:
                unique.pop(conflict.idempotency_key, None)
            accepted = self._insert_new(
                "paygent_pending",
                _ADD_COLUMNS,
                [
                    (
                        r.idempotency_key,
                        dest,
                        json.dumps(r.payload, separators=(",", ":"), allow_nan=False).encode(),
                        r.origin,
                        now,
                        now,
                    )
                    for r in unique.values()
                ],
            )
        except SpoolUnavailable:
            if self.fallback_path is None:
                raise
            return self._open_fallback().add(dest, records)
        duplicates = len(records) - accepted - len(conflicts)
        return AddResult(accepted=accepted, duplicates=duplicates, conflicts=tuple(conflicts))

    def _conflicts(self, records: Sequence[UsageRecord]) -> list[Rejection]:
        """Records whose ref (span, log record, ``paygent.usage.id``) already holds another
        key, so different usage: refused, never stored under a second key. (Two replicas
        that take the same ref with different usage in the same instant can both store it:
        the window is one statement.)"""
        with_ref = [r for r in records if r.ref]
        if not with_ref:
            return []
        prefixes = [r.ref_key for r in with_ref]
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT p.prefix, k.key FROM unnest(%s::text[]) AS p(prefix)"
                ' JOIN paygent_keys AS k ON k.key COLLATE "C" >= p.prefix'
                " AND k.key COLLATE \"C\" < p.prefix || 'g'",
                [prefixes],
            ).fetchall()
        found: dict[str, list[str]] = {}
        for prefix, key in rows:
            found.setdefault(prefix, []).append(key)
        return [
            conflict_rejection(r, "delivered")
            for r in with_ref
            if found.get(r.ref_key)
            and _held([("keys", k) for k in found[r.ref_key]], r) != "duplicate"
        ]

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records (their attributes) as dead letters with status ``invalid``."""
        if not rejections:
            return
        now = time.time()
        unique = {r.idempotency_key: r for r in rejections}
        try:
            self._insert_new(
                "paygent_dead",
                _REJECTED_COLUMNS,
                [rejected_row(r, now) for r in unique.values()],
            )
        except SpoolUnavailable:
            if self.fallback_path is None:
                raise
            self._open_fallback().add_rejected(rejections)

    def _insert_new(
        self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[tuple[Any, ...]]
    ) -> int:
        """Insert the ``rows`` whose key is new to ``paygent_keys`` (claiming the key in the
        same statement); how many were new. ``columns``: (name, PostgreSQL type), key first."""
        if not rows:
            return 0
        names = ", ".join(name for name, _ in columns)
        arrays = ", ".join(f"%s::{kind}[]" for _, kind in columns)
        with self.connection() as conn:
            cursor = conn.execute(
                f"WITH incoming AS (SELECT * FROM unnest({arrays}) AS t({names})),"
                " fresh AS (INSERT INTO paygent_keys (key) SELECT key FROM incoming"
                " ON CONFLICT (key) DO NOTHING RETURNING key)"
                f" INSERT INTO {table} ({names}) SELECT {names} FROM incoming JOIN fresh"
                " USING (key)",
                [list(column) for column in zip(*rows, strict=True)],
            )
            return max(cursor.rowcount, 0)

    def import_records(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert pending records moved from a SQLite spool, attempts and schedule kept.

        ``rows``: (key, dest, body, origin, created, next_attempt, attempts, last_error).
        Returns how many were new (the others' keys were already known here).
        """
        return self._insert_new("paygent_pending", _IMPORT_COLUMNS, rows)

    def import_dead_letters(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert dead letters moved from a SQLite spool; returns how many were new.

        ``rows``: (key, dest, body, origin, created, died, status, reason, attempts).
        """
        return self._insert_new("paygent_dead", _DEAD_COLUMNS, rows)

    # ------------------------------------------------------------------ worker side

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Reserve up to ``limit`` due records nobody holds (or whose holder stopped)."""
        if limit <= 0:
            return []
        self._housekeeping()
        with self.connection() as conn:
            self._beat(conn)
            rows = conn.execute(
                "UPDATE paygent_pending p SET lease_owner = %s, lease_until = %s FROM ("
                " SELECT id FROM paygent_pending WHERE dest = %s AND next_attempt <= %s"
                " AND (lease_until IS NULL OR lease_until < %s) ORDER BY next_attempt LIMIT %s"
                " FOR UPDATE SKIP LOCKED) due WHERE p.id = due.id"
                " RETURNING p.id, p.key, p.body, p.attempts, p.created, p.origin",
                (self._owner, now + self.lease_seconds, dest, now, now, limit),
            ).fetchall()
        return [SpooledItem(i, k, bytes(b), a, c, o) for i, k, b, a, c, o in rows]

    def next_due(self, dest: str) -> float | None:
        """Earliest next-attempt time of a record nobody holds."""
        with self.connection() as conn:
            self._beat(conn)
            row = conn.execute(
                "SELECT min(next_attempt) FROM paygent_pending WHERE dest = %s"
                " AND (lease_until IS NULL OR lease_until < %s)",
                (dest, time.time()),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Delete delivered records; their keys stay (marked delivered) for the window."""
        if not rowids:
            return
        with self.connection() as conn, conn.transaction():
            self._beat(conn)  # a worker whose every slot is busy still says it lives
            conn.execute("DELETE FROM paygent_pending WHERE id = ANY(%s)", (list(rowids),))
            conn.execute(
                "UPDATE paygent_keys SET delivered = %s WHERE key = ANY(%s)", (now, list(keys))
            )

    def prune_delivered(self, now: float) -> None:
        """Forget keys delivered before the retention window."""
        with self.connection() as conn:
            conn.execute(
                "DELETE FROM paygent_keys WHERE delivered < %s", (now - DELIVERED_KEY_RETENTION,)
            )

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Count a failed attempt and release the lease, for records this worker holds."""
        if not items:
            return
        with self.connection() as conn:
            conn.execute(
                "UPDATE paygent_pending p SET attempts = p.attempts + 1, next_attempt = u.due,"
                " last_error = u.error, lease_owner = NULL, lease_until = NULL"
                " FROM unnest(%s::bigint[], %s::float8[], %s::text[]) AS u(id, due, error)"
                " WHERE p.id = u.id AND p.lease_owner = %s",
                (*_columns(items), self._owner),
            )

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Move records this worker holds to the dead letters, with status and reason."""
        if not items:
            return
        with self.connection() as conn:
            conn.execute(
                "WITH moved AS (DELETE FROM paygent_pending p"
                " USING unnest(%s::bigint[], %s::text[], %s::text[]) AS u(id, status, reason)"
                " WHERE p.id = u.id AND p.lease_owner = %s"
                " RETURNING p.key, p.dest, p.body, p.origin, p.created, p.attempts, u.status,"
                " u.reason)"
                " INSERT INTO paygent_dead (key, dest, body, origin, created, died, attempts,"
                " status, reason) SELECT key, dest, body, origin, created, %s, attempts + 1,"
                " status, reason FROM moved ON CONFLICT (key) DO NOTHING",
                (*_columns(items), self._owner, now),
            )

    def release(self) -> None:
        """Hand this process's leases back (shutdown); during an outage they expire instead."""
        with contextlib.suppress(SpoolUnavailable), self.connection() as conn:
            conn.execute(
                "UPDATE paygent_pending SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = %s",
                (self._owner,),
            )

    # ------------------------------------------------------------------ inspection

    def pending(self, dest: str | None = None) -> int:
        """Records waiting, the fallback's included. Never raises: during an outage, the
        last count PostgreSQL gave plus the fallback's."""
        local = self._fallback.pending(dest) if self._fallback is not None else 0
        try:
            with self.connection() as conn:
                if dest is None:
                    row = conn.execute("SELECT count(*) FROM paygent_pending").fetchone()
                else:
                    row = conn.execute(
                        "SELECT count(*) FROM paygent_pending WHERE dest = %s", (dest,)
                    ).fetchone()
            self._last_pending = int(row[0]) if row else 0
        except SpoolUnavailable:
            pass
        return self._last_pending + local

    def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are pending, dead, or delivered within the retention window."""
        found: set[str] = set()
        with self.connection() as conn:
            for start in range(0, len(keys), _BATCH):
                rows = conn.execute(
                    "SELECT key FROM paygent_keys WHERE key = ANY(%s)",
                    (list(keys[start : start + _BATCH]),),
                )
                found.update(key for (key,) in rows)
        return found

    def stats(self) -> SpoolStats:
        """Counts for ``spool status`` and the self-metrics, the fallback's included. With a
        fallback it never raises: during an outage, the last counts PostgreSQL gave."""
        now = time.time()
        try:
            with self.connection() as conn:
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE lease_until >= %s), min(created),"
                    " (SELECT count(*) FROM paygent_dead) FROM paygent_pending",
                    (now,),
                ).fetchone()
            assert row is not None
            self._last_stats = SpoolStats.at(now, row[:3], row[3], self.size_bytes())
        except SpoolUnavailable:
            if self.fallback_path is None:
                raise
        shared, fallback = self._last_stats, self._fallback
        if fallback is None:
            return shared
        local = fallback.stats()
        ages = [a for a in (shared.oldest_pending_age, local.oldest_pending_age) if a is not None]
        return SpoolStats(
            pending=shared.pending + local.pending,
            in_flight=shared.in_flight,
            dead_letters=shared.dead_letters + local.dead_letters,
            oldest_pending_age=max(ages, default=None),
            size_bytes=shared.size_bytes + local.size_bytes,
        )

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for (status output, ``spool retarget``)."""
        with self.connection() as conn:
            conn.execute(
                "INSERT INTO paygent_endpoints (dest, url) VALUES (%s, %s)"
                " ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
                (dest, url),
            )

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination, with the last error and next attempt."""
        now = time.time()
        with self.connection() as conn:
            urls = dict(conn.execute("SELECT dest, url FROM paygent_endpoints").fetchall())
            dead = dict(
                conn.execute(
                    "SELECT dest, count(*) FROM paygent_dead WHERE dest != '' GROUP BY dest"
                ).fetchall()
            )
            pending = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT dest, count(*), count(*) FILTER (WHERE lease_until >= %s),"
                    " min(created), min(next_attempt), (array_agg(last_error ORDER BY attempts"
                    " DESC, id DESC) FILTER (WHERE last_error IS NOT NULL))[1]"
                    " FROM paygent_pending GROUP BY dest",
                    (now,),
                ).fetchall()
            }
        return endpoint_statuses(urls, pending, dead, now)

    def retarget(self, from_dest: str, to_dest: str, to_url: str) -> tuple[int, int]:
        """File the pending records and dead letters of ``from_dest`` under ``to_dest``;
        pending ones fall due now. Returns (pending moved, dead letters moved)."""
        with self.connection() as conn:
            conn.execute(
                "INSERT INTO paygent_endpoints (dest, url) VALUES (%s, %s)"
                " ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
                (to_dest, to_url),
            )
            moved_pending = conn.execute(
                "UPDATE paygent_pending SET dest = %s, next_attempt = least(next_attempt, %s)"
                " WHERE dest = %s",
                (to_dest, time.time(), from_dest),
            ).rowcount
            moved_dead = conn.execute(
                "UPDATE paygent_dead SET dest = %s WHERE dest = %s", (to_dest, from_dest)
            ).rowcount
        return max(moved_pending, 0), max(moved_dead, 0)

    def key_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Where each of ``keys`` is: ``pending``, ``delivered``, ``dead`` (absent: unknown)."""
        states: dict[str, str] = {}
        wanted = list(keys)
        with self.connection() as conn:
            for sql, state in (
                ("SELECT key FROM paygent_keys WHERE key = ANY(%s) AND delivered IS NOT NULL",
                 "delivered"),
                ("SELECT key FROM paygent_dead WHERE key = ANY(%s)", "dead"),
                ("SELECT key FROM paygent_pending WHERE key = ANY(%s)", "pending"),
            ):  # fmt: skip
                states.update((key, state) for (key,) in conn.execute(sql, (wanted,)))
        return states

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters there are of each status."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM paygent_dead GROUP BY status ORDER BY status"
            ).fetchall()
        return {status: int(n) for status, n in rows}

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first, optionally only those with one status."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT id, key, status, reason, died, attempts, origin, body FROM paygent_dead"
                " WHERE %s::text IS NULL OR status = %s ORDER BY died DESC, id DESC LIMIT %s",
                (status, status, limit),
            ).fetchall()
        return [
            DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]).decode()) for r in rows
        ]

    def retry_dead(self, status: str | None = None, keys: Iterable[str] = ()) -> int:
        """Move dead letters back to pending (not invalid ones: they have no payload)."""
        key_list = list(keys)
        with self.connection() as conn:
            cursor = conn.execute(
                "WITH moved AS (DELETE FROM paygent_dead WHERE status != 'invalid'"
                " AND (%s::text IS NULL OR status = %s) AND (%s OR key = ANY(%s))"
                " RETURNING key, dest, body, origin, created)"
                " INSERT INTO paygent_pending (key, dest, body, origin, created, next_attempt)"
                " SELECT key, dest, body, origin, created, %s FROM moved"
                " ON CONFLICT (key) DO NOTHING",
                (status, status, not key_list, key_list, time.time()),
            )
            return max(cursor.rowcount, 0)

    def purge(self, what: str) -> int:
        """Delete ``dead`` letters or ``pending`` records (and their keys); returns how many."""
        table = {"dead": "paygent_dead", "pending": "paygent_pending"}[what]
        with self.connection() as conn:
            row = conn.execute(
                f"WITH gone AS (DELETE FROM {table} RETURNING key),"
                " forgotten AS (DELETE FROM paygent_keys WHERE key IN (SELECT key FROM gone))"
                " SELECT count(*) FROM gone"
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Release leases and close the connections and the fallback file."""
        try:
            self.release()
        finally:
            self.pool.close()
            if self._fallback is not None:
                self._fallback.close()


def move_sqlite_records(
    path: str | os.PathLike[str], target: PostgresSpool, *, batch: int = _BATCH
) -> MoveResult:
    """Move the pending records and dead letters of a SQLite spool file into PostgreSQL.

    Records leased by a live worker are left where they are (run it again once that worker
    stopped). Each batch is committed to PostgreSQL, then deleted from the file: a crash in
    between leaves copies in both, and the next run finds their keys in PostgreSQL and only
    deletes them. Keys PostgreSQL already knows are counted as duplicates, never sent twice.
    """
    conn = sqlite3.connect(os.fspath(path), timeout=30.0, isolation_level=None)
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        if not {"pending", "dead"} <= tables:
            raise ValueError(f"{path} is not a paygent-otel spool (no pending/dead tables)")
        pending, seen_pending = _move_batches(
            conn,
            "pending",
            "key, dest, body, origin, created, next_attempt, attempts, last_error",
            "lease_until IS NULL OR lease_until < ?",
            (time.time(),),
            target.import_records,
            batch,
        )
        dead, seen_dead = _move_batches(
            conn,
            "dead",
            "key, dest, body, origin, created, died, status, reason, attempts",
            "1",
            (),
            target.import_dead_letters,
            batch,
        )
    finally:
        conn.close()
    return MoveResult(pending, dead, seen_pending - pending + seen_dead - dead)


def _move_batches(
    conn: sqlite3.Connection,
    table: str,
    columns: str,
    where: str,
    params: tuple[Any, ...],
    insert: Callable[[Sequence[tuple[Any, ...]]], int],
    batch: int,
) -> tuple[int, int]:
    """Insert ``table``'s rows batch by batch, deleting each batch once inserted; (new, seen)."""
    new = seen = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                f"SELECT id, {columns} FROM {table} WHERE {where} ORDER BY id LIMIT ?",
                (*params, batch),
            ).fetchall()
            new += insert([row[1:] for row in rows])
            conn.executemany(f"DELETE FROM {table} WHERE id = ?", [(row[0],) for row in rows])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        seen += len(rows)
        if len(rows) < batch:
            return new, seen


def open_postgres_spool(url: str, *, max_bytes: int) -> PostgresSpool:
    """The spool the exporters and the bridge use: with the local fallback for outages."""
    fallback = read_setting(OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH)
    return PostgresSpool(
        url, max_bytes=max_bytes, fallback_path=fallback or default_fallback_path()
    )
