"""The spool's delivered-usage journal and audit table.

The journal keeps, per hour (UTC, of the moment a record was first recorded), customer,
kind and outcome, how many records and how much usage went where: ``recorded`` (handed to
the spool), ``duplicate`` (handed over again and acknowledged without a second record),
``refused`` (the spool was full), ``delivered``, ``dead`` (dead-lettered, invalid ones
included; a ``spool retry`` takes them back out), ``purged`` (pending records deleted by
``spool purge --pending``). With the records still pending, counted live, every period
must balance: ``recorded = delivered + duplicate + dead + pending + purged + refused``
(``paygent-otel reconcile``). Rows are aggregates, a few per hour and customer, kept for
:data:`JOURNAL_RETENTION_SECONDS`, so a billing question can be answered without Paygent.

The audit table has one line per change a person made (retry, purge, re-targeting).

Every function here takes the spool's connection inside the transaction that makes the
change, so a record's move and its journal line commit together.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from paygent_otel.convention import semconv as sc

__all__ = [
    "JOURNAL_RETENTION_SECONDS",
    "JOURNAL_SCHEMA",
    "AuditLine",
    "JournalRow",
    "Quantities",
    "audit",
    "backfill",
    "create",
    "journal",
    "journal_rows",
    "quantities_of",
    "read_audit",
    "read_journal",
    "read_pending",
]

JOURNAL_RETENTION_SECONDS: Final = 400 * 86_400.0
"""How long journal rows are kept: a year and a month of billing questions."""

JOURNAL_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS journal (
    period INTEGER NOT NULL,
    customer TEXT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    records INTEGER NOT NULL DEFAULT 0,
    minutes REAL NOT NULL DEFAULT 0,
    characters INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (period, customer, kind, outcome)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    records INTEGER NOT NULL
);
"""

_UPSERT = (
    "INSERT INTO journal (period, customer, kind, outcome, records, minutes, characters, tokens)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (period, customer, kind, outcome) DO UPDATE"
    " SET records = records + excluded.records, minutes = minutes + excluded.minutes,"
    " characters = characters + excluded.characters, tokens = tokens + excluded.tokens"
)


@dataclass(frozen=True, slots=True)
class Quantities:
    """What one record bills: its customer, kind and the quantity of its kind."""

    customer: str
    kind: str
    minutes: float = 0.0
    """STT ``audioDuration``, or every ``minutes`` of an STS ``usageMetadata``."""
    characters: int = 0
    """TTS ``characterCount``."""
    tokens: int = 0
    """Every ``tokens`` value of an STS ``usageMetadata`` (input, output, cached)."""


def _sum_named(value: Any, name: str) -> float:
    if isinstance(value, Mapping):
        return sum(
            (float(v) if k == name and isinstance(v, int | float) else _sum_named(v, name))
            for k, v in value.items()
        )
    return 0.0


def quantities_of(payload: Mapping[str, Any]) -> Quantities:
    """The customer, kind and quantities of a Paygent ``/api/v2/usage`` document."""
    raw = payload.get("rawUsage") or {}
    customer = str(payload.get("customerId", "?"))
    if "audioDuration" in raw:
        return Quantities(customer, "stt", minutes=float(raw["audioDuration"]))
    if "characterCount" in raw:
        return Quantities(customer, "tts", characters=int(raw["characterCount"]))
    meta = raw.get("usageMetadata") or {}
    return Quantities(
        customer,
        "sts",
        minutes=_sum_named(meta, "minutes"),
        tokens=int(_sum_named(meta, "tokens")),
    )


def rejected_quantities(attributes: Mapping[str, Any]) -> Quantities:
    """An invalid record's customer and kind (as far as its attributes say), no quantity."""
    return Quantities(
        str(attributes.get(sc.CUSTOMER_ID) or "").strip() or "?",
        str(attributes.get(sc.USAGE_KIND) or "").strip() or "?",
    )


