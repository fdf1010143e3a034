"""The rules every spool backend shares: the key scheme, what holds a record back, and how
stored rows become the records and statuses callers see.

A record's key starts with a digest of its *ref* (what it is: its telemetry ids or its
``paygent.usage.id``) and ends with a digest of its usage, so the key index finds the
records of one ref. A record whose ref is pending or was delivered is a duplicate when the
usage is the same (the same key), and is refused as a conflict (kept as a dead letter with
status ``conflict``) when it differs: one ref is never billed twice. Dead letters hold back
only an identical record, and an ``invalid`` one nothing: a corrected record has another
key and is billed. Keys paygent-otel 0.1.0 gave (its telemetry ref alone) are recognised.

The SQLite, PostgreSQL and in-memory spools store rows their own way; what a row means is
decided here, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from paygent_otel.convention.mapping import Rejection, UsageRecord
from paygent_otel.delivery.spool.types import BODY_EXCERPT, DeadLetter, EndpointStatus, SpoolStats

__all__ = [
    "dead_letter_of",
    "endpoint_statuses",
    "held",
    "merged_stats",
    "old_keys",
    "record_body",
    "ref_range",
    "rejected_body",
    "rejected_row",
]


def record_body(record: UsageRecord) -> bytes:
    """The JSON document a record is stored (and sent) as."""
    return json.dumps(record.payload, separators=(",", ":"), allow_nan=False).encode()


def rejected_body(rejection: Rejection) -> bytes:
    """An invalid record's attributes, as JSON: what its dead letter keeps."""
    return json.dumps(rejection.attributes, default=repr, separators=(",", ":")).encode()


def old_keys(record: UsageRecord) -> tuple[str, ...]:
    """Keys paygent-otel 0.1.0 may have given the record (its telemetry ref alone, aliases)."""
    return (record.ref, *record.aliases) if record.ref else ()


def ref_range(record: UsageRecord) -> tuple[str, str]:
    """The keys of the records of ``record``'s ref: ``[start, end)``, compared as SQLite
    compares text. A record without a ref is its key alone."""
    start = record.ref_key
    return start, start + (chr(0x10FFFF) if record.ref else "\x00")


def held(found: Iterable[tuple[str, str]], record: UsageRecord) -> str | None:
    """What holds ``record`` back, from the (table, key) rows of its ref or its old keys:
    ``"duplicate"`` (its own key, or a 0.1.0 key: the same usage as far as 0.1.0 could
    tell), else the table of a record of its ref with different usage (a conflict), else
    None (nothing)."""
    other = None
    for table, key in found:
        if key == record.idempotency_key or key in record.aliases or key == record.ref:
            return "duplicate"
        other = other or table
    return other


def rejected_row(r: Rejection, now: float) -> tuple[Any, ...]:
    """An invalid record as a dead letter: (key, dest, body, origin, created, died, status,
    reason); the body is its attributes, as JSON."""
    return (r.idempotency_key, "", rejected_body(r), r.origin, now, now, r.reason.value, r.message)


def dead_letter_of(row: Sequence[Any]) -> DeadLetter:
    """A dead letter from its row: (id, key, status, reason, died, attempts, origin, body)."""
    rowid, key, status, reason, died, attempts, origin, body = row
    return DeadLetter(rowid, key, status, reason, died, attempts, origin, bytes(body).decode())


def endpoint_statuses(
    urls: dict[str, str],
    pending: dict[str, tuple[Any, ...]],
    dead: dict[str, int],
    now: float,
) -> list[EndpointStatus]:
    """Per-destination status from the spool's counts: ``pending`` maps a destination to
    (count, in flight, oldest created, earliest next attempt, last error)."""
    out = []
    for dest in sorted(pending.keys() | dead.keys(), key=lambda d: urls.get(d) or d):
        count, in_flight, oldest, due, error = pending.get(dest, (0, 0, None, None, None))
        out.append(
            EndpointStatus(
                dest,
                urls.get(dest),
                int(count),
                int(in_flight),
                int(dead.get(dest, 0)),
                None if oldest is None else max(0.0, now - oldest),
                due,
                error,
            )
        )
    return out


def merged_stats(shared: SpoolStats, local: SpoolStats) -> SpoolStats:
    """Two spools' counts as one (a shared spool and its local fallback): the local records
    are never in flight there."""
    ages = [a for a in (shared.oldest_pending_age, local.oldest_pending_age) if a is not None]
    return SpoolStats(
        pending=shared.pending + local.pending,
        in_flight=shared.in_flight,
        dead_letters=shared.dead_letters + local.dead_letters,
        oldest_pending_age=max(ages, default=None),
        size_bytes=shared.size_bytes + local.size_bytes,
    )


def excerpt(text: str) -> str:
    """``text`` cut to what a spool keeps of an error or a reason."""
    return text[:BODY_EXCERPT]
