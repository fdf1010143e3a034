"""The SQLite spool's file: its connection, transactions, lock, and life across fork().

One connection per process (a forked child opens its own), shared by the process's threads
under one lock. Each change is one ``BEGIN IMMEDIATE`` transaction, so several processes
(gunicorn workers, forked children) can share the file.

Opened read-only (the commands that only look), the file is never changed: no mode change,
no ``opened`` mark, no lease taken back, no table added. Tables a file written by an
earlier version lacks are stood in for by empty temporary tables of this connection only.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from paygent_otel.delivery.spool import journal as _journal
from paygent_otel.delivery.spool.owner import dead_owners, owner_token, track
from paygent_otel.delivery.spool.schema import SQLITE_SCHEMA, migrate_sqlite, sqlite_schema_version
from paygent_otel.delivery.spool.types import SpoolClosedError

__all__ = ["SqliteFile", "check_spool_file"]

T = TypeVar("T")
P = ParamSpec("P")


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


class SqliteFile:
    """A spool file in WAL mode, safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        """Open (creating it if needed) the spool file at ``path``; with ``readonly``, an
        existing spool file, only to read it (:class:`ValueError` if it is not a spool)."""
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.owner = ""
        """Who this process's leases name (:func:`~._spool_owner.owner_token`)."""
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no spool at {self.path}")
            check_spool_file(self.path)
        else:
            self._create_private_file()
        self._connection()  # fail at construction, not at the first export
        track(self)

    def _create_private_file(self) -> None:
        folder = self.path.parent
        # Billing data and the dead letters' bodies are private: the folder is 0700.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files the
        # database file's mode, and they hold the same payloads.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # a file an earlier version created with the umask's mode

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
        if self._closed:  # never opened again behind the caller's back
            raise SpoolClosedError(f"the spool {self.path} is closed")
        # After fork() the parent's connection must not be used: open our own.
        if self._pid != os.getpid() or self._conn is None:
            target = self.path.resolve().as_uri() + "?mode=ro" if self.readonly else self.path
            conn = sqlite3.connect(
                target,
                timeout=30.0,
                isolation_level=None,
                check_same_thread=False,
                uri=self.readonly,
            )
            try:
                if self.readonly:
                    self._stand_in_for_missing_tables(conn)
                else:
                    self._prepare(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._pid = os.getpid()
        return self._conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Make a new connection ready: WAL, durable commits, the tables, a lease owner."""
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        migrate_sqlite(conn, self.path)
        # A write now, so a read-only file or a full disk fails here, at start.
        conn.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('opened', ?)", (time.time(),)
        )
        self.owner = owner_token()
        self._reclaim_orphans(conn)

    def _stand_in_for_missing_tables(self, conn: sqlite3.Connection) -> None:
        """Read-only: empty temporary tables for those the file lacks (an empty file, or
        one an earlier version wrote), and the journal an older file would be given."""
        sqlite_schema_version(conn, self.path)  # refuse a file newer than this version
        present = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        for statement in (SQLITE_SCHEMA + _journal.JOURNAL_SCHEMA).split(";"):
            table = re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+)", statement)
            if table and table[1] not in present:
                conn.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
        if "journal" not in present:
            _journal.backfill(conn)

    @staticmethod
    def _reclaim_orphans(conn: sqlite3.Connection) -> None:
        """Release leases of processes on this host that no longer exist (crash recovery)."""
        owners = conn.execute(
            "SELECT DISTINCT lease_owner FROM pending WHERE lease_owner IS NOT NULL"
        )
        for owner in dead_owners(row[0] for row in owners):
            conn.execute(
                "UPDATE pending SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (owner,),
            )

    @property
    def connected(self) -> bool:
        """Whether this process has its own open connection (a forked child may not yet)."""
        return not self._closed and self._conn is not None and self._pid == os.getpid()

    def write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in one transaction, committed with an fsync."""
        return self._transaction(lambda conn: fn(conn, *args, **kwargs), synced=True)

    def write_unsynced(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """:meth:`write` without an fsync (``synchronous=NORMAL``), for the worker's
        bookkeeping of records already committed: a lease or a delivery that a power loss
        (not a process crash) undoes only means the record is leased or sent again, with
        the same idempotency key. The next synced commit makes it durable too."""
        return self._transaction(lambda conn: fn(conn, *args, **kwargs), synced=False)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], *, synced: bool) -> T:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction."""
        with self._lock:
            conn = self._connection()
            if not synced:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                if not synced:
                    conn.execute("PRAGMA synchronous=FULL")
            return result

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query."""
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on one consistent snapshot (a read transaction)."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")  # one snapshot: a record moving meanwhile is counted once
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

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

    def close(self) -> None:
        """Close this process's connection, for good: a later use raises
        :class:`~._spool_types.SpoolClosedError`."""
        with self._lock:
            self._closed = True
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
