"""Where usage records wait for delivery: a durable SQLite spool, or an in-memory queue.

The durable spool commits a record (idempotency key + JSON body) before the exporter's
``export()`` returns, leases it to one delivery worker at a time (several processes may
share the file: gunicorn workers, forked children), deletes it only after a 2xx, and moves
definitive rejections to a dead-letter table a person can inspect and replay
(``paygent-otel spool``). Keys of delivered records are kept for a window so a record
handed over twice (a Collector retrying an OTLP request) is not sent twice.

A record's key starts with a digest of its *ref* (what it is: its telemetry ids or its
``paygent.usage.id``) and ends with a digest of its usage, so the key index finds the
records of one ref. A record whose ref is pending or was delivered is a duplicate when the
usage is the same (the same key), and is refused as a conflict (kept as a dead letter with
status ``conflict``) when it differs: one ref is never billed twice. Dead letters hold back
only an identical record, and an ``invalid`` one nothing: a corrected record has another
key and is billed. Keys paygent-otel 0.1.0 gave (its telemetry ref alone) are recognised.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import _journal
from ._forking import register_at_fork_once
from ._mapping import Rejection, UsageRecord, conflict_rejection
from ._spool_url import SpoolUrl, is_pg_url

__all__ = [
    "AddResult",
    "DeadLetter",
    "EndpointStatus",
    "MemorySpool",
    "Spool",
    "SpoolStats",
    "SpooledItem",
    "SqliteSpool",
    "check_spool_file",
    "destination_id",
    "open_spool",
]

DELIVERED_KEY_RETENTION = 24 * 3600.0
"""Seconds the keys of delivered records are kept to suppress a second hand-over."""
LEASE_SECONDS = 60.0
"""How long a leased record is reserved for one worker; a dead owner's lease is
reclaimed at once when the owner is on this host, else when it expires."""
_BODY_EXCERPT = 500


def destination_id(endpoint: str) -> str:
    """Which Paygent endpoint a record is for.

    Not the API key: records spooled before a key was configured, or under a key since
    rotated, belong to the same account and must still be sent. One spool file therefore
    serves one Paygent account (docs/delivery.md).
    """
    import hashlib

    return hashlib.sha256(endpoint.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SpooledItem:
    """A leased record."""

    rowid: int
    key: str
    body: bytes
    attempts: int
    created: float
    origin: str


@dataclass(frozen=True, slots=True)
class AddResult:
    """What :meth:`Spool.add` did with a batch."""

    accepted: int = 0
    duplicates: int = 0
    """Already pending, delivered (within the retention window) or dead-lettered."""
    refused: int = 0
    """Not stored: the spool is full. Counted and logged by the caller."""
    conflicts: tuple[Rejection, ...] = ()
    """Not stored: a record with the same ref and different usage is pending or was
    delivered. Kept as dead letters (status ``conflict``); logged by the caller."""


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot for ``paygent-otel spool status`` and the self-metrics."""

    pending: int
    in_flight: int
    dead_letters: int
    oldest_pending_age: float | None
    size_bytes: int

    @classmethod
    def at(
        cls, now: float, counts: Sequence[Any], dead_letters: int, size_bytes: int
    ) -> SpoolStats:
        """The snapshot at ``now`` from (pending, in flight, oldest ``created`` or None)."""
        pending, in_flight, oldest = counts
        return cls(
            pending=int(pending),
            in_flight=int(in_flight),
            dead_letters=int(dead_letters),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            size_bytes=size_bytes,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record Paygent refused (or that broke the convention), kept for a person."""

    rowid: int
    key: str
    status: str
    reason: str
    died: float
    attempts: int
    origin: str
    body: str


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """What the spool holds for one destination (``spool status``, the exit warning)."""

    dest: str
    url: str | None
    """The endpoint's URL (None for records spooled before URLs were remembered)."""
    pending: int
    in_flight: int
    dead_letters: int
    oldest_pending_age: float | None
    next_attempt: float | None
    """Earliest next-attempt time (Unix seconds) of a pending record."""
    last_error: str | None
    """The most recent failure of a pending record."""


class Spool(Protocol):
    """The seam between ``export()`` and HTTP delivery."""

    durable: bool

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Store valid records that are neither duplicates nor conflicts; committed when
        this returns."""
        ...

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records as dead letters (status ``invalid``)."""
        ...

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Reserve up to ``limit`` due records for this worker."""
        ...

    def next_due(self, dest: str) -> float | None:
        """When the earliest unleased pending record becomes due, if any."""
        ...

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Forget delivered records (keeping their keys for the retention window)."""
        ...

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """(rowid, next attempt time, last error): count an attempt, release the lease."""
        ...

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """(rowid, status, reason): move to the dead-letter table."""
        ...

    def release(self) -> None:
        """Release this process's leases (shutdown), so another worker can take them."""
        ...

    def pending(self, dest: str | None = None) -> int:
        """Records waiting (leased or not)."""
        ...

    def stats(self) -> SpoolStats:
        """Counts for status output and self-metrics."""
        ...

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for."""
        ...

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination."""
        ...

    def prune_delivered(self, now: float) -> None:
        """Forget delivered keys past the retention window."""
        ...

    def close(self) -> None:
        """Release leases and close files."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    dest TEXT NOT NULL,
    body BLOB NOT NULL,
    origin TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (dest, next_attempt);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    dest TEXT NOT NULL,
    body BLOB NOT NULL,
    origin TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    died REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_at ON delivered (at);
CREATE TABLE IF NOT EXISTS endpoints (
    dest TEXT PRIMARY KEY,
    url TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""


def _old_keys(record: UsageRecord) -> tuple[str, ...]:
    """Keys paygent-otel 0.1.0 may have given the record (its telemetry ref alone, aliases)."""
    return (record.ref, *record.aliases) if record.ref else ()


def _ref_range(record: UsageRecord) -> tuple[str, str]:
    """The keys of the records of ``record``'s ref: ``[start, end)``, compared as SQLite
    compares text. A record without a ref is its key alone."""
    start = record.ref_key
    return start, start + (chr(0x10FFFF) if record.ref else "\x00")


def _held(found: Iterable[tuple[str, str]], record: UsageRecord) -> str | None:
    """What holds ``record`` back, from the (table, key) rows of its ref or its old keys:
    ``"duplicate"`` (its own key, or a 0.1.0 key: the same usage as far as 0.1.0 could
    tell), else the table of a record of its ref with different usage (a conflict), else
    None (nothing)."""
    other = None
    for table, key in found:
        if key == record.idempotency_key or key in record.aliases or key == record.ref:
            return "duplicate"
        other = other or table
    return other


_nonces: dict[int, str] = {}
_live_spools: weakref.WeakSet[SqliteSpool | MemorySpool] = weakref.WeakSet()
_held_across_fork: list[SqliteSpool | MemorySpool] = []


def endpoint_statuses(
    urls: dict[str, str],
    pending: dict[str, tuple[Any, ...]],
    dead: dict[str, int],
    now: float,
) -> list[EndpointStatus]:
    """Per-destination status from the spool's counts: ``pending`` maps a destination to
    (count, in flight, oldest created, earliest next attempt, last error)."""
    out = []
    for dest in sorted(pending.keys() | dead.keys(), key=lambda d: urls.get(d) or d):
        count, in_flight, oldest, due, error = pending.get(dest, (0, 0, None, None, None))
        out.append(
            EndpointStatus(
                dest,
                urls.get(dest),
                int(count),
                int(in_flight),
                int(dead.get(dest, 0)),
                None if oldest is None else max(0.0, now - oldest),
                due,
                error,
            )
        )
    return out


def rejected_row(r: Rejection, now: float) -> tuple[Any, ...]:
    """An invalid record as a dead letter: (key, dest, body, origin, created, died, status,
    reason); the body is its attributes, as JSON."""
    body = json.dumps(r.attributes, default=repr, separators=(",", ":")).encode()
    return (r.idempotency_key, "", body, r.origin, now, now, r.reason.value, r.message)


def _process_nonce() -> str:
    """Tells this process from an earlier one given the same pid (a restarted container's 1)."""
    return _nonces.setdefault(os.getpid(), uuid.uuid4().hex[:8])


def _before_fork() -> None:
    # Hold every spool's lock across fork(), so no thread is inside SQLite (holding its
    # locks and mutexes, or half-way through a transaction) in the child's copy.
    for spool in list(_live_spools):
        spool._lock.acquire()
        _held_across_fork.append(spool)


def _after_fork_in_parent() -> None:
    while _held_across_fork:
        _held_across_fork.pop()._lock.release()


def _after_fork_in_child() -> None:
    _held_across_fork.clear()
    for spool in list(_live_spools):
        spool._after_fork()


def _track(spool: SqliteSpool | MemorySpool) -> None:
    """Hold ``spool``'s lock across fork() and reset it in the child (hooks set once)."""
    _live_spools.add(spool)
    register_at_fork_once(
        "spool",
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _owner_token() -> str:
    """``host:pid:process nonce:instance``: who holds a lease, and whether it still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_nonce()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _insert_sql(old_keys: int) -> str:
    """Insert one record unless a record of its ref (a key in ``[start, end)``) is pending
    or delivered, or one of its ``old_keys`` is, or Paygent refused its key (a dead letter
    that is not invalid or a conflict)."""
    marks = ",".join("?" * old_keys)
    held_by_old = (
        f"AND NOT EXISTS (SELECT 1 FROM pending WHERE key IN ({marks})) "
        f"AND NOT EXISTS (SELECT 1 FROM delivered WHERE key IN ({marks})) "
        if old_keys
        else ""
    )
    return (
        "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
        "SELECT ?, ?, ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM pending WHERE key >= ? AND key < ?) "
        "AND NOT EXISTS (SELECT 1 FROM delivered WHERE key >= ? AND key < ?) "
        + held_by_old
        + "AND NOT EXISTS (SELECT 1 FROM dead WHERE key = ? "
        "AND status NOT IN ('invalid', 'conflict')) "
        "ON CONFLICT (key) DO NOTHING"
    )


class SqliteSpool:
    """The durable spool: one SQLite file in WAL mode, safe across threads and processes."""

    durable = True

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._owner = ""
        folder = self.path.parent
        # Billing data and the dead letters' bodies are private: the folder is 0700.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files the
        # database file's mode, and they hold the same payloads.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # a file an earlier version created with the umask's mode
        self._connection()  # fail at construction, not at the first export
        _track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and our own connection at the next use.

        The inherited connection is idle (the lock was held across fork) and is closed
        here, which only cleans up this process's copy of SQLite's state: POSIX locks
        are not inherited, so the parent's locks and its WAL are not touched.
        """
        self._lock = threading.Lock()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _connection(self) -> sqlite3.Connection:
        # After fork() the parent's connection must not be used: open our own.
        if self._pid != os.getpid() or self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed batch survives power loss, not only a process crash.
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                _journal.create(conn)
                # A write now, so a read-only file or a full disk fails here, at start.
                conn.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('opened', ?)",
                    (time.time(),),
                )
                self._owner = _owner_token()
                self._reclaim_orphans(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._pid = os.getpid()
        return self._conn

    def _reclaim_orphans(self, conn: sqlite3.Connection) -> None:
        """Release leases of processes on this host that no longer exist (crash recovery)."""
        host = socket.gethostname()
        pid = os.getpid()
        owners = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT lease_owner FROM pending WHERE lease_owner IS NOT NULL"
            )
        ]
        dead = []
        for owner in owners:
            parts = owner.split(":")
            if parts[0] != host or len(parts) < 2 or not parts[1].isdigit():
                continue
            owner_pid = int(parts[1])
            # Same pid, other nonce: an earlier process whose pid this one was given.
            reused = owner_pid == pid and len(parts) == 4 and parts[2] != _process_nonce()
            if reused or (owner_pid != pid and not _pid_alive(owner_pid)):
                dead.append(owner)
        for owner in dead:
            conn.execute(
                "UPDATE pending SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (owner,),
            )

    def _write(self, fn: Any, *args: Any, synced: bool = True) -> Any:
        """Run ``fn(conn, *args)`` in one transaction.

        ``synced=False`` commits without an fsync (``synchronous=NORMAL``) for the worker's
        bookkeeping of records already committed: a lease or a delivery that a power loss
        (not a process crash) undoes only means the record is leased or sent again, with
        the same idempotency key. The next synced commit makes it durable too. An fsync per
        lease and per settlement cost ~200 us CPU and ~2.4 ms of the worker's event loop
        each (``bench/README.md``).
        """
        with self._lock:
            conn = self._connection()
            if not synced:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn, *args)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                if not synced:
                    conn.execute("PRAGMA synchronous=FULL")
            return result

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def size_bytes(self) -> int:
        """Bytes in use by the database (free pages excluded)."""
        with self._lock:
            conn = self._connection()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            used = (
                conn.execute("PRAGMA page_count").fetchone()[0]
                - conn.execute("PRAGMA freelist_count").fetchone()[0]
            )
            return int(used * page_size)

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Commit valid records; refuse them all if the size cap is reached.

        A record whose ref (or an alias) is pending or delivered is a duplicate, or a
        conflict if its usage differs; a dead letter of the same key (not ``invalid`` or
        ``conflict``) holds it back as a duplicate too.
        """
        if not records:
            return AddResult()
        now = time.time()
        if self.size_bytes() >= self.max_bytes:
            refused = [(_journal.quantities_of(r.payload), now) for r in records]
            for outcome in ("recorded", "refused"):
                self._write(_journal.journal, outcome, refused)
            return AddResult(refused=len(records))
        bodies = [
            json.dumps(r.payload, separators=(",", ":"), allow_nan=False).encode() for r in records
        ]
        rows: dict[int, list[tuple[Any, ...]]] = {}
        for record, body in zip(records, bodies, strict=True):
            old = _old_keys(record)
            rows.setdefault(len(old), []).append(
                (record.idempotency_key, dest, body, record.origin, now, now,
                 *_ref_range(record), *_ref_range(record), *old, *old, record.idempotency_key)
            )  # fmt: skip

        def insert(conn: sqlite3.Connection) -> AddResult:
            last_id = conn.execute("SELECT coalesce(max(id), 0) FROM pending").fetchone()[0]
            before = conn.total_changes
            for count, group in rows.items():
                conn.executemany(_insert_sql(count), group)
            inserted = conn.total_changes - before
            entries = [(_journal.quantities_of(r.payload), now) for r in records]
            _journal.journal(conn, "recorded", entries)
            if inserted == len(records):
                return AddResult(accepted=len(records))
            # Some were held back: tell duplicates from conflicts, one by one.
            new = {k for (k,) in conn.execute("SELECT key FROM pending WHERE id > ?", (last_id,))}
            accepted = 0
            conflicts: list[Rejection] = []
            duplicates: list[tuple[_journal.Quantities, float]] = []
            dead: list[tuple[_journal.Quantities, float]] = []
            for record, body, entry in zip(records, bodies, entries, strict=True):
                if record.idempotency_key in new:
                    new.discard(record.idempotency_key)  # a second copy is a duplicate
                    accepted += 1
                    continue
                old = _old_keys(record)
                marks = ",".join("?" * len(old))
                found = [
                    (table, key)
                    for table in ("pending", "delivered")
                    for (key,) in conn.execute(
                        f"SELECT key FROM {table} WHERE key >= ? AND key < ? OR key IN ({marks})",
                        (*_ref_range(record), *old),
                    )
                ]
                held = _held(found, record)
                if held is None or held == "duplicate":
                    duplicates.append(entry)
                    continue
                conflict = conflict_rejection(record, held)
                conflicts.append(conflict)
                dead.append(entry)
                conn.execute(
                    "INSERT INTO dead (key, dest, body, origin, created, died, status, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'conflict', ?) ON CONFLICT (key) DO NOTHING",
                    (record.idempotency_key, dest, body, record.origin, now, now,
                     conflict.message[:_BODY_EXCERPT]),
                )  # fmt: skip
            _journal.journal(conn, "duplicate", duplicates)
            _journal.journal(conn, "dead", dead)
            return AddResult(accepted, len(duplicates), 0, tuple(conflicts))

        result: AddResult = self._write(insert)
        return result

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records (their attributes) as dead letters with status ``invalid``."""
        if not rejections:
            return
        now = time.time()
        rows = [rejected_row(r, now) for r in rejections]

        def insert(conn: sqlite3.Connection) -> None:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO dead (key, dest, body, origin, created, died, status, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                rows,
            )
            if conn.total_changes != before:  # not a second hand-over of the same records
                entries = [(_journal.rejected_quantities(r.attributes), now) for r in rejections]
                _journal.journal(conn, "recorded", entries)
                _journal.journal(conn, "dead", entries)

        self._write(insert)

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Reserve up to ``limit`` due, unleased records (or leases that expired)."""
        if limit <= 0:
            return []

        def take(conn: sqlite3.Connection) -> list[SpooledItem]:
            rows = conn.execute(
                "UPDATE pending SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM pending WHERE dest = ? AND next_attempt <= ?"
                " AND (lease_until IS NULL OR lease_until < ?)"
                " ORDER BY next_attempt LIMIT ?)"
                " RETURNING id, key, body, attempts, created, origin",
                (self._owner, now + LEASE_SECONDS, dest, now, now, limit),
            ).fetchall()
            return [SpooledItem(*row) for row in rows]

        items: list[SpooledItem] = self._write(take, synced=False)
        return items

    def next_due(self, dest: str) -> float | None:
        """Earliest next-attempt time of an unleased pending record."""
        now = time.time()
        row = self._read(
            "SELECT min(next_attempt) FROM pending WHERE dest = ? "
            "AND (lease_until IS NULL OR lease_until < ?)",
            (dest, now),
        )
        value = row[0][0] if row else None
        return float(value) if value is not None else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Delete delivered records and remember their keys."""
        if not rowids:
            return

        def done(conn: sqlite3.Connection) -> None:
            marks = ",".join("?" * len(rowids))
            _journal.journal_rows(
                conn,
                "delivered",
                conn.execute(f"SELECT body, created FROM pending WHERE id IN ({marks})", rowids),
            )
            conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in rowids])
            conn.executemany(
                "INSERT OR REPLACE INTO delivered (key, at) VALUES (?, ?)",
                [(k, now) for k in keys],
            )

        self._write(done, synced=False)

    def prune_delivered(self, now: float) -> None:
        """Drop delivered keys older than the retention window, and old journal rows."""

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM delivered WHERE at < ?", (now - DELIVERED_KEY_RETENTION,))
            _journal.prune_journal(conn, now)

        self._write(prune)

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Count a failed attempt and release the lease until the next attempt time.

        Only records this worker still holds: one whose lease expired and went to another
        worker is that worker's to settle (and a repeated call changes nothing).
        """
        if not items:
            return
        self._write(
            lambda conn: conn.executemany(
                "UPDATE pending SET attempts = attempts + 1, next_attempt = ?, last_error = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
                [(when, error[:_BODY_EXCERPT], rowid, self._owner) for rowid, when, error in items],
            ),
            synced=False,
        )

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Move records this worker holds to the dead-letter table with status and reason."""
        if not items:
            return

        def move(conn: sqlite3.Connection) -> None:
            for rowid, status, reason in items:
                _journal.journal_rows(
                    conn,
                    "dead",
                    conn.execute(
                        "SELECT body, created FROM pending WHERE id = ? AND lease_owner = ?",
                        (rowid, self._owner),
                    ),
                )
                conn.execute(
                    "INSERT INTO dead (key, dest, body, origin, created, died, attempts, status,"
                    " reason) SELECT key, dest, body, origin, created, ?, attempts + 1, ?, ?"
                    " FROM pending WHERE id = ? AND lease_owner = ? ON CONFLICT (key) DO NOTHING",
                    (now, status, reason[:_BODY_EXCERPT], rowid, self._owner),
                )
                conn.execute(
                    "DELETE FROM pending WHERE id = ? AND lease_owner = ?", (rowid, self._owner)
                )

        self._write(move)

    def release(self) -> None:
        """Release this process's leases."""
        if self._conn is None or self._pid != os.getpid():
            return
        self._write(
            lambda conn: conn.execute(
                "UPDATE pending SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (self._owner,),
            )
        )

    def pending(self, dest: str | None = None) -> int:
        """Records waiting for delivery."""
        if dest is None:
            rows = self._read("SELECT count(*) FROM pending")
        else:
            rows = self._read("SELECT count(*) FROM pending WHERE dest = ?", (dest,))
        return int(rows[0][0])

    def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are pending, delivered (within the retention window) or dead."""
        return set(self.key_states(keys))

    def stats(self) -> SpoolStats:
        """Counts for ``spool status`` and self-metrics."""
        now = time.time()
        counts = self._read(
            "SELECT count(*), coalesce(sum(lease_until >= ?), 0), min(created) FROM pending",
            (now,),
        )[0]
        dead = self._read("SELECT count(*) FROM dead")[0][0]
        return SpoolStats.at(now, counts, dead, self.size_bytes())

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for (status output, ``spool retarget``)."""
        self._write(
            lambda conn: conn.execute(
                "INSERT INTO endpoints (dest, url) VALUES (?, ?) "
                "ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
                (dest, url),
            ),
            synced=False,
        )

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination, with the last error and next attempt."""
        now = time.time()
        urls = dict(self._read("SELECT dest, url FROM endpoints"))
        dead = dict(self._read("SELECT dest, count(*) FROM dead WHERE dest != '' GROUP BY dest"))
        pending = {
            row[0]: row[1:]
            for row in self._read(
                "SELECT dest, count(*), coalesce(sum(lease_until >= ?), 0), min(created), "
                "min(next_attempt), (SELECT last_error FROM pending AS p WHERE p.dest = "
                "pending.dest AND last_error IS NOT NULL ORDER BY attempts DESC, id DESC "
                "LIMIT 1) FROM pending GROUP BY dest",
                (now,),
            )
        }
        return endpoint_statuses(urls, pending, dead, now)

    def retarget(self, from_dest: str, to_dest: str, to_url: str) -> tuple[int, int]:
        """File the pending records and dead letters of ``from_dest`` under ``to_dest``;
        pending ones fall due now. Returns (pending moved, dead letters moved)."""

        def move(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute(
                "INSERT INTO endpoints (dest, url) VALUES (?, ?) "
                "ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
                (to_dest, to_url),
            )
            before = conn.total_changes
            conn.execute(
                "UPDATE pending SET dest = ?, next_attempt = min(next_attempt, ?) WHERE dest = ?",
                (to_dest, time.time(), from_dest),
            )
            moved_pending = conn.total_changes - before
            conn.execute("UPDATE dead SET dest = ? WHERE dest = ?", (to_dest, from_dest))
            moved_dead = conn.total_changes - before - moved_pending
            from_url = conn.execute(
                "SELECT url FROM endpoints WHERE dest = ?", (from_dest,)
            ).fetchone()
            _journal.audit(
                conn,
                "retarget",
                f"from {from_url[0] if from_url else from_dest} to {to_url}: "
                f"{moved_pending} pending, {moved_dead} dead letters",
                moved_pending + moved_dead,
            )
            return moved_pending, moved_dead

        moved: tuple[int, int] = self._write(move)
        return moved

    def delivered_since(self, since: float) -> int:
        """Records delivered at or after ``since`` (within the delivered-key retention)."""
        return int(self._read("SELECT count(*) FROM delivered WHERE at >= ?", (since,))[0][0])

    def dead_letter_reasons(self, limit: int = 20) -> list[tuple[str, str, int, float]]:
        """(status, reason, count, last death) of the commonest dead-letter reasons."""
        rows = self._read(
            "SELECT status, reason, count(*), max(died) FROM dead GROUP BY status, reason "
            "ORDER BY count(*) DESC, max(died) DESC LIMIT ?",
            (limit,),
        )
        return [(str(s), str(r), int(n), float(t)) for s, r, n, t in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters there are of each status (``400``, ``invalid``, ...)."""
        rows = self._read("SELECT status, count(*) FROM dead GROUP BY status ORDER BY status")
        return {status: int(n) for status, n in rows}

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first, optionally only those with one status."""
        sql = "SELECT id, key, status, reason, died, attempts, origin, body FROM dead"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY died DESC LIMIT ?"
        params.append(limit)
        return [
            DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]).decode())
            for r in self._read(sql, params)
        ]

    def retry_dead(self, status: str | None = None, keys: Iterable[str] = ()) -> int:
        """Move dead letters back to pending (not invalid ones: they have no payload)."""
        key_list = list(keys)

        def move(conn: sqlite3.Connection) -> int:
            where = "status != 'invalid'"
            params: list[Any] = []
            if status is not None:
                where += " AND status = ?"
                params.append(status)
            if key_list:
                where += f" AND key IN ({','.join('?' * len(key_list))})"
                params.extend(key_list)
            now = time.time()
            _journal.journal_rows(
                conn,
                "dead",
                conn.execute(f"SELECT body, created FROM dead WHERE {where}", params),
                sign=-1,
            )
            before = conn.total_changes
            conn.execute(
                "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
                f"SELECT key, dest, body, origin, created, ? FROM dead WHERE {where} "
                "ON CONFLICT (key) DO NOTHING",
                [now, *params],
            )
            moved = conn.total_changes - before
            conn.execute(f"DELETE FROM dead WHERE {where}", params)
            which = f"status {status}" if status is not None else "every status"
            if key_list:
                which += f", keys {', '.join(key_list)}"
            _journal.audit(conn, "retry", f"dead letters back to pending ({which})", moved)
            return moved

        moved: int = self._write(move)
        return moved

    def purge(self, what: str) -> int:
        """Delete ``dead`` letters or ``pending`` records; returns how many."""
        table = {"dead": "dead", "pending": "pending"}[what]

        def delete(conn: sqlite3.Connection) -> int:
            if table == "pending":
                _journal.journal_rows(
                    conn, "purged", conn.execute("SELECT body, created FROM pending")
                )
            before = conn.total_changes
            conn.execute(f"DELETE FROM {table}")
            deleted = conn.total_changes - before
            _journal.audit(conn, "purge", f"deleted every {what} record", deleted)
            return deleted

        deleted: int = self._write(delete)
        return deleted

    def record_audit(self, action: str, detail: str, records: int) -> None:
        """Add an audit line (who, when, what, how many) for a change made to the spool."""
        self._write(_journal.audit, action, detail, records)

    def audit_lines(self, limit: int = 50) -> list[_journal.AuditLine]:
        """The audit lines, newest first."""
        with self._lock:
            return _journal.read_audit(self._connection(), limit)

    def journal(
        self, since: float | None = None, until: float | None = None
    ) -> list[_journal.JournalRow]:
        """Journal rows of ``[since, until)``, then the pending records counted live."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")  # one snapshot: a record moving meanwhile is counted once
            try:
                return _journal.read_journal(conn, since, until) + _journal.read_pending(
                    conn, since, until
                )
            finally:
                conn.execute("COMMIT")

    def key_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Where each of ``keys`` is: ``pending``, ``delivered``, ``dead`` (absent: unknown)."""
        states: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for table in ("delivered", "dead", "pending"):
                rows = self._read(f"SELECT key FROM {table} WHERE key IN ({marks})", chunk)
                states.update((key, table) for (key,) in rows)
        return states

    def close(self) -> None:
        """Release leases and close the connection."""
        try:
            self.release()
        finally:
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():
                    self._conn.close()
                self._conn = None


class MemorySpool:
    """The in-memory queue: same contract, lost on a crash or at the end of the process."""

    durable = False

    def __init__(self, *, max_records: int = 100_000) -> None:
        self.max_records = max_records
        self._lock = threading.Lock()
        self._items: dict[int, tuple[str, str, bytes, str, float, int]] = {}
        self._due: list[tuple[float, int]] = []
        self._leased: set[int] = set()
        self._pending: dict[str, str] = {}
        """The key of each pending record, by :attr:`UsageRecord.ref_key`."""
        self._refs: dict[int, str] = {}
        """The ref key of each pending record, by row id."""
        self._delivered: dict[str, tuple[str, float]] = {}
        """The key and delivery time of each delivered record, by ref key."""
        self._dead: list[DeadLetter] = []
        self._next_id = 0
        _track(self)

    def _after_fork(self) -> None:
        """In a forked child: start empty (the parent delivers its own records, as the
        SDK's batch processor clears its queue in the child), with a fresh lock."""
        self._lock = threading.Lock()
        self._items.clear()
        self._due.clear()
        self._leased.clear()
        self._pending.clear()
        self._refs.clear()

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Queue records, refusing those beyond ``max_records``; duplicates and conflicts
        as :meth:`SqliteSpool.add` tells them."""
        accepted = duplicates = refused = 0
        conflicts: list[Rejection] = []
        now = time.time()
        with self._lock:
            for r in records:
                start = r.ref_key
                found = [("pending", self._pending[start])] if start in self._pending else []
                if start in self._delivered:
                    found.append(("delivered", self._delivered[start][0]))
                held = _held(found, r)
                body = json.dumps(r.payload, separators=(",", ":"), allow_nan=False).encode()
                if held == "duplicate":
                    duplicates += 1
                    continue
                if held is not None:
                    conflict = conflict_rejection(r, held)
                    conflicts.append(conflict)
                    self._dead.append(
                        DeadLetter(
                            0,
                            r.idempotency_key,
                            "conflict",
                            conflict.message,
                            now,
                            0,
                            r.origin,
                            body.decode(),
                        )
                    )
                    continue
                if len(self._items) >= self.max_records:
                    refused += 1
                    continue
                self._next_id += 1
                self._items[self._next_id] = (r.idempotency_key, dest, body, r.origin, now, 0)
                self._pending[start] = r.idempotency_key
                self._refs[self._next_id] = start
                heapq.heappush(self._due, (now, self._next_id))
                accepted += 1
            del self._dead[:-1000]
        return AddResult(accepted, duplicates, refused, tuple(conflicts))

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep the last invalid records in memory for inspection."""
        now = time.time()
        with self._lock:
            for r in rejections:
                self._dead.append(
                    DeadLetter(
                        0,
                        r.idempotency_key,
                        r.reason.value,
                        r.message,
                        now,
                        0,
                        r.origin,
                        json.dumps(r.attributes, default=repr),
                    )
                )
            del self._dead[:-1000]

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Pop due records."""
        out: list[SpooledItem] = []
        with self._lock:
            while self._due and len(out) < limit and self._due[0][0] <= now:
                _, rowid = heapq.heappop(self._due)
                item = self._items.get(rowid)
                if item is None or rowid in self._leased:
                    continue
                self._leased.add(rowid)
                key, _dest, body, origin, created, attempts = item
                out.append(SpooledItem(rowid, key, body, attempts, created, origin))
        return out

    def next_due(self, dest: str) -> float | None:
        """Earliest due time."""
        with self._lock:
            return self._due[0][0] if self._due else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Forget delivered records."""
        with self._lock:
            for rowid, key in zip(rowids, keys, strict=True):
                self._items.pop(rowid, None)
                self._leased.discard(rowid)
                start = self._refs.pop(rowid, key)
                self._pending.pop(start, None)
                self._delivered[start] = (key, now)
            if len(self._delivered) > 2 * self.max_records:
                cutoff = sorted(t for _, t in self._delivered.values())[len(self._delivered) // 2]
                self._delivered = {k: v for k, v in self._delivered.items() if v[1] > cutoff}

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Put records back with their next attempt time."""
        with self._lock:
            for rowid, when, _error in items:
                item = self._items.get(rowid)
                if item is None:
                    continue
                key, dest, body, origin, created, attempts = item
                self._items[rowid] = (key, dest, body, origin, created, attempts + 1)
                self._leased.discard(rowid)
                heapq.heappush(self._due, (when, rowid))

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Drop rejected records, keeping the last ones for inspection."""
        with self._lock:
            for rowid, status, reason in items:
                item = self._items.pop(rowid, None)
                self._leased.discard(rowid)
                self._pending.pop(self._refs.pop(rowid, ""), None)
                if item is not None:
                    self._dead.append(
                        DeadLetter(
                            rowid,
                            item[0],
                            status,
                            reason,
                            now,
                            item[5] + 1,
                            item[3],
                            item[2].decode(),
                        )
                    )
            del self._dead[:-1000]

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """The last dead letters kept in memory."""
        with self._lock:
            rows = [d for d in reversed(self._dead) if status is None or d.status == status]
        return rows[:limit]

    def release(self) -> None:
        """Nothing to release across processes."""

    def prune_delivered(self, now: float) -> None:
        """Nothing to prune here: :meth:`complete` bounds the delivered keys kept."""

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Nothing to remember: a memory spool serves one destination."""

    def endpoints(self) -> list[EndpointStatus]:
        """A memory spool holds one destination's records; nothing is stranded."""
        return []

    def pending(self, dest: str | None = None) -> int:
        """Records waiting."""
        with self._lock:
            return len(self._items)

    def stats(self) -> SpoolStats:
        """Counts."""
        now = time.time()
        with self._lock:
            oldest = min((i[4] for i in self._items.values()), default=None)
            return SpoolStats(
                pending=len(self._items),
                in_flight=len(self._leased),
                dead_letters=len(self._dead),
                oldest_pending_age=None if oldest is None else now - oldest,
                size_bytes=sum(len(i[2]) for i in self._items.values()),
            )

    def close(self) -> None:
        """Nothing to close."""


def check_spool_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ValueError` if the existing SQLite file at ``path`` is not a spool (a
    sandbox ledger, say), before anything opens it read-write and adds tables to it."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a spool: {exc}") from None
    if tables and "pending" not in tables:
        hint = (
            "; it looks like a sandbox ledger: see `paygent-otel ledger --db`"
            if ("usage" in tables)
            else ""
        )
        raise ValueError(f"{path} is not a spool (it has no pending table{hint})")


def open_spool(path: str, *, max_bytes: int, max_records: int = 100_000) -> Spool:
    """A :class:`SqliteSpool` at ``path``, a :class:`MemorySpool` for ``:memory:``, or the
    shared PostgreSQL spool for a ``postgresql://`` URL (``paygent-otel[postgres]``)."""
    if path == ":memory:":
        return MemorySpool(max_records=max_records)
    if is_pg_url(path):
        try:
            from ._spool_pg import open_postgres_spool
        except ImportError as exc:
            # An OSError: the pipeline logs it and refuses records instead of failing.
            raise OSError(
                f"the spool {SpoolUrl(path)} needs psycopg: pip install 'paygent-otel[postgres]'"
                f" ({exc})"
            ) from None
        return open_postgres_spool(path, max_bytes=max_bytes)
    return SqliteSpool(path, max_bytes=max_bytes)
