"""The durable SQLite spool: the :class:`~._spool_types.Spool` contract on one local file.

The spool commits a record (idempotency key + JSON body) before the exporter's ``export()``
returns, leases it to one delivery worker at a time (several processes may share the file:
gunicorn workers, forked children), deletes it only after a 2xx, and moves definitive
rejections to a dead-letter table a person can inspect and replay (``paygent-otel
spool``). Keys of delivered records are kept for a window so a record handed over twice (a
Collector retrying an OTLP request) is not sent twice. The key rules are in
:mod:`._spool_keys`; the file and its transactions in :mod:`._spool_sqlite_db`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence

from paygent_otel.convention.mapping import Rejection, UsageRecord
from paygent_otel.delivery.spool import journal as _journal
from paygent_otel.delivery.spool.keys import excerpt
from paygent_otel.delivery.spool.sqlite_add import insert_records, insert_rejected
from paygent_otel.delivery.spool.sqlite_admin import (
    move_dead_to_pending,
    purge_table,
    retarget_records,
    set_endpoint,
)
from paygent_otel.delivery.spool.sqlite_db import SqliteFile
from paygent_otel.delivery.spool.sqlite_views import SqliteSpoolView
from paygent_otel.delivery.spool.types import (
    DELIVERED_KEY_RETENTION,
    LEASE_SECONDS,
    AddResult,
    SpooledItem,
)

__all__ = ["SqliteSpool"]


class SqliteSpool(SqliteSpoolView):
    """The durable spool: one SQLite file in WAL mode, safe across threads and processes.

    What it reads is :class:`~._spool_sqlite_views.SqliteSpoolView`'s; what it changes is
    here, each change one transaction of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int) -> None:
        super().__init__(SqliteFile(path), max_bytes=max_bytes)

    # ------------------------------------------------------------------ producer side

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
                self._file.write(_journal.journal, outcome, refused)
            return AddResult(refused=len(records))
        return self._file.write(insert_records, dest, records, now)

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records (their attributes) as dead letters with status ``invalid``."""
        if rejections:
            self._file.write(insert_rejected, rejections, time.time())

    # ------------------------------------------------------------------ worker side

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
                (self._file.owner, now + LEASE_SECONDS, dest, now, now, limit),
            ).fetchall()
            return [SpooledItem(*row) for row in rows]

        return self._file.write_unsynced(take)

    def next_due(self, dest: str) -> float | None:
        """Earliest next-attempt time of an unleased pending record."""
        row = self._file.read(
            "SELECT min(next_attempt) FROM pending WHERE dest = ? "
            "AND (lease_until IS NULL OR lease_until < ?)",
            (dest, time.time()),
        )
        value = row[0][0] if row else None
        return float(value) if value is not None else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Delete delivered records and remember their keys."""
        if not rowids:
            return

        def done(conn: sqlite3.Connection) -> None:
            marks = ",".join("?" * len(rowids))
            rows = conn.execute(f"SELECT body, created FROM pending WHERE id IN ({marks})", rowids)
            _journal.journal_rows(conn, "delivered", rows)
            conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in rowids])
            conn.executemany(
                "INSERT OR REPLACE INTO delivered (key, at) VALUES (?, ?)",
                [(k, now) for k in keys],
            )

        self._file.write_unsynced(done)

    def prune_delivered(self, now: float) -> None:
        """Drop delivered keys older than the retention window, and old journal rows."""

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM delivered WHERE at < ?", (now - DELIVERED_KEY_RETENTION,))
            _journal.prune_journal(conn, now)

        self._file.write(prune)

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Count a failed attempt and release the lease until the next attempt time.

        Only records this worker still holds: one whose lease expired and went to another
        worker is that worker's to settle (and a repeated call changes nothing).
        """
        if not items:
            return
        self._file.write_unsynced(
            lambda conn: conn.executemany(
                "UPDATE pending SET attempts = attempts + 1, next_attempt = ?, last_error = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
                [(when, excerpt(error), rowid, self._file.owner) for rowid, when, error in items],
            )
        )

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Move records this worker holds to the dead-letter table with status and reason."""
        if not items:
            return

        def move(conn: sqlite3.Connection) -> None:
            for rowid, status, reason in items:
                held = (rowid, self._file.owner)  # read here: a forked child's own
                rows = conn.execute(
                    "SELECT body, created FROM pending WHERE id = ? AND lease_owner = ?", held
                )
                _journal.journal_rows(conn, "dead", rows)
                conn.execute(
                    "INSERT INTO dead (key, dest, body, origin, created, died, attempts, status,"
                    " reason) SELECT key, dest, body, origin, created, ?, attempts + 1, ?, ?"
                    " FROM pending WHERE id = ? AND lease_owner = ? ON CONFLICT (key) DO NOTHING",
                    (now, status, excerpt(reason), *held),
                )
                conn.execute("DELETE FROM pending WHERE id = ? AND lease_owner = ?", held)

        self._file.write(move)

    def release(self) -> None:
        """Release this process's leases."""
        if not self._file.connected:
            return
        self._file.write(
            lambda conn: conn.execute(
                "UPDATE pending SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (self._file.owner,),
            )
        )

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for (status output, ``spool retarget``)."""
        self._file.write_unsynced(set_endpoint, dest, url)

    # ------------------------------------------------------------------ what people change

    def retarget(self, from_dest: str, to_dest: str, to_url: str) -> tuple[int, int]:
        """File the pending records and dead letters of ``from_dest`` under ``to_dest``;
        pending ones fall due now. Returns (pending moved, dead letters moved)."""
        return self._file.write(retarget_records, from_dest, to_dest, to_url)

    def retry_dead(self, status: str | None = None, keys: Iterable[str] = ()) -> int:
        """Move dead letters back to pending (not invalid ones: they have no payload)."""
        return self._file.write(move_dead_to_pending, status, list(keys))

    def purge(self, what: str) -> int:
        """Delete ``dead`` letters or ``pending`` records; returns how many."""
        return self._file.write(purge_table, what)

    def close(self) -> None:
        """Release leases and close the connection, for good: a later use raises
        :class:`~._spool_types.SpoolClosedError`. Idempotent."""
        try:
            self.release()
        finally:
            self._file.close()
