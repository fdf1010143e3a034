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
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from .._metrics import UsagePoint

__all__ = [
    "STATE_RETENTION_SECONDS",
    "CumulativePoint",
    "CumulativeStore",
    "StreamUpdate",
    "cumulative_state_path",
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
    bridge holds one lock around the sequence); the store itself is thread-safe.
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
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a lost state commit would make the next delta cover an increment twice.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        os.chmod(self.path, 0o600)

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
        records made from the deltas are stored.
        """
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

        self._transaction(write)

    def commit(self) -> None:
        """Apply the journal: the batch's records are in the spool."""
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

    def discard(self) -> None:
        """Forget the journal: the batch's records were refused, the sender will retry."""

        def clear(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM journal_positions")
            conn.execute("DELETE FROM journal_keys")

        self._transaction(clear)

    def recover(self, known_keys: Callable[[Sequence[str]], set[str]]) -> None:
        """Settle a journal a crash left: apply it if all its records reached the spool."""
        with self._lock:
            pending = self._conn.execute("SELECT count(*) FROM journal_positions").fetchone()[0]
            keys = [k for (k,) in self._conn.execute("SELECT key FROM journal_keys")]
        if not pending:
            return
        if set(keys) <= known_keys(keys):
            _logger.warning("applying %d cumulative positions left by a crash", pending)
            self.commit()
        else:
            _logger.warning(
                "discarding %d cumulative positions left by a crash (their records were not "
                "stored; the sender retries them)",
                pending,
            )
            self.discard()

    def prune(self, now: float | None = None) -> int:
        """Forget streams not updated within the retention window; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        removed = 0

        def delete(conn: sqlite3.Connection) -> None:
            nonlocal removed
            removed = conn.execute("DELETE FROM streams WHERE updated < ?", (cutoff,)).rowcount

        self._transaction(delete)
        return removed

    def streams(self) -> int:
        """Streams tracked."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM streams").fetchone()[0])

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._conn.close()
