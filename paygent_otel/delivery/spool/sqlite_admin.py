"""Changes a person makes to a SQLite spool (``paygent-otel spool``): each one transaction,
journaled, with an audit line saying who changed what and how many records."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from paygent_otel.delivery.spool import journal as _journal

__all__ = ["move_dead_to_pending", "purge_table", "retarget_records", "set_endpoint"]


def set_endpoint(conn: sqlite3.Connection, dest: str, url: str) -> None:
    """Record which URL ``dest`` stands for."""
    conn.execute(
        "INSERT INTO endpoints (dest, url) VALUES (?, ?) "
        "ON CONFLICT (dest) DO UPDATE SET url = excluded.url",
        (dest, url),
    )


def retarget_records(
    conn: sqlite3.Connection, from_dest: str, to_dest: str, to_url: str
) -> tuple[int, int]:
    """File the pending records and dead letters of ``from_dest`` under ``to_dest``."""
    set_endpoint(conn, to_dest, to_url)
    before = conn.total_changes
    conn.execute(
        "UPDATE pending SET dest = ?, next_attempt = min(next_attempt, ?) WHERE dest = ?",
        (to_dest, time.time(), from_dest),
    )
    moved_pending = conn.total_changes - before
    conn.execute("UPDATE dead SET dest = ? WHERE dest = ?", (to_dest, from_dest))
    moved_dead = conn.total_changes - before - moved_pending
    from_url = conn.execute("SELECT url FROM endpoints WHERE dest = ?", (from_dest,)).fetchone()
    _journal.audit(
        conn,
        "retarget",
        f"from {from_url[0] if from_url else from_dest} to {to_url}: "
        f"{moved_pending} pending, {moved_dead} dead letters",
        moved_pending + moved_dead,
    )
    return moved_pending, moved_dead


def move_dead_to_pending(conn: sqlite3.Connection, status: str | None, keys: list[str]) -> int:
    """Dead letters (not invalid ones) back to pending, due now; how many moved."""
    where = "status != 'invalid'"
    params: list[Any] = []
    if status is not None:
        where += " AND status = ?"
        params.append(status)
    if keys:
        where += f" AND key IN ({','.join('?' * len(keys))})"
        params.extend(keys)
    _journal.journal_rows(
        conn,
        "dead",
        conn.execute(f"SELECT body, created FROM dead WHERE {where}", params),
        sign=-1,
    )
    before = conn.total_changes
    conn.execute(
        "INSERT INTO pending (key, dest, body, origin, created, next_attempt) "
        f"SELECT key, dest, body, origin, created, ? FROM dead WHERE {where} "
        "ON CONFLICT (key) DO NOTHING",
        [time.time(), *params],
    )
    moved = conn.total_changes - before
    conn.execute(f"DELETE FROM dead WHERE {where}", params)
    which = f"status {status}" if status is not None else "every status"
    if keys:
        which += f", keys {', '.join(keys)}"
    _journal.audit(conn, "retry", f"dead letters back to pending ({which})", moved)
    return moved


def purge_table(conn: sqlite3.Connection, what: str) -> int:
    """Delete every ``dead`` letter or ``pending`` record; how many."""
    table = {"dead": "dead", "pending": "pending"}[what]
    if table == "pending":
        _journal.journal_rows(conn, "purged", conn.execute("SELECT body, created FROM pending"))
    before = conn.total_changes
    conn.execute(f"DELETE FROM {table}")
    deleted = conn.total_changes - before
    _journal.audit(conn, "purge", f"deleted every {what} record", deleted)
    return deleted
