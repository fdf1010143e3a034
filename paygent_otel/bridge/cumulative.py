"""Cumulative usage counters become deltas, each increment billed once.

Most OpenTelemetry SDKs export counters with CUMULATIVE temporality by default: every export
repeats the running total since the stream started. The bridge keeps, per stream (resource,
scope, metric name, point attributes), the start time, time and value of the last point it
committed, and bills the difference. Its rules:

- first point of a stream: the whole value, for the interval start..time;
- same start, later time: ``value - last value``, for the interval last time..time;
- a later start time, or a value below the last one: the sender restarted, and the value is
  what was counted since the restart;
- a point not newer than the last one (a retry of a request already committed, or an export
  that arrived out of order), or from before the stream's current start: nothing, as its
  increment is already part of a committed delta.

The state lives in SQLite beside the spool. A batch of new positions is first written to a
journal, then the records go to the spool, then the journal is applied; on start, a journal
left by a crash is applied only if its records reached the spool. So a crash between the two
commits neither bills an increment twice nor loses it.

With the PostgreSQL spool the state lives in the same database, shared by every replica
(:class:`PostgresCumulativeStore`): senders spread over replicas send the points of one
stream to several of them. A replica holds a session advisory lock per stream from
:meth:`~CumulativeStore.deltas` to :meth:`~CumulativeStore.commit`, so two replicas never
compute deltas from the same position; a replica that dies loses its session and its locks,
and the next one to lock the stream settles the journal it left, by the same rule.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.exporters.metrics import UsagePoint

if TYPE_CHECKING:
    import psycopg

    from paygent_otel.delivery.spool.postgres import PostgresSpool

__all__ = [
    "STATE_RETENTION_SECONDS",
    "CumulativePoint",
    "CumulativeStore",
    "PostgresCumulativeStore",
    "StreamUpdate",
    "cumulative_state_path",
    "open_cumulative_store",
]

_logger = logging.getLogger("paygent_otel.bridge.cumulative")

STATE_RETENTION_SECONDS: Final = 7 * 24 * 3600.0
"""A stream not seen for this long is forgotten (a live SDK reports every interval)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    value NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_positions (
    stream TEXT PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    value NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_keys (key TEXT PRIMARY KEY) WITHOUT ROWID;
"""
_SQL_CHUNK = 500


def cumulative_state_path(spool_path: str | os.PathLike[str]) -> Path:
    """``spool.sqlite3`` -> ``spool.cumulative.sqlite3``, in the spool's (private) folder."""
    path = Path(spool_path)
    return path.with_name(path.stem + ".cumulative.sqlite3")


@dataclass(frozen=True, slots=True)
class CumulativePoint:
    """A point of a cumulative usage counter: ``point.value`` is the running total."""

    stream: str
    """Stable id of the stream (resource, scope, metric name, attributes)."""
    point: UsagePoint
    """``start_ns`` is the stream's start time, ``end_ns`` the point's time."""


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """The position a stream moves to once the batch's records are committed."""

    stream: str
    start_ns: int
    time_ns: int
    value: int | float


class CumulativeStore:
    """Last committed position of every cumulative stream, in a SQLite file.

    Callers serialize :meth:`deltas` -> :meth:`journal` -> spool -> :meth:`commit` (the
    bridge holds one lock around the sequence); the store itself is thread-safe. Processes
    sharing the file (``serve --workers``) are serialized too: each holds an exclusive
    ``flock`` on ``<file>.lock`` from :meth:`deltas` to :meth:`commit` or :meth:`discard`,
    and settles a journal a dead holder left before reading positions.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_seconds: float = STATE_RETENTION_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.retention_seconds = retention_seconds
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Private before SQLite opens it: the WAL and shared-memory files take its mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # a file an earlier version created with the umask's mode
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a lost state commit would make the next delta cover an increment twice.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._flock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._holding = False
        self._known_keys: Callable[[Sequence[str]], set[str]] | None = None

    def _hold(self) -> None:
        """Take the cross-process lock (released by the kernel if this process dies)."""
        if not self._holding:
            fcntl.flock(self._flock_fd, fcntl.LOCK_EX)
            self._holding = True

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            fcntl.flock(self._flock_fd, fcntl.LOCK_UN)

    def _transaction(self, statements: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                statements(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _positions(self, streams: Sequence[str]) -> dict[str, tuple[int, int, int | float]]:
        found: dict[str, tuple[int, int, int | float]] = {}
        with self._lock:
            for start in range(0, len(streams), _SQL_CHUNK):
                chunk = streams[start : start + _SQL_CHUNK]
                rows = self._conn.execute(
                    "SELECT stream, start_ns, time_ns, value FROM streams "
                    f"WHERE stream IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for stream, start_ns, time_ns, value in rows:
                    found[stream] = (start_ns, time_ns, value)
        return found

    def deltas(
        self, points: Iterable[CumulativePoint]
    ) -> tuple[list[UsagePoint], list[StreamUpdate]]:
        """Delta points for ``points`` and the positions their streams move to.

        Nothing is written: pass the updates to :meth:`journal` and :meth:`commit` once the
        records made from the deltas are stored. Holds the file's lock until then (or
        returns without it when there is nothing to commit).
        """
        self._hold()
        try:
            self._settle_journal()
            out, updates = self._compute(points)
        except BaseException:
            self._let_go()
            raise
        if not updates:
            self._let_go()
        return out, updates

    def _compute(
        self, points: Iterable[CumulativePoint]
    ) -> tuple[list[UsagePoint], list[StreamUpdate]]:
        """The rules of the module docstring, against :meth:`_positions`."""
        ordered = sorted(points, key=lambda p: (p.stream, p.point.end_ns))
        state = self._positions(list(dict.fromkeys(p.stream for p in ordered)))
        out: list[UsagePoint] = []
        moved: dict[str, StreamUpdate] = {}
        for item in ordered:
            point = item.point
            start, now, value = point.start_ns, point.end_ns, point.value
            last = state.get(item.stream)
            if last is None:
                delta, since = value, start
            else:
                last_start, last_time, last_value = last
                if start and last_start and start < last_start:
                    continue  # an older generation of a restarted stream
                if start and last_start and start > last_start:
                    delta, since = value, start
                elif now <= last_time:
                    continue  # already covered by a committed delta (retry or reordering)
                elif value < last_value:
                    _logger.info(
                        "cumulative stream %s of %r went from %s to %s: sender restart, "
                        "billing the new total",
                        item.stream,
                        point.name,
                        last_value,
                        value,
                    )
                    delta, since = value, last_time
                else:
                    delta, since = value - last_value, last_time
            state[item.stream] = (start, now, value)
            moved[item.stream] = StreamUpdate(item.stream, start, now, value)
            if delta:
                out.append(replace(point, start_ns=since, end_ns=now, value=delta))
        return out, list(moved.values())

    def journal(self, updates: Sequence[StreamUpdate], keys: Sequence[str]) -> None:
        """Write the batch's new positions and the keys of its records, before the spool."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM journal_positions")
            conn.execute("DELETE FROM journal_keys")
            conn.executemany(
                "INSERT INTO journal_positions VALUES (?, ?, ?, ?)",
                [(u.stream, u.start_ns, u.time_ns, u.value) for u in updates],
            )
            conn.executemany("INSERT OR IGNORE INTO journal_keys VALUES (?)", [(k,) for k in keys])

        try:
            self._transaction(write)
        except BaseException:
            self._let_go()
            raise

    def commit(self) -> None:
        """Apply the journal (the batch's records are in the spool); release the lock."""
        try:
            self._apply_journal()
        finally:
            self._let_go()

    def discard(self) -> None:
        """Forget the journal (the records were refused, the sender retries); release."""
        try:
            self._clear_journal()
        finally:
            self._let_go()

    def _apply_journal(self) -> None:
        now = time.time()

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO streams (stream, start_ns, time_ns, value, updated) "
                "SELECT stream, start_ns, time_ns, value, ? FROM journal_positions",
                (now,),
            )
            conn.execute("DELETE FROM journal_positions")
            conn.execute("DELETE FROM journal_keys")

        self._transaction(apply)

    def _clear_journal(self) -> None:
        def clear(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM journal_positions")
            conn.execute("DELETE FROM journal_keys")

        self._transaction(clear)

    def recover(self, known_keys: Callable[[Sequence[str]], set[str]]) -> None:
        """Settle a journal a crash left: apply it if all its records reached the spool.

        ``known_keys`` is kept: a process sharing the file settles what a sibling that
        died mid-batch left, the next time it takes the lock.
        """
        self._known_keys = known_keys
        self._hold()
        try:
            self._settle_journal()
        finally:
            self._let_go()

    def _settle_journal(self) -> None:
        """Under the lock, a journal is one its holder left when it died: settle it."""
        if self._known_keys is None:
            return
        with self._lock:
            pending = self._conn.execute("SELECT count(*) FROM journal_positions").fetchone()[0]
            keys = [k for (k,) in self._conn.execute("SELECT key FROM journal_keys")]
        if not pending:
            return
        if set(keys) <= self._known_keys(keys):
            _logger.warning("applying %d cumulative positions left by a crash", pending)
            self._apply_journal()
        else:
            _logger.warning(
                "discarding %d cumulative positions left by a crash (their records were not "
                "stored; the sender retries them)",
                pending,
            )
            self._clear_journal()

    def prune(self, now: float | None = None) -> int:
        """Forget streams not updated within the retention window; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        removed = 0

        def delete(conn: sqlite3.Connection) -> None:
            nonlocal removed
            removed = conn.execute("DELETE FROM streams WHERE updated < ?", (cutoff,)).rowcount

        self._transaction(delete)
        return removed

    def close(self) -> None:
        """Close the files (and release the lock, if a batch still holds it)."""
        self._let_go()
        os.close(self._flock_fd)
        with self._lock:
            self._conn.close()


class PostgresCumulativeStore(CumulativeStore):
    """Stream positions in the PostgreSQL spool's database, shared by every replica.

    Same contract as :class:`CumulativeStore`; between :meth:`deltas` and :meth:`commit` (or
    :meth:`discard`) this store holds one pooled connection and the advisory locks of the
    batch's streams.
    """

    def __init__(
        self, spool: PostgresSpool, *, retention_seconds: float = STATE_RETENTION_SECONDS
    ) -> None:
        self.spool = spool
        self.retention_seconds = retention_seconds
        self._lock = threading.Lock()
        self._held: contextlib.ExitStack | None = None
        self._conn: psycopg.Connection[Any] | None = None  # type: ignore[assignment]
        self._batch = ""

    def _locked_connection(self) -> psycopg.Connection[Any]:
        assert self._conn is not None, "deltas() first: it takes the streams' locks"
        return self._conn

    def _release(self) -> None:
        """Drop the streams' locks and hand the connection back to the pool."""
        held, self._held = self._held, None
        conn, self._conn = self._conn, None
        if held is None:
            return
        with held:
            if conn is not None and not conn.closed:
                conn.execute("SELECT pg_advisory_unlock_all()")

    def _settle_left_journals(self, conn: psycopg.Connection[Any], streams: list[str]) -> None:
        """Apply (records stored) or drop (records not stored) what a dead replica left."""
        batches = [
            batch
            for (batch,) in conn.execute(
                "SELECT DISTINCT batch FROM paygent_stream_journal WHERE stream = ANY(%s)",
                (streams,),
            )
        ]
        for batch in batches:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE k.key IS NULL) FROM paygent_stream_journal_keys j"
                " LEFT JOIN paygent_keys k USING (key) WHERE j.batch = %s",
                (batch,),
            ).fetchone()
            stored = row is not None and row[0] == 0
            _logger.warning(
                "%s cumulative positions of batch %s left by a stopped replica (their records %s)",
                "applying" if stored else "discarding",
                batch,
                "are in the spool" if stored else "were not stored; the sender retries them",
            )
            self._finish(conn, batch, apply=stored)

    def _finish(self, conn: psycopg.Connection[Any], batch: str, *, apply: bool) -> None:
        with conn.transaction():
            if apply:
                conn.execute(
                    "INSERT INTO paygent_streams AS s (stream, start_ns, time_ns, int_value,"
                    " float_value, updated) SELECT stream, start_ns, time_ns, int_value,"
                    " float_value, %s FROM paygent_stream_journal WHERE batch = %s"
                    " ON CONFLICT (stream) DO UPDATE SET start_ns = excluded.start_ns,"
                    " time_ns = excluded.time_ns, int_value = excluded.int_value,"
                    " float_value = excluded.float_value, updated = excluded.updated",
                    (time.time(), batch),
                )
            conn.execute("DELETE FROM paygent_stream_journal WHERE batch = %s", (batch,))
            conn.execute("DELETE FROM paygent_stream_journal_keys WHERE batch = %s", (batch,))

    def deltas(
        self, points: Iterable[CumulativePoint]
    ) -> tuple[list[UsagePoint], list[StreamUpdate]]:
        """Lock the points' streams (held until :meth:`commit`/:meth:`discard`), then as
        :meth:`CumulativeStore.deltas`."""
        ordered = list(points)
        streams = sorted({p.stream for p in ordered})
        self._release()  # a batch the caller abandoned
        held = contextlib.ExitStack()
        try:
            conn = held.enter_context(self.spool.connection())
            # One order for every replica: two batches sharing streams cannot deadlock.
            conn.execute(
                "SELECT pg_advisory_lock(h) FROM (SELECT DISTINCT hashtextextended(s, 0) AS h"
                " FROM unnest(%s::text[]) AS s ORDER BY h) AS locks",
                (streams,),
            )
            self._held, self._conn = held, conn
            self._settle_left_journals(conn, streams)
            out, updates = self._compute(ordered)
        except BaseException:
            self._release()
            held.close()
            raise
        if not updates:
            self._release()
        return out, updates

    def _positions(self, streams: Sequence[str]) -> dict[str, tuple[int, int, int | float]]:
        rows = self._locked_connection().execute(
            "SELECT stream, start_ns, time_ns, int_value, float_value FROM paygent_streams"
            " WHERE stream = ANY(%s)",
            (list(streams),),
        )
        return {
            stream: (start_ns, time_ns, int_value if int_value is not None else float_value)
            for stream, start_ns, time_ns, int_value, float_value in rows
        }

    def journal(self, updates: Sequence[StreamUpdate], keys: Sequence[str]) -> None:
        """Write the batch's new positions and its records' keys, before the spool."""
        conn = self._locked_connection()
        self._batch = uuid.uuid4().hex
        ints = [u.value if isinstance(u.value, int) else None for u in updates]
        floats = [None if isinstance(u.value, int) else float(u.value) for u in updates]
        with conn.transaction():
            conn.execute(
                "INSERT INTO paygent_stream_journal SELECT %s, * FROM unnest(%s::text[],"
                " %s::bigint[], %s::bigint[], %s::bigint[], %s::float8[])",
                (
                    self._batch,
                    [u.stream for u in updates],
                    [u.start_ns for u in updates],
                    [u.time_ns for u in updates],
                    ints,
                    floats,
                ),
            )
            conn.execute(
                "INSERT INTO paygent_stream_journal_keys SELECT DISTINCT %s, k"
                " FROM unnest(%s::text[]) AS k",
                (self._batch, list(keys)),
            )

    def commit(self) -> None:
        """Apply the journal (the batch's records are in the spool) and unlock the streams."""
        try:
            self._finish(self._locked_connection(), self._batch, apply=True)
        finally:
            self._release()

    def discard(self) -> None:
        """Forget the journal (the records were refused) and unlock the streams."""
        try:
            self._finish(self._locked_connection(), self._batch, apply=False)
        finally:
            self._release()

    def recover(self, known_keys: Callable[[Sequence[str]], set[str]]) -> None:
        """Nothing at start: :meth:`deltas` settles a journal when it locks its streams,
        since a journal of a replica that still runs must not be touched."""

    def prune(self, now: float | None = None) -> int:
        """Forget streams no replica updated within the retention window; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        with self.spool.connection() as conn:
            return conn.execute(
                "DELETE FROM paygent_streams WHERE updated < %s", (cutoff,)
            ).rowcount

    def close(self) -> None:
        """Unlock what a batch still holds (the spool's connections stay the spool's)."""
        self._release()


def open_cumulative_store(spool: object, spool_path: str) -> CumulativeStore | None:
    """The cumulative state for the bridge's ``spool``, recovered and pruned: a SQLite file
    beside a SQLite spool, the spool's own database for the PostgreSQL spool, None for the
    in-memory queue (cumulative points are then refused)."""
    store: CumulativeStore
    if isinstance(spool, SqliteSpool):
        store = CumulativeStore(cumulative_state_path(spool_path))
        store.recover(spool.known_keys)
    else:
        try:
            from paygent_otel.delivery.spool.postgres import PostgresSpool
        except ImportError:
            return None
        if not isinstance(spool, PostgresSpool):
            return None
        store = PostgresCumulativeStore(spool)
    store.prune()
    return store
