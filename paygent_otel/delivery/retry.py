"""What to do with a tracking response: deliver, retry (when), or give up for good."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum

__all__ = [
    "AUTH_STATUSES",
    "ENDPOINT_STATUSES",
    "RETRYABLE_STATUSES",
    "Outcome",
    "RetryPolicy",
    "classify_status",
    "parse_retry_after",
]

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses after which the request may not have been billed: retried with the same key.
Other 5xx are retried too (see :func:`classify_status`)."""

AUTH_STATUSES = frozenset({401, 403})
"""The API key is wrong: every record would fail the same way, so delivery pauses and
records stay pending (never dead-lettered for a credential problem)."""

ENDPOINT_STATUSES = frozenset({301, 302, 303, 307, 308, 404, 405, 410})
"""Answers that point at a wrong endpoint (a path Paygent does not serve, a redirect from
``http`` to ``https``) rather than at one record: until this endpoint has accepted a record,
delivery pauses and records stay pending instead of every one being dead-lettered."""

MAX_RETRY_AFTER = 3600.0
"""Longest ``Retry-After`` honoured, in seconds; a longer one is capped."""


class Outcome(StrEnum):
    """Classification of one delivery attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    AUTH = "auth"
    ENDPOINT = "endpoint"
    REJECTED = "rejected"


def classify_status(status: int) -> Outcome:
    """2xx delivered; 408/425/429/5xx retried; 401/403 pause; 3xx/404/405/410 point at the
    endpoint; any other 4xx rejected."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome.RETRY
    if status in AUTH_STATUSES:
        return Outcome.AUTH
    if status in ENDPOINT_STATUSES or 300 <= status < 400:
        return Outcome.ENDPOINT
    return Outcome.REJECTED


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            # The asctime form carries no zone; every HTTP-date is GMT (RFC 9110 5.6.7).
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter, as the Collector's exporterhelper does it."""

    initial_interval: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 30.0
    jitter: float = 0.5
    """Randomization factor: a delay d becomes uniform in [d*(1-j), d*(1+j)]."""

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before attempt ``attempt + 1``, where ``attempt`` >= 1 failed already."""
        try:
            grown = self.initial_interval * self.multiplier ** max(attempt - 1, 0)
        except OverflowError:
            # No time limit by default: after ~1000 failed attempts the power overflows.
            grown = math.inf
        base = min(grown, self.max_interval)
        spread = base * self.jitter
        return max(0.0, (rng or random).uniform(base - spread, base + spread))
