"""How the SQLite spool takes records in: one transaction per batch, with the key rules.

A record is inserted unless a record of its ref (a key in its ref's range) is pending or
delivered, or one of its 0.1.0 keys is, or Paygent refused its key (a dead letter that is
not ``invalid`` or ``conflict``). Records held back are then told apart one by one:
duplicates (acknowledged, not stored again) and conflicts (kept as dead letters). Each
outcome is journaled in the same transaction.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from paygent_otel.convention.mapping import Rejection, UsageRecord, conflict_rejection
from paygent_otel.delivery.spool import journal as _journal
from paygent_otel.delivery.spool.keys import (
    excerpt,
    held,
    old_keys,
    record_body,
    ref_range,
    rejected_row,
)
from paygent_otel.delivery.spool.types import AddResult

__all__ = ["insert_records", "insert_rejected"]

_Entry = tuple[_journal.Quantities, float]


@functools.cache
def _insert_sql(old_key_count: int) -> str:
    """Insert one record unless a record of its ref (a key in ``[start, end)``) is pending
    or delivered, or one of its ``old_key_count`` old keys is, or Paygent refused its key
    (a dead letter that is not invalid or a conflict)."""
    marks = ",".join("?" * old_key_count)
    held_by_old = (
        f"AND NOT EXISTS (SELECT 1 FROM pending WHERE key IN ({marks})) "
        f"AND NOT EXISTS (SELECT 1 FROM delivered WHERE key IN ({marks})) "
        if old_key_count
        else ""
    )
    return (
        "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
        "SELECT ?, ?, ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM pending WHERE key >= ? AND key < ?) "
        "AND NOT EXISTS (SELECT 1 FROM delivered WHERE key >= ? AND key < ?) "
        + held_by_old
        + "AND NOT EXISTS (SELECT 1 FROM dead WHERE key = ? "
        "AND status NOT IN ('invalid', 'conflict')) "
        "ON CONFLICT (key) DO NOTHING"
    )


def insert_records(
    conn: sqlite3.Connection, dest: str, records: Sequence[UsageRecord], now: float
) -> AddResult:
    """Insert the records of one batch that nothing holds back; journal every outcome."""
    bodies = [record_body(r) for r in records]
    rows: dict[int, list[tuple[Any, ...]]] = {}
    for record, body in zip(records, bodies, strict=True):
        old = old_keys(record)
        rows.setdefault(len(old), []).append(
            (record.idempotency_key, dest, body, record.origin, now, now,
             *ref_range(record), *ref_range(record), *old, *old, record.idempotency_key)
        )  # fmt: skip
    last_id = conn.execute("SELECT coalesce(max(id), 0) FROM pending").fetchone()[0]
    before = conn.total_changes
    for count, group in rows.items():
        conn.executemany(_insert_sql(count), group)
    inserted = conn.total_changes - before
    entries = [(_journal.quantities_of(r.payload), now) for r in records]
    _journal.journal(conn, "recorded", entries)
    if inserted == len(records):
        return AddResult(accepted=len(records))
    new = {k for (k,) in conn.execute("SELECT key FROM pending WHERE id > ?", (last_id,))}
    return _sort_held_back(conn, dest, records, bodies, entries, new, now)


def _sort_held_back(
    conn: sqlite3.Connection,
    dest: str,
    records: Sequence[UsageRecord],
    bodies: Sequence[bytes],
    entries: Sequence[_Entry],
    new: set[str],
    now: float,
) -> AddResult:
    """Some records were held back: tell duplicates from conflicts, one by one."""
    accepted = 0
    conflicts: list[Rejection] = []
    duplicates: list[_Entry] = []
    dead: list[_Entry] = []
    for record, body, entry in zip(records, bodies, entries, strict=True):
        if record.idempotency_key in new:
            new.discard(record.idempotency_key)  # a second copy is a duplicate
            accepted += 1
            continue
        holder = held(_keys_of_ref(conn, record), record)
        if holder is None or holder == "duplicate":
            duplicates.append(entry)
            continue
        conflict = conflict_rejection(record, holder)
        conflicts.append(conflict)
        dead.append(entry)
        conn.execute(
            "INSERT INTO dead (key, dest, body, origin, created, died, status, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, 'conflict', ?) ON CONFLICT (key) DO NOTHING",
            (record.idempotency_key, dest, body, record.origin, now, now,
             excerpt(conflict.message)),
        )  # fmt: skip
    _journal.journal(conn, "duplicate", duplicates)
    _journal.journal(conn, "dead", dead)
    return AddResult(accepted, len(duplicates), 0, tuple(conflicts))


def _keys_of_ref(conn: sqlite3.Connection, record: UsageRecord) -> list[tuple[str, str]]:
    """(table, key) of the pending and delivered records of ``record``'s ref or old keys."""
    old = old_keys(record)
    marks = ",".join("?" * len(old))
    return [
        (table, key)
        for table in ("pending", "delivered")
        for (key,) in conn.execute(
            f"SELECT key FROM {table} WHERE key >= ? AND key < ? OR key IN ({marks})",
            (*ref_range(record), *old),
        )
    ]


def insert_rejected(conn: sqlite3.Connection, rejections: Sequence[Rejection], now: float) -> None:
    """Keep invalid records as dead letters (status ``invalid``), journaled once."""
    before = conn.total_changes
    conn.executemany(
        "INSERT INTO dead (key, dest, body, origin, created, died, status, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        [rejected_row(r, now) for r in rejections],
    )
    if conn.total_changes != before:  # not a second hand-over of the same records
        entries = [(_journal.rejected_quantities(r.attributes), now) for r in rejections]
        _journal.journal(conn, "recorded", entries)
        _journal.journal(conn, "dead", entries)
