"""Where usage records wait for delivery: a durable SQLite or PostgreSQL spool, or an
in-memory queue, chosen by :func:`open_spool` and used through the :class:`Spool` protocol.

The parts: the protocol and what it hands out (:mod:`._spool_types`), the key and conflict
rules every backend shares (:mod:`._spool_keys`), lease holders and fork() (:mod:`._spool_owner`),
the tables and their migrations (:mod:`._spool_schema`), the SQLite spool
(:mod:`._spool_sqlite` and its file, intake, views and admin modules), the PostgreSQL
spool (:mod:`._spool_pg`) and the in-memory queue (:mod:`._spool_memory`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from ._spool_keys import endpoint_statuses, rejected_row
from ._spool_memory import MemorySpool
from ._spool_sqlite import SqliteSpool
from ._spool_types import (
    DELIVERED_KEY_RETENTION,
    LEASE_SECONDS,
    AddResult,
    DeadLetter,
    EndpointStatus,
    Spool,
    SpoolClosedError,
    SpooledItem,
    SpoolStats,
    destination_id,
)
from ._spool_url import SpoolUrl, is_pg_url

__all__ = [
    "DELIVERED_KEY_RETENTION",
    "LEASE_SECONDS",
    "AddResult",
    "DeadLetter",
    "EndpointStatus",
    "MemorySpool",
    "Spool",
    "SpoolClosedError",
    "SpoolStats",
    "SpooledItem",
    "SqliteSpool",
    "check_spool_file",
    "destination_id",
    "endpoint_statuses",
    "open_spool",
    "rejected_row",
]


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
