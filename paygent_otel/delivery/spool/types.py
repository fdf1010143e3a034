"""What the spool hands out and reports, and the :class:`Spool` protocol every backend keeps.

Shared by the SQLite, PostgreSQL and in-memory spools and by their callers: the exporters'
delivery pipeline and worker, the bridge, and the ``spool``, ``doctor`` and ``reconcile``
commands.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from paygent_otel.convention.mapping import Rejection, UsageRecord

__all__ = [
    "BODY_EXCERPT",
    "DELIVERED_KEY_RETENTION",
    "LEASE_SECONDS",
    "AddResult",
    "DeadLetter",
    "EndpointStatus",
    "Spool",
    "SpoolClosedError",
    "SpoolStats",
    "SpoolView",
    "SpooledItem",
    "destination_id",
]

DELIVERED_KEY_RETENTION = 24 * 3600.0
"""Seconds the keys of delivered records are kept to suppress a second hand-over."""
LEASE_SECONDS = 60.0
"""How long a leased record is reserved for one worker; a dead owner's lease is
reclaimed at once when the owner is on this host, else when it expires."""
BODY_EXCERPT = 500
"""How much of an error or a reason a spool keeps (characters)."""


def destination_id(endpoint: str) -> str:
    """Which Paygent endpoint a record is for.

    Not the API key: records spooled before a key was configured, or under a key since
    rotated, belong to the same account and must still be sent. One spool file therefore
    serves one Paygent account (docs/delivery.md).
    """
    return hashlib.sha256(endpoint.encode()).hexdigest()[:16]


class SpoolClosedError(RuntimeError):
    """A spool was used after :meth:`Spool.close`: it is not opened again behind the
    caller's back."""


@dataclass(frozen=True, slots=True)
class SpooledItem:
    """A leased record."""

    rowid: int
    key: str
    body: bytes
    attempts: int
    created: float
    origin: str


@dataclass(frozen=True, slots=True)
class AddResult:
    """What :meth:`Spool.add` did with a batch."""

    accepted: int = 0
    duplicates: int = 0
    """Already pending, delivered (within the retention window) or dead-lettered."""
    refused: int = 0
    """Not stored: the spool is full. Counted and logged by the caller."""
    conflicts: tuple[Rejection, ...] = ()
    """Not stored: a record with the same ref and different usage is pending or was
    delivered. Kept as dead letters (status ``conflict``); logged by the caller."""


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot for ``paygent-otel spool status`` and the self-metrics."""

    pending: int
    in_flight: int
    dead_letters: int
    oldest_pending_age: float | None
    size_bytes: int

    @classmethod
    def at(
        cls, now: float, counts: Sequence[Any], dead_letters: int, size_bytes: int
    ) -> SpoolStats:
        """The snapshot at ``now`` from (pending, in flight, oldest ``created`` or None)."""
        pending, in_flight, oldest = counts
        return cls(
            pending=int(pending),
            in_flight=int(in_flight),
            dead_letters=int(dead_letters),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            size_bytes=size_bytes,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record Paygent refused (or that broke the convention), kept for a person."""

    rowid: int
    key: str
    status: str
    reason: str
    died: float
    attempts: int
    origin: str
    body: str


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """What the spool holds for one destination (``spool status``, the exit warning)."""

    dest: str
    url: str | None
    """The endpoint's URL (None for records spooled before URLs were remembered)."""
    pending: int
    in_flight: int
    dead_letters: int
    oldest_pending_age: float | None
    next_attempt: float | None
    """Earliest next-attempt time (Unix seconds) of a pending record."""
    last_error: str | None
    """The most recent failure of a pending record."""


class Spool(Protocol):
    """The seam between ``export()`` and HTTP delivery."""

    durable: bool

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Store valid records that are neither duplicates nor conflicts; committed when
        this returns."""
        ...

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records as dead letters (status ``invalid``)."""
        ...

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Reserve up to ``limit`` due records for this worker."""
        ...

    def next_due(self, dest: str) -> float | None:
        """When the earliest unleased pending record becomes due, if any."""
        ...

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Forget delivered records (keeping their keys for the retention window)."""
        ...

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """(rowid, next attempt time, last error): count an attempt, release the lease."""
        ...

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """(rowid, status, reason): move to the dead-letter table."""
        ...

    def release(self) -> None:
        """Release this process's leases (shutdown), so another worker can take them."""
        ...

    def pending(self, dest: str | None = None) -> int:
        """Records waiting (leased or not)."""
        ...

    def stats(self) -> SpoolStats:
        """Counts for status output and self-metrics."""
        ...

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for."""
        ...

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination."""
        ...

    def prune_delivered(self, now: float) -> None:
        """Forget delivered keys past the retention window."""
        ...

    def close(self) -> None:
        """Release leases and close files, for good: a later call raises
        :class:`SpoolClosedError` instead of opening them again. Idempotent."""
        ...


class SpoolView(Protocol):
    """A spool opened only to look (``open_spool(..., readonly=True)``): the commands that
    report on a spool read it through this and never change it."""

    durable: bool

    @property
    def path(self) -> os.PathLike[str] | str:
        """What output shows: the file, or the URL with its password masked."""
        ...

    def pending(self, dest: str | None = None) -> int:
        """Records waiting (leased or not)."""
        ...

    def stats(self) -> SpoolStats:
        """Counts for status output."""
        ...

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination."""
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters there are of each status."""
        ...

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first, optionally only those with one status."""
        ...

    def key_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Where each of ``keys`` is: ``pending``, ``delivered``, ``dead``."""
        ...

    def close(self) -> None:
        """Close files and connections, for good."""
        ...
