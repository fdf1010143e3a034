"""Records the PostgreSQL spool keeps outside PostgreSQL: the local SQLite *fallback* that
takes records while the server cannot be reached, and moving a SQLite spool's records in
(the fallback's after an outage, or a file's with ``paygent-otel spool migrate``)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from paygent_otel.delivery.config import default_spool_path
from paygent_otel.delivery.spool.sqlite import SqliteSpool

if TYPE_CHECKING:
    from paygent_otel.delivery.spool.postgres import PostgresSpool

__all__ = ["Fallback", "MoveResult", "default_fallback_path", "move_sqlite_records"]

_logger = logging.getLogger("paygent_otel.spool")

BATCH: Final = 500
"""Records moved (or keys looked up) per statement."""


def default_fallback_path() -> Path:
    """``$XDG_STATE_HOME/paygent-otel/pg-fallback.sqlite3`` (beside the default spool)."""
    return default_spool_path().with_name("pg-fallback.sqlite3")


class Fallback:
    """The local SQLite file records go to during an outage (opened at the first need)."""

    def __init__(self, path: Path | None, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.spool: SqliteSpool | None = None
        """The open fallback file, if records went (or an earlier outage left some) there."""
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self.open()  # records an earlier outage left go to PostgreSQL first

    def open(self) -> SqliteSpool:
        """The fallback file, opened now if it is not yet."""
        with self._lock:
            if self.spool is None:
                assert self.path is not None
                self.spool = SqliteSpool(self.path, max_bytes=self.max_bytes)
            return self.spool

    def drain(self, target: PostgresSpool) -> None:
        """Move the records the fallback took into PostgreSQL, saying so."""
        spool = self.spool
        if spool is None or not (spool.pending() or spool.dead_letter_counts()):
            return
        moved = move_sqlite_records(spool.path, target)
        if moved.pending or moved.dead_letters or moved.duplicates:
            _logger.warning(
                "PostgreSQL spool %s: moved %d records and %d dead letters in from the "
                "fallback %s (%d were already there)",
                target.url,
                moved.pending,
                moved.dead_letters,
                self.path,
                moved.duplicates,
            )

    def close(self) -> None:
        """Close the fallback file, if open."""
        if self.spool is not None:
            self.spool.close()


@dataclass(frozen=True, slots=True)
class MoveResult:
    """What :func:`move_sqlite_records` moved from a SQLite spool into PostgreSQL."""

    pending: int = 0
    """Pending records now pending in PostgreSQL."""
    dead_letters: int = 0
    """Dead letters now dead letters in PostgreSQL."""
    duplicates: int = 0
    """Records whose key PostgreSQL already knew (removed from the file, not sent twice)."""


def move_sqlite_records(
    path: str | os.PathLike[str], target: PostgresSpool, *, batch: int = BATCH
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