def _hour(timestamp: float) -> int:
    return int(timestamp // 3600 * 3600)


def _aggregate(
    outcome: str, entries: Iterable[tuple[Quantities, float]], sign: int = 1
) -> list[JournalRow]:
    """Records added up per hour of recording, customer and kind."""
    totals: dict[tuple[int, str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for q, created in entries:
        total = totals[(_hour(created), q.customer, q.kind)]
        total[0] += sign
        total[1] += sign * q.minutes
        total[2] += sign * q.characters
        total[3] += sign * q.tokens
    return [
        JournalRow(period, customer, kind, outcome, int(n), minutes, int(c), int(t))
        for (period, customer, kind), (n, minutes, c, t) in sorted(totals.items())
    ]


def journal(
    conn: sqlite3.Connection,
    outcome: str,
    entries: Iterable[tuple[Quantities, float]],
    sign: int = 1,
) -> None:
    """Add (``sign`` -1: take back) records under ``outcome``: (quantities, recorded at)."""
    conn.executemany(
        _UPSERT,
        [
            (r.period, r.customer, r.kind, outcome, r.records, r.minutes, r.characters, r.tokens)
            for r in _aggregate(outcome, entries, sign)
        ],
    )


def journal_rows(
    conn: sqlite3.Connection, outcome: str, rows: Iterable[tuple[bytes, float]], sign: int = 1
) -> None:
    """:func:`journal` for spool rows: (JSON body, created)."""
    journal(
        conn, outcome, ((quantities_of(json.loads(body)), created) for body, created in rows), sign
    )


def prune_journal(conn: sqlite3.Connection, now: float) -> None:
    """Drop journal rows past the retention window (never those of a record still pending)."""
    (oldest,) = conn.execute("SELECT min(created) FROM pending").fetchone()
    cutoff = now - JOURNAL_RETENTION_SECONDS
    if oldest is not None:
        cutoff = min(cutoff, _hour(oldest))
    conn.execute("DELETE FROM journal WHERE period < ?", (cutoff,))


def create(conn: sqlite3.Connection) -> None:
    """Create the journal and audit tables. A spool written before the journal existed has
    its pending records and dead letters journaled as recorded (and dead), in the same
    transaction, so its report balances from the first run on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        fresh = not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal'").fetchone()
        for statement in JOURNAL_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        if fresh:
            backfill(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def backfill(conn: sqlite3.Connection) -> None:
    """Journal the pending records and dead letters of a spool written before the journal
    existed as recorded (and dead), so its report balances."""
    pending = conn.execute("SELECT body, created FROM pending").fetchall()
    journal_rows(conn, "recorded", pending)
    dead = [
        (
            quantities_of(json.loads(body)) if dest else rejected_quantities(json.loads(body)),
            created,
        )
        for dest, body, created in conn.execute("SELECT dest, body, created FROM dead")
    ]
    journal(conn, "recorded", dead)
    journal(conn, "dead", dead)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def audit(conn: sqlite3.Connection, action: str, detail: str, records: int) -> None:
    """One audit line: now, who (user@host and pid), ``action``, ``detail``, how many records."""
    conn.execute(
        "INSERT INTO audit (at, who, action, detail, records) VALUES (?, ?, ?, ?, ?)",
        (time.time(), _who(), action, detail, records),
    )


@dataclass(frozen=True, slots=True)
class JournalRow:
    """One journal aggregate (or a live count of pending records, outcome ``pending``)."""

    period: int
    """Start of the hour, Unix seconds (UTC)."""
    customer: str
    kind: str
    outcome: str
    records: int
    minutes: float
    characters: int
    tokens: int


@dataclass(frozen=True, slots=True)
class AuditLine:
    """One change a person made to the spool."""

    at: float
    who: str
    action: str
    detail: str
    records: int


def read_journal(
    conn: sqlite3.Connection, since: float | None, until: float | None
) -> list[JournalRow]:
    """Journal rows of the hours in ``[since, until)`` (either may be None)."""
    sql = (
        "SELECT period, customer, kind, outcome, records, minutes, characters, tokens FROM journal"
    )
    where, params = _period_filter(since, until)
    return [JournalRow(*row) for row in conn.execute(sql + where + " ORDER BY period", params)]


def read_pending(
    conn: sqlite3.Connection, since: float | None, until: float | None
) -> list[JournalRow]:
    """The records still pending, aggregated like the journal (outcome ``pending``)."""
    first = None if since is None else _hour(since)
    return _aggregate(
        "pending",
        (
            (quantities_of(json.loads(body)), created)
            for body, created in conn.execute("SELECT body, created FROM pending")
            if (first is None or created >= first) and (until is None or _hour(created) < until)
        ),
    )


def read_audit(conn: sqlite3.Connection, limit: int) -> list[AuditLine]:
    """Audit lines, newest first."""
    rows = conn.execute(
        "SELECT at, who, action, detail, records FROM audit ORDER BY id DESC LIMIT ?", (limit,)
    )
    return [AuditLine(*row) for row in rows]


def _period_filter(since: float | None, until: float | None) -> tuple[str, list[float]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("period >= ?")
        params.append(float(_hour(since)))
    if until is not None:
        clauses.append("period < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
