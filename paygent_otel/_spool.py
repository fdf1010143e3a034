"""Where usage records wait for delivery: a durable SQLite spool, or an in-memory queue.

The durable spool commits a record (idempotency key + JSON body) before the exporter's
``export()`` returns, leases it to one delivery worker at a time (several processes may
share the file: gunicorn workers, forked children), deletes it only after a 2xx, and moves
definitive rejections to a dead-letter table a person can inspect and replay
(``paygent-otel spool``). Keys of delivered records are kept for a window so a record
handed over twice (a Collector retrying an OTLP request) is not sent twice.
"""

from __future__ import annotations

import contextlib
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

from ._mapping import Rejection, UsageRecord
from ._spool_url import SpoolUrl, is_pg_url

__all__ = [
    "AddResult",
    "DeadLetter",
    "MemorySpool",
    "Spool",
    "SpoolStats",
    "SpooledItem",
    "SqliteSpool",
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


class Spool(Protocol):
    """The seam between ``export()`` and HTTP delivery."""

    durable: bool

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Store valid records; committed when this returns."""
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
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""

_nonces: dict[int, str] = {}
_live_spools: weakref.WeakSet[SqliteSpool | MemorySpool] = weakref.WeakSet()
_held_across_fork: list[SqliteSpool | MemorySpool] = []


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


os.register_at_fork(
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
        _live_spools.add(self)

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
        """Commit valid records; refuse them all if the size cap is reached."""
        if not records:
            return AddResult()
        if self.size_bytes() >= self.max_bytes:
            return AddResult(refused=len(records))
        now = time.time()
        rows = [
            (
                r.idempotency_key,
                dest,
                json.dumps(r.payload, separators=(",", ":"), allow_nan=False).encode(),
                r.origin,
                now,
                now,
                r.idempotency_key,
                r.idempotency_key,
            )
            for r in records
        ]

        def insert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
                "SELECT ?, ?, ?, ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM delivered WHERE key = ?) "
                "AND NOT EXISTS (SELECT 1 FROM dead WHERE key = ?) "
                "ON CONFLICT (key) DO NOTHING",
                rows,
            )
            return conn.total_changes - before

        accepted: int = self._write(insert)
        return AddResult(accepted=accepted, duplicates=len(records) - accepted)

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records (their attributes) as dead letters with status ``invalid``."""
        if not rejections:
            return
        now = time.time()
        rows = [rejected_row(r, now) for r in rejections]
        self._write(
            lambda conn: conn.executemany(
                "INSERT INTO dead (key, dest, body, origin, created, died, status, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                rows,
            )
        )

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
            conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in rowids])
            conn.executemany(
                "INSERT OR REPLACE INTO delivered (key, at) VALUES (?, ?)",
                [(k, now) for k in keys],
            )

        self._write(done, synced=False)

    def prune_delivered(self, now: float) -> None:
        """Drop delivered keys older than the retention window."""
        self._write(
            lambda conn: conn.execute(
                "DELETE FROM delivered WHERE at < ?", (now - DELIVERED_KEY_RETENTION,)
            )
        )

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
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for table in ("pending", "delivered", "dead"):
                rows = self._read(f"SELECT key FROM {table} WHERE key IN ({marks})", chunk)
                found.update(key for (key,) in rows)
        return found

    def stats(self) -> SpoolStats:
        """Counts for ``spool status`` and self-metrics."""
        now = time.time()
        counts = self._read(
            "SELECT count(*), coalesce(sum(lease_until >= ?), 0), min(created) FROM pending",
            (now,),
        )[0]
        dead = self._read("SELECT count(*) FROM dead")[0][0]
        return SpoolStats.at(now, counts, dead, self.size_bytes())

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
            before = conn.total_changes
            conn.execute(
                "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
                f"SELECT key, dest, body, origin, created, ? FROM dead WHERE {where} "
                "ON CONFLICT (key) DO NOTHING",
                [now, *params],
            )
            moved = conn.total_changes - before
            conn.execute(f"DELETE FROM dead WHERE {where}", params)
            return moved

        moved: int = self._write(move)
        return moved

    def purge(self, what: str) -> int:
        """Delete ``dead`` letters or ``pending`` records; returns how many."""
        table = {"dead": "dead", "pending": "pending"}[what]

        def delete(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.execute(f"DELETE FROM {table}")
            return conn.total_changes - before

        deleted: int = self._write(delete)
        return deleted

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
        self._keys: set[str] = set()
        self._delivered: dict[str, float] = {}
        self._dead: list[DeadLetter] = []
        self._next_id = 0
        _live_spools.add(self)

    def _after_fork(self) -> None:
        """In a forked child: start empty (the parent delivers its own records, as the
        SDK's batch processor clears its queue in the child), with a fresh lock."""
        self._lock = threading.Lock()
        self._items.clear()
        self._due.clear()
        self._leased.clear()
        self._keys.clear()

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Queue records, refusing those beyond ``max_records``."""
        accepted = duplicates = refused = 0
        now = time.time()
        with self._lock:
            for r in records:
                key = r.idempotency_key
                if key in self._keys or key in self._delivered:
                    duplicates += 1
                    continue
                if len(self._items) >= self.max_records:
                    refused += 1
                    continue
                self._next_id += 1
                body = json.dumps(r.payload, separators=(",", ":"), allow_nan=False).encode()
                self._items[self._next_id] = (key, dest, body, r.origin, now, 0)
                self._keys.add(key)
                heapq.heappush(self._due, (now, self._next_id))
                accepted += 1
        return AddResult(accepted, duplicates, refused)

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
                self._keys.discard(key)
                self._delivered[key] = now
            if len(self._delivered) > 2 * self.max_records:
                cutoff = sorted(self._delivered.values())[len(self._delivered) // 2]
                self._delivered = {k: t for k, t in self._delivered.items() if t > cutoff}

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
                if item is not None:
                    self._keys.discard(item[0])
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
