"""The in-memory spool: the :class:`~._spool_types.Spool` contract, lost on a crash or at
the end of the process (``OTEL_EXPORTER_PAYGENT_SPOOL_PATH=:memory:``)."""

from __future__ import annotations

import heapq
import json
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

from paygent_otel.convention.mapping import Rejection, UsageRecord, conflict_rejection
from paygent_otel.delivery.spool.keys import held, record_body
from paygent_otel.delivery.spool.owner import track
from paygent_otel.delivery.spool.types import (
    AddResult,
    DeadLetter,
    EndpointStatus,
    SpooledItem,
    SpoolStats,
)

__all__ = ["MemorySpool"]


class _Item(NamedTuple):
    """A queued record."""

    key: str
    dest: str
    body: bytes
    origin: str
    created: float
    attempts: int


class MemorySpool:
    """The in-memory queue: same contract, lost on a crash or at the end of the process."""

    durable = False

    def __init__(self, *, max_records: int = 100_000) -> None:
        self.max_records = max_records
        self._lock = threading.Lock()
        self._items: dict[int, _Item] = {}
        self._due: list[tuple[float, int]] = []
        self._leased: set[int] = set()
        self._pending: dict[str, str] = {}
        """The key of each pending record, by :attr:`UsageRecord.ref_key`."""
        self._refs: dict[int, str] = {}
        """The ref key of each pending record, by row id."""
        self._delivered: dict[str, tuple[str, float]] = {}
        """The key and delivery time of each delivered record, by ref key."""
        self._dead: list[DeadLetter] = []
        self._next_id = 0
        track(self)

    def _after_fork(self) -> None:
        """In a forked child: start empty (the parent delivers its own records, as the
        SDK's batch processor clears its queue in the child), with a fresh lock."""
        self._lock = threading.Lock()
        self._items.clear()
        self._due.clear()
        self._leased.clear()
        self._pending.clear()
        self._refs.clear()

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Queue records, refusing those beyond ``max_records``; duplicates and conflicts
        as :meth:`SqliteSpool.add` tells them."""
        accepted = duplicates = refused = 0
        conflicts: list[Rejection] = []
        now = time.time()
        with self._lock:
            for r in records:
                start = r.ref_key
                found = [("pending", self._pending[start])] if start in self._pending else []
                if start in self._delivered:
                    found.append(("delivered", self._delivered[start][0]))
                holder = held(found, r)
                body = record_body(r)
                if holder == "duplicate":
                    duplicates += 1
                    continue
                if holder is not None:
                    conflict = conflict_rejection(r, holder)
                    conflicts.append(conflict)
                    self._dead.append(
                        DeadLetter(
                            0,
                            r.idempotency_key,
                            "conflict",
                            conflict.message,
                            now,
                            0,
                            r.origin,
                            body.decode(),
                        )
                    )
                    continue
                if len(self._items) >= self.max_records:
                    refused += 1
                    continue
                self._next_id += 1
                self._items[self._next_id] = _Item(r.idempotency_key, dest, body, r.origin, now, 0)
                self._pending[start] = r.idempotency_key
                self._refs[self._next_id] = start
                heapq.heappush(self._due, (now, self._next_id))
                accepted += 1
            del self._dead[:-1000]
        return AddResult(accepted, duplicates, refused, tuple(conflicts))

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep the last invalid records in memory for inspection."""
        now = time.time()
        with self._lock:
            for r in rejections:
                self._dead.append(
                    DeadLetter(
                        0,
                        r.idempotency_key,
                        r.reason.value,
                        r.message,
                        now,
                        0,
                        r.origin,
                        json.dumps(r.attributes, default=repr),
                    )
                )
            del self._dead[:-1000]

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Pop due records."""
        out: list[SpooledItem] = []
        with self._lock:
            while self._due and len(out) < limit and self._due[0][0] <= now:
                _, rowid = heapq.heappop(self._due)
                item = self._items.get(rowid)
                if item is None or rowid in self._leased:
                    continue
                self._leased.add(rowid)
                key, _dest, body, origin, created, attempts = item
                out.append(SpooledItem(rowid, key, body, attempts, created, origin))
        return out

    def next_due(self, dest: str) -> float | None:
        """Earliest due time."""
        with self._lock:
            return self._due[0][0] if self._due else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Forget delivered records."""
        with self._lock:
            for rowid, key in zip(rowids, keys, strict=True):
                self._items.pop(rowid, None)
                self._leased.discard(rowid)
                start = self._refs.pop(rowid, key)
                self._pending.pop(start, None)
                self._delivered[start] = (key, now)
            if len(self._delivered) > 2 * self.max_records:
                cutoff = sorted(t for _, t in self._delivered.values())[len(self._delivered) // 2]
                self._delivered = {k: v for k, v in self._delivered.items() if v[1] > cutoff}

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Put records back with their next attempt time."""
        with self._lock:
            for rowid, when, _error in items:
                item = self._items.get(rowid)
                if item is None:
                    continue
                self._items[rowid] = item._replace(attempts=item.attempts + 1)
                self._leased.discard(rowid)
                heapq.heappush(self._due, (when, rowid))

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Drop rejected records, keeping the last ones for inspection."""
        with self._lock:
            for rowid, status, reason in items:
                item = self._items.pop(rowid, None)
                self._leased.discard(rowid)
                self._pending.pop(self._refs.pop(rowid, ""), None)
                if item is not None:
                    self._dead.append(
                        DeadLetter(
                            rowid,
                            item.key,
                            status,
                            reason,
                            now,
                            item.attempts + 1,
                            item.origin,
                            item.body.decode(),
                        )
                    )
            del self._dead[:-1000]

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """The last dead letters kept in memory."""
        with self._lock:
            rows = [d for d in reversed(self._dead) if status is None or d.status == status]
        return rows[:limit]

    def release(self) -> None:
        """Nothing to release across processes."""

    def prune_delivered(self, now: float) -> None:
        """Nothing to prune here: :meth:`complete` bounds the delivered keys kept."""

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Nothing to remember: a memory spool serves one destination."""

    def endpoints(self) -> list[EndpointStatus]:
        """A memory spool holds one destination's records; nothing is stranded."""
        return []

    def pending(self, dest: str | None = None) -> int:
        """Records waiting."""
        with self._lock:
            return len(self._items)

    def stats(self) -> SpoolStats:
        """Counts."""
        now = time.time()
        with self._lock:
            oldest = min((i.created for i in self._items.values()), default=None)
            return SpoolStats(
                pending=len(self._items),
                in_flight=len(self._leased),
                dead_letters=len(self._dead),
                oldest_pending_age=None if oldest is None else now - oldest,
                size_bytes=sum(len(i.body) for i in self._items.values()),
            )

    def close(self) -> None:
        """Nothing to close."""
