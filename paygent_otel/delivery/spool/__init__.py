"""Where usage records wait for delivery: a durable SQLite or PostgreSQL spool, or an
in-memory queue, chosen by :func:`open_spool` and used through the :class:`Spool` protocol;
the commands that only look open it read-only (``readonly=True``: a :class:`SpoolView`).

The parts: the protocol and what it hands out (:mod:`._spool_types`), the key and conflict
rules every backend shares (:mod:`._spool_keys`), lease holders and fork() (:mod:`._spool_owner`),
the tables and their versioned migrations (:mod:`._spool_schema`), the SQLite spool
(:mod:`._spool_sqlite` and its file, intake, views and admin modules), the PostgreSQL
spool (:mod:`._spool_pg` and its pool, link, statements, views and fallback modules) and
the in-memory queue (:mod:`._spool_memory`).
"""

from __future__ import annotations

from typing import Literal, overload

from paygent_otel.delivery.spool.keys import endpoint_statuses, rejected_row
from paygent_otel.delivery.spool.memory import MemorySpool
from paygent_otel.delivery.spool.sqlite import SqliteSpool
from paygent_otel.delivery.spool.sqlite_db import SqliteFile, check_spool_file
from paygent_otel.delivery.spool.sqlite_views import SqliteSpoolView, open_sqlite_view
from paygent_otel.delivery.spool.types import (
    DELIVERED_KEY_RETENTION,
    LEASE_SECONDS,
    AddResult,
    DeadLetter,
    EndpointStatus,
    Spool,
    SpoolClosedError,
    SpooledItem,
    SpoolStats,
    SpoolView,
    destination_id,
)
from paygent_otel.delivery.spool.url import SpoolUrl, is_pg_url

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
    "SpoolView",
    "SpooledItem",
    "SqliteFile",
    "SqliteSpool",
    "SqliteSpoolView",
    "check_spool_file",
    "destination_id",
    "endpoint_statuses",
    "open_spool",
    "open_sqlite_view",
    "rejected_row",
]


@overload
def open_spool(
    path: str, *, max_bytes: int, max_records: int = ..., readonly: Literal[False] = ...
) -> Spool: ...


@overload
def open_spool(
    path: str, *, max_bytes: int, max_records: int = ..., readonly: Literal[True]
) -> SpoolView: ...


def open_spool(
    path: str, *, max_bytes: int, max_records: int = 100_000, readonly: bool = False
) -> Spool | SpoolView:
    """A :class:`SqliteSpool` at ``path``, a :class:`MemorySpool` for ``:memory:``, or the
    shared PostgreSQL spool for a ``postgresql://`` URL (``paygent-otel[postgres]``).

    ``readonly``: an existing spool opened only to look (the ``spool status`` and ``dead``,
    ``doctor`` and ``reconcile`` commands), which is never changed: no table, mark, mode
    or lease is written. :class:`FileNotFoundError` when there is no spool file,
    :class:`ValueError` for a file that is not a spool or for ``:memory:``.
    """
    if path == ":memory:":
        if readonly:
            raise ValueError("an in-memory spool belongs to its process: there is none to open")
        return MemorySpool(max_records=max_records)
    if is_pg_url(path):
        try:
            from paygent_otel.delivery.spool.postgres import PostgresSpoolView, open_postgres_spool
        except ImportError as exc:
            # An OSError: the pipeline logs it and refuses records instead of failing.
            raise OSError(
                f"the spool {SpoolUrl(path)} needs psycopg: pip install 'paygent-otel[postgres]'"
                f" ({exc})"
            ) from None
        if readonly:
            return PostgresSpoolView(path, max_bytes=max_bytes)
        return open_postgres_spool(path, max_bytes=max_bytes)
    if readonly:
        return open_sqlite_view(path, max_bytes=max_bytes)
    return SqliteSpool(path, max_bytes=max_bytes)
