"""What one delivery attempt means for its record: the whole retry policy as one function.

:func:`decide` takes what happened (an HTTP answer, or a failure before any answer), the
record's history, the endpoint's state, the policy and the clock, and returns a
:class:`Decision`: delivered, retry at a time (perhaps pausing every send until then),
or dead-letter with a status and reason. It does no I/O and keeps no state, so it is
tested with plain tables (``tests/test_decision.py``); the worker only applies it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import StrEnum

from paygent_otel.delivery.retry import Outcome, RetryPolicy, classify_status, parse_retry_after

__all__ = ["Answer", "Decision", "EndpointState", "Failure", "Verdict", "decide"]

_EXCERPT = 500
"""Characters of an answer's body kept in a dead letter or an error."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The endpoint answered."""

    status: int
    retry_after: str | None = None
    """The ``Retry-After`` header, as sent."""
    text: str = ""


@dataclass(frozen=True, slots=True)
class Failure:
    """No answer: the request failed before one came."""

    cause: str
    """The failure's class (an exception's name), for rate-limited reporting."""
    detail: str
    """The failure in words (``connection refused by host:443``)."""
    unreachable: bool = False
    """The connection could not be made: every other request would fail the same way."""


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What the worker knows of its endpoint when the answer came."""

    verified: bool = False
    """The endpoint accepted a record since the worker started: a 404 is about a record."""
    failures: int = 0
    """Endpoint-level failures in a row (unreachable, or answers saying it is wrong)."""


class Verdict(StrEnum):
    """What becomes of the record."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one attempt."""

    verdict: Verdict
    retry_at: float | None = None
    """When to try the record again (``RETRY``)."""
    pause_until: float | None = None
    """Send nothing at all before this time (throttling, or the endpoint's own trouble)."""
    status: str = ""
    """Dead-letter status: the HTTP status, or ``gave_up``."""
    cause: str = ""
    """The failure's class, for reporting (empty when delivered)."""
    detail: str = ""
    """The failure in full: the record's last error, or its dead-letter reason."""
    endpoint_problem: bool = False
    """The failure is the endpoint's (unreachable, key refused, wrong URL), not the record's."""
    misconfigured: bool = False
    """The key or the endpoint was refused: waiting without a fix cannot help."""


def decide(
    outcome: Answer | Failure,
    *,
    attempts: int,
    created: float,
    endpoint: EndpointState,
    url: str,
    policy: RetryPolicy,
    max_retry_seconds: float | None,
    now: float,
    rng: random.Random,
) -> Decision:
    """Decide the fate of a record after its ``attempts``-th attempt (counting this one).

    - 2xx: delivered.
    - 408, 425, 429, 5xx, timeouts, connection errors: retry with the record's backoff,
      keeping the key. ``Retry-After`` pauses every send until then (throttling is the
      client's, not one record's).
    - the endpoint's own trouble pauses every send, backing off by how many endpoint
      failures came in a row: unreachable; 401/403 (the key is refused: the policy's longest
      interval); 3xx, 405, and 404/410 before the endpoint accepted anything (a wrong URL:
      records stay pending instead of every one being dead-lettered).
    - any other 4xx (and 404/410 once the endpoint is known good): dead-letter.
    - past ``max_retry_seconds`` since the record was created: dead-letter as ``gave_up``.
    """
    if isinstance(outcome, Failure):
        delay = policy.delay(endpoint.failures + 1 if outcome.unreachable else attempts, rng)
        if outcome.unreachable:
            return _paused(outcome.cause, outcome.detail, delay, created, max_retry_seconds, now)
        return _retry(outcome.cause, outcome.detail, delay, None, created, max_retry_seconds, now)
    status = outcome.status
    kind = classify_status(status)
    if kind is Outcome.DELIVERED:
        return Decision(Verdict.DELIVERED)
    excerpt = outcome.text[:_EXCERPT]
    cause = f"HTTP {status}"
    if kind is Outcome.RETRY:
        retry_after = parse_retry_after(outcome.retry_after, now)
        delay = policy.delay(attempts, rng)
        if retry_after is None:
            detail = f"{cause}: {excerpt}"
            return _retry(cause, detail, delay, None, created, max_retry_seconds, now)
        cause += f" with Retry-After {retry_after:g} s"
        return _retry(
            cause, f"{cause}: {excerpt}", max(delay, retry_after), now + retry_after, created,
            max_retry_seconds, now,
        )  # fmt: skip
    if kind is Outcome.AUTH:
        detail = f"{cause}, the API key is not accepted ({excerpt}); delivery paused"
        decision = _paused(cause, detail, policy.max_interval, created, max_retry_seconds, now)
        return _misconfigured(decision)
    if kind is Outcome.ENDPOINT and not (endpoint.verified and status in (404, 410)):
        detail = _wrong_endpoint(cause, url, excerpt)
        delay = policy.delay(endpoint.failures + 1, rng)
        return _misconfigured(_paused(cause, detail, delay, created, max_retry_seconds, now))
    return Decision(Verdict.DEAD, status=str(status), cause=cause, detail=excerpt)


def _wrong_endpoint(cause: str, url: str, excerpt: str) -> str:
    return (
        f"{cause} for POST {url}: the endpoint looks wrong (it must be the API's base URL, "
        "for example https://cp-api.withpaygent.com; OTEL_EXPORTER_PAYGENT_ENDPOINT); "
        f"delivery paused, records kept. Answer: {excerpt[:200]}"
    )


def _retry(
    cause: str,
    detail: str,
    delay: float,
    pause_until: float | None,
    created: float,
    max_retry_seconds: float | None,
    now: float,
) -> Decision:
    if max_retry_seconds is not None and now - created >= max_retry_seconds:
        return Decision(Verdict.DEAD, status="gave_up", cause=cause, detail=detail)
    return Decision(
        Verdict.RETRY, retry_at=now + delay, pause_until=pause_until, cause=cause, detail=detail
    )


def _paused(
    cause: str,
    detail: str,
    delay: float,
    created: float,
    max_retry_seconds: float | None,
    now: float,
) -> Decision:
    """A retry of the endpoint's failure: every send waits as long as this record."""
    decision = _retry(cause, detail, delay, now + delay, created, max_retry_seconds, now)
    if decision.verdict is not Verdict.RETRY:
        return decision
    return replace(decision, endpoint_problem=True)


def _misconfigured(decision: Decision) -> Decision:
    if decision.verdict is not Verdict.RETRY:
        return decision
    return replace(decision, misconfigured=True)
