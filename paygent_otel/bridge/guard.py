"""What keeps one client from taking the bridge from the others (no server dependency).

- :class:`MemoryBudget`: bytes that request bodies being read and inflated may hold together,
  shared by every request, so concurrency cannot multiply a per-request limit.
- :class:`TokenBuckets`: a request rate per bearer token.
- :class:`ConnectionGuard`: the open connections; at the limit a new one evicts the one that
  has waited longest without sending a complete request head, or is refused.
- :class:`RateLimitedLog`: a log line per kind of refusal at most every few seconds, with a
  count of the lines it held back, so an attack cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Final, Protocol

__all__ = [
    "LOG_INTERVAL_SECONDS",
    "BudgetExhausted",
    "BudgetHold",
    "ConnectionGuard",
    "Evictable",
    "MemoryBudget",
    "RateLimitedLog",
    "TokenBuckets",
]

LOG_INTERVAL_SECONDS: Final = 10.0
"""Shortest interval between two log lines of the same kind of refusal."""


class BudgetExhausted(Exception):
    """The shared memory budget cannot hold more bytes now (answered 503, retry later)."""


class MemoryBudget:
    """A byte budget shared by all requests. Thread-safe (inflation runs in worker threads)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Bytes held now."""
        return self._used

    def hold(self) -> BudgetHold:
        """A new, empty hold on the budget; release it when the request ends."""
        return BudgetHold(self)

    def _take(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.total:
                return False
            self._used += n
            return True

    def _give_back(self, n: int) -> None:
        with self._lock:
            self._used -= n


class BudgetHold:
    """What one request holds of a :class:`MemoryBudget`."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes; raises :class:`BudgetExhausted` when they do not fit."""
        if n <= 0:
            return
        if not self._budget._take(n):
            raise BudgetExhausted(
                f"the bridge's memory budget ({self._budget.total} bytes, --memory-budget) is "
                "held by other requests; retry later"
            )
        self.held += n

    def release(self) -> None:
        """Give everything back. Idempotent."""
        held, self.held = self.held, 0
        if held:
            self._budget._give_back(held)


class TokenBuckets:
    """``rate`` requests per second per key, with bursts of ``2 * rate``; 0 turns it off.

    Used from the event loop only.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._capacity = max(2.0 * rate, 1.0)
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def take(self, key: Hashable) -> float:
        """0 when a request for ``key`` may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, then = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0


class Evictable(Protocol):
    """A connection the guard may close to make room."""

    def evict(self) -> None:
        """Close the connection now (it has no request in progress)."""


CLOSE_REASONS = (
    "refused_max_connections",
    "evicted_waiting",
    "malformed_request",
    "header_timeout",
    "header_too_large",
    "body_timeout",
)
"""Why the bridge closes a connection; each is exported from 0 so rates and alerts see it."""


class ConnectionGuard:
    """Open connections, at most ``max_connections``; counts what was closed, by reason.

    A connection is *waiting* while it has no request in progress (just opened, idle between
    requests, or sending a request head). At the limit a new connection evicts the connection
    that has been waiting longest; when every connection has a request in progress, the new
    one is refused. Used from the event loop only.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._open: set[Evictable] = set()
        self._waiting: dict[Evictable, None] = {}  # insertion order: longest waiting first
        self.closed: Counter[str] = Counter(dict.fromkeys(CLOSE_REASONS, 0))
        """Connections closed or refused by the bridge, by reason."""

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._open)

    def admit(self, connection: Evictable) -> bool:
        """Register a new connection; False when it must be refused."""
        if len(self._open) >= self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:
                self.closed["refused_max_connections"] += 1
                return False
            self.forget(victim)
            self.closed["evicted_waiting"] += 1
            victim.evict()
        self._open.add(connection)
        self._waiting[connection] = None
        return True

    def waiting(self, connection: Evictable) -> None:
        """``connection`` has no request in progress (it becomes the newest waiting one)."""
        if connection in self._open:
            self._waiting.pop(connection, None)
            self._waiting[connection] = None

    def busy(self, connection: Evictable) -> None:
        """``connection`` sent a complete request head; it is not evicted until answered."""
        self._waiting.pop(connection, None)

    def forget(self, connection: Evictable) -> None:
        """``connection`` is closed."""
        self._open.discard(connection)
        self._waiting.pop(connection, None)


class RateLimitedLog:
    """Log each kind of line at most once per ``interval``, saying how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a line of this ``kind`` went out recently."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._held[kind] += 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            message += f" ({held} more like this in the last {self._interval:g} s not logged)"
        self._logger.log(level, message, *args)
