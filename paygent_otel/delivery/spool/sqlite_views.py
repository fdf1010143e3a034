"""What a SQLite spool holds, read without changing it: counts, statuses, dead letters, the
journal and the audit lines (``spool status``, ``spool dead``, ``doctor``, ``reconcile``,
the usage page, the self-metrics)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from paygent_otel.delivery.spool import journal as _journal
from paygent_otel.delivery.spool.keys import dead_letter_of, endpoint_statuses
from paygent_otel.delivery.spool.sqlite_db import SqliteFile
from paygent_otel.delivery.spool.types import DeadLetter, EndpointStatus, SpoolStats

__all__ = ["SqliteSpoolView", "open_sqlite_view"]


class SqliteSpoolView:
    """The read side of a SQLite spool file."""

    durable = True

    def __init__(self, file: SqliteFile, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._file = file

    @property
    def path(self) -> Path:
        """The spool file."""
        return self._file.path

    def size_bytes(self) -> int:
        """Bytes in use by the database (free pages excluded)."""
        return self._file.size_bytes()

    def pending(self, dest: str | None = None) -> int:
        """Records waiting for delivery."""
        if dest is None:
            rows = self._file.read("SELECT count(*) FROM pending")
        else:
            rows = self._file.read("SELECT count(*) FROM pending WHERE dest = ?", (dest,))
        return int(rows[0][0])

    def stats(self) -> SpoolStats:
        """Counts for ``spool status`` and self-metrics."""
        now = time.time()
        counts = self._file.read(
            "SELECT count(*), coalesce(sum(lease_until >= ?), 0), min(created) FROM pending",
            (now,),
        )[0]
        dead = self._file.read("SELECT count(*) FROM dead")[0][0]
        return SpoolStats.at(now, counts, dead, self.size_bytes())

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination, with the last error and next attempt."""
        now = time.time()
        read = self._file.read
        urls = dict(read("SELECT dest, url FROM endpoints"))
        dead = dict(read("SELECT dest, count(*) FROM dead WHERE dest != '' GROUP BY dest"))
        pending = {
            row[0]: row[1:]
            for row in read(
                "SELECT dest, count(*), coalesce(sum(lease_until >= ?), 0), min(created), "
                "min(next_attempt), (SELECT last_error FROM pending AS p WHERE p.dest = "
                "pending.dest AND last_error IS NOT NULL ORDER BY attempts DESC, id DESC "
                "LIMIT 1) FROM pending GROUP BY dest",
                (now,),
            )
        }
        return endpoint_statuses(urls, pending, dead, now)

    def delivered_since(self, since: float) -> int:
        """Records delivered at or after ``since`` (within the delivered-key retention)."""
        return int(self._file.read("SELECT count(*) FROM delivered WHERE at >= ?", (since,))[0][0])

    def dead_letter_reasons(self, limit: int = 20) -> list[tuple[str, str, int, float]]:
        """(status, reason, count, last death) of the commonest dead-letter reasons."""
        rows = self._file.read(
            "SELECT status, reason, count(*), max(died) FROM dead GROUP BY status, reason "
            "ORDER BY count(*) DESC, max(died) DESC LIMIT ?",
            (limit,),
        )
        return [(str(s), str(r), int(n), float(t)) for s, r, n, t in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters there are of each status (``400``, ``invalid``, ...)."""
        rows = self._file.read("SELECT status, count(*) FROM dead GROUP BY status ORDER BY status")
        return {status: int(n) for status, n in rows}

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first, optionally only those with one status."""
        sql = "SELECT id, key, status, reason, died, attempts, origin, body FROM dead"
        params: list[object] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY died DESC LIMIT ?"
        params.append(limit)
        return [dead_letter_of(r) for r in self._file.read(sql, params)]

    def key_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Where each of ``keys`` is: ``pending``, ``delivered``, ``dead`` (absent: unknown)."""
        states: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for table in ("delivered", "dead", "pending"):
                rows = self._file.read(f"SELECT key FROM {table} WHERE key IN ({marks})", chunk)
                states.update((key, table) for (key,) in rows)
        return states

    def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are pending, delivered (within the retention window) or dead."""
        return set(self.key_states(keys))

    def audit_lines(self, limit: int = 50) -> list[_journal.AuditLine]:
        """The audit lines, newest first."""
        return self._file.snapshot(lambda conn: _journal.read_audit(conn, limit))

    def journal(
        self, since: float | None = None, until: float | None = None
    ) -> list[_journal.JournalRow]:
        """Journal rows of ``[since, until)``, then the pending records counted live."""
        return self._file.snapshot(
            lambda conn: (
                _journal.read_journal(conn, since, until)
                + _journal.read_pending(conn, since, until)
            )
        )

    def close(self) -> None:
        """Close the connection."""
        self._file.close()


def open_sqlite_view(path: str | os.PathLike[str], *, max_bytes: int = 1 << 62) -> SqliteSpoolView:
    """The existing spool file at ``path``, opened only to read it: nothing in it changes.
    :class:`FileNotFoundError` if there is none, :class:`ValueError` if it is not a spool."""
    return SqliteSpoolView(SqliteFile(path, readonly=True), max_bytes=max_bytes)
