"""The PostgreSQL spool's statements that take records in and that people run: each a
function of one connection, so the spool class only decides when and with what.

Every stored record claims its key in ``paygent_keys`` in the statement that stores it:
the same record handed to two replicas is stored, and therefore sent, once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import psycopg

from paygent_otel.convention.mapping import Rejection, UsageRecord, conflict_rejection
from paygent_otel.delivery.spool.keys import held

__all__ = [
    "ADD_COLUMNS",
    "DEAD_COLUMNS",
    "IMPORT_COLUMNS",
    "REJECTED_COLUMNS",
    "insert_new",
    "move_dead_to_pending",
    "purge_table",
    "ref_conflicts",
    "retarget_records",
    "set_endpoint",
]

Columns = Sequence[tuple[str, str]]
"""(name, PostgreSQL type) of each column of a row, the key first."""

_RECORD: Final = (("key", "text"), ("dest", "text"), ("body", "bytea"), ("origin", "text"),
                  ("created", "float8"))  # fmt: skip
ADD_COLUMNS: Final = (*_RECORD, ("next_attempt", "float8"))
IMPORT_COLUMNS: Final = (*ADD_COLUMNS, ("attempts", "int"), ("last_error", "text"))
REJECTED_COLUMNS: Final = (*_RECORD, ("died", "float8"), ("status", "text"), ("reason", "text"))
"""The columns of :func:`~._spool_keys.rejected_row`."""
DEAD_COLUMNS: Final = (*REJECTED_COLUMNS, ("attempts", "int"))


def insert_new(
    conn: psycopg.Connection[Any], table: str, columns: Columns, rows: Sequence[tuple[Any, ...]]
) -> int:
    """Insert the ``rows`` whose key is new to ``paygent_keys`` (claiming the key in the
    same statement); how many were new."""
    if not rows:
        return 0
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"%s::{kind}[]" for _, kind in columns)
    cursor = conn.execute(
        f"WITH incoming AS (SELECT * FROM unnest({arrays}) AS t({names})),"
        " fresh AS (INSERT INTO paygent_keys (key) SELECT key FROM incoming"
        " ON CONFLICT (key) DO NOTHING RETURNING key)"
        f" INSERT INTO {table} ({names}) SELECT {names} FROM incoming JOIN fresh"
        " USING (key)",
        [list(column) for column in zip(*rows, strict=True)],
    )
    return max(cursor.rowcount, 0)


def ref_conflicts(conn: psycopg.Connection[Any], records: Sequence[UsageRecord]) -> list[Rejection]:
    """Records whose ref (span, log record, ``paygent.usage.id``) already holds another
    key, so different usage: refused, never stored under a second key. (Two replicas
    that take the same ref with different usage in the same instant can both store it:
    the window is one statement.)"""
    with_ref = [r for r in records if r.ref]
    if not with_ref:
        return []
    rows = conn.execute(
        "SELECT p.prefix, k.key FROM unnest(%s::text[]) AS p(prefix)"
        ' JOIN paygent_keys AS k ON k.key COLLATE "C" >= p.prefix'
        " AND k.key COLLATE \"C\" < p.prefix || 'g'",
        [[r.ref_key for r in with_ref]],
    ).fetchall()
    found: dict[str, list[str]] = {}
    for prefix, key in rows:
        found.setdefault(prefix, []).append(key)
    return [
        conflict_rejection(r, "delivered")
        for r in with_ref
        if found.get(r.ref_key) and held([("keys", k) for k in found[r.ref_key]], r) != "duplicate"
    ]


def set_endpoint(conn: psycopg.Connection[Any], dest: str, url: str) -> None:
    """Record which URL ``dest`` stands for."""
    conn.execute(
        "INSERT INTO paygent_endpoints (dest, url) VALUES (%s, %s)"
        " ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
        (dest, url),
    )


def retarget_records(
    conn: psycopg.Connection[Any], from_dest: str, to_dest: str, to_url: str
) -> tuple[int, int]:
    """File the pending records and dead letters of ``from_dest`` under ``to_dest``."""
    set_endpoint(conn, to_dest, to_url)
    moved_pending = conn.execute(
        "UPDATE paygent_pending SET dest = %s, next_attempt = least(next_attempt, %s)"
        " WHERE dest = %s",
        (to_dest, time.time(), from_dest),
    ).rowcount
    moved_dead = conn.execute(
        "UPDATE paygent_dead SET dest = %s WHERE dest = %s", (to_dest, from_dest)
    ).rowcount
    return max(moved_pending, 0), max(moved_dead, 0)


def move_dead_to_pending(conn: psycopg.Connection[Any], status: str | None, keys: list[str]) -> int:
    """Dead letters (not invalid ones) back to pending, due now; how many moved."""
    cursor = conn.execute(
        "WITH moved AS (DELETE FROM paygent_dead WHERE status != 'invalid'"
        " AND (%s::text IS NULL OR status = %s) AND (%s OR key = ANY(%s))"
        " RETURNING key, dest, body, origin, created)"
        " INSERT INTO paygent_pending (key, dest, body, origin, created, next_attempt)"
        " SELECT key, dest, body, origin, created, %s FROM moved"
        " ON CONFLICT (key) DO NOTHING",
        (status, status, not keys, keys, time.time()),
    )
    return max(cursor.rowcount, 0)


def purge_table(conn: psycopg.Connection[Any], what: str) -> int:
    """Delete every ``dead`` letter or ``pending`` record, and their keys; how many."""
    table = {"dead": "paygent_dead", "pending": "paygent_pending"}[what]
    row = conn.execute(
        f"WITH gone AS (DELETE FROM {table} RETURNING key),"
        " forgotten AS (DELETE FROM paygent_keys WHERE key IN (SELECT key FROM gone))"
        " SELECT count(*) FROM gone"
    ).fetchone()
    return int(row[0]) if row else 0
