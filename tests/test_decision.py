"""The retry policy as a table: what one attempt's outcome means for its record.

``decide`` is a pure function of (outcome, record history, endpoint state, policy, clock,
random source): no threads, sleeps or servers here. The worker that applies it is tested
end to end through the runtime HTTP stack against a real server (test_retry_policy.py,
test_real_world_delivery.py).
"""

from __future__ import annotations

import random

import pytest

from paygent_otel.delivery.decision import Answer, Decision, EndpointState, Failure, Verdict, decide
from paygent_otel.delivery.retry import RetryPolicy

NOW = 1_800_000_000.0
URL = "https://paygent.test/api/v2/usage"
NO_JITTER = RetryPolicy(initial_interval=1.0, multiplier=2.0, max_interval=30.0, jitter=0.0)
FRESH = EndpointState()
KNOWN_GOOD = EndpointState(verified=True)
REFUSED = Failure("ClientConnectorError", "connection refused by paygent.test:443", True)
TIMEOUT = Failure("TimeoutError", "no answer within 10 s")


def decided(
    outcome: Answer | Failure,
    attempts: int = 1,
    endpoint: EndpointState = FRESH,
    max_retry_seconds: float | None = None,
    created: float = NOW - 5,
) -> Decision:
    return decide(
        outcome,
        attempts=attempts,
        created=created,
        endpoint=endpoint,
        url=URL,
        policy=NO_JITTER,
        max_retry_seconds=max_retry_seconds,
        now=NOW,
        rng=random.Random(7),
    )


# (outcome, attempts, endpoint) -> (verdict, retry in s, pause for s, status, misconfigured)
TABLE = [
    (Answer(200), 1, FRESH, (Verdict.DELIVERED, None, None, "", False)),
    (Answer(299), 1, FRESH, (Verdict.DELIVERED, None, None, "", False)),
    (Answer(300), 1, KNOWN_GOOD, (Verdict.RETRY, 1.0, 1.0, "", True)),  # a redirect: config
    (Answer(410), 1, FRESH, (Verdict.RETRY, 1.0, 1.0, "", True)),
    (Answer(410), 1, KNOWN_GOOD, (Verdict.DEAD, None, None, "410", False)),
    (Answer(500), 1, FRESH, (Verdict.RETRY, 1.0, None, "", False)),
    (Answer(499), 1, FRESH, (Verdict.DEAD, None, None, "499", False)),
    (Answer(202), 9, FRESH, (Verdict.DELIVERED, None, None, "", False)),
    # the record's own backoff, nobody else waits
    (Answer(503, None, "busy"), 1, FRESH, (Verdict.RETRY, 1.0, None, "", False)),
    (Answer(500), 3, FRESH, (Verdict.RETRY, 4.0, None, "", False)),
    (Answer(429), 20, FRESH, (Verdict.RETRY, 30.0, None, "", False)),
    (TIMEOUT, 2, FRESH, (Verdict.RETRY, 2.0, None, "", False)),
    # Retry-After pauses everyone for its time; the record waits at least that long
    (Answer(429, "7"), 1, FRESH, (Verdict.RETRY, 7.0, 7.0, "", False)),
    (Answer(503, "0.5"), 3, FRESH, (Verdict.RETRY, 4.0, 0.5, "", False)),
    # the endpoint's trouble pauses everyone, backing off by the endpoint's failures
    (REFUSED, 1, FRESH, (Verdict.RETRY, 1.0, 1.0, "", False)),
    (REFUSED, 1, EndpointState(failures=3), (Verdict.RETRY, 8.0, 8.0, "", False)),
    (Answer(401, None, "bad key"), 1, FRESH, (Verdict.RETRY, 30.0, 30.0, "", True)),
    (Answer(403), 5, KNOWN_GOOD, (Verdict.RETRY, 30.0, 30.0, "", True)),
    (Answer(404), 1, FRESH, (Verdict.RETRY, 1.0, 1.0, "", True)),
    (Answer(308), 1, KNOWN_GOOD, (Verdict.RETRY, 1.0, 1.0, "", True)),
    (Answer(405), 1, EndpointState(failures=2), (Verdict.RETRY, 4.0, 4.0, "", True)),
    # once the endpoint accepted a record, a 404 is about this record
    (Answer(404, None, "no customer"), 1, KNOWN_GOOD, (Verdict.DEAD, None, None, "404", False)),
    (Answer(400, None, "bad"), 1, FRESH, (Verdict.DEAD, None, None, "400", False)),
    (Answer(422), 4, KNOWN_GOOD, (Verdict.DEAD, None, None, "422", False)),
]  # fmt: skip


@pytest.mark.parametrize(("outcome", "attempts", "endpoint", "expected"), TABLE)
def test_decision_table(
    outcome: Answer | Failure,
    attempts: int,
    endpoint: EndpointState,
    expected: tuple[Verdict, float | None, float | None, str, bool],
) -> None:
    d = decided(outcome, attempts, endpoint)
    verdict, retry_in, pause_for, status, misconfigured = expected
    assert d.verdict is verdict
    assert (None if d.retry_at is None else d.retry_at - NOW) == retry_in
    assert (None if d.pause_until is None else d.pause_until - NOW) == pause_for
    assert d.status == status
    assert d.misconfigured is misconfigured
    assert d.endpoint_problem is (pause_for is not None and "Retry-After" not in d.cause)


def test_reasons_name_the_status_and_keep_an_excerpt_of_the_answer() -> None:
    long = "x" * 2000
    dead = decided(Answer(400, None, long))
    assert (dead.cause, dead.detail) == ("HTTP 400", "x" * 500)

    throttled = decided(Answer(429, "7", "slow down"))
    assert throttled.cause == "HTTP 429 with Retry-After 7 s"
    assert throttled.detail == "HTTP 429 with Retry-After 7 s: slow down"

    wrong = decided(Answer(404, None, "Not Found"))
    assert f"HTTP 404 for POST {URL}: the endpoint looks wrong" in wrong.detail
    assert "OTEL_EXPORTER_PAYGENT_ENDPOINT" in wrong.detail

    refused = decided(REFUSED)
    assert (refused.cause, refused.detail) == (REFUSED.cause, REFUSED.detail)


@pytest.mark.parametrize("outcome", [Answer(503), REFUSED, Answer(401), Answer(404), TIMEOUT])
def test_past_the_time_limit_a_retry_becomes_a_gave_up_dead_letter(
    outcome: Answer | Failure,
) -> None:
    d = decided(outcome, max_retry_seconds=60, created=NOW - 61)
    assert (d.verdict, d.status) == (Verdict.DEAD, "gave_up")
    assert d.detail


def test_within_the_time_limit_it_is_retried() -> None:
    assert decided(Answer(503), max_retry_seconds=60, created=NOW - 59).verdict is Verdict.RETRY


def test_the_time_limit_is_reached_at_exactly_its_length() -> None:
    d = decided(Answer(503), max_retry_seconds=60, created=NOW - 60)
    assert (d.verdict, d.status, d.cause) == (Verdict.DEAD, "gave_up", "HTTP 503")


def test_a_retry_after_date_is_read_against_the_given_clock() -> None:
    from datetime import UTC, datetime
    from email.utils import format_datetime

    header = format_datetime(datetime.fromtimestamp(NOW + 20, UTC), usegmt=True)
    d = decided(Answer(429, header))
    assert d.pause_until == NOW + 20
    # ...and the time limit still applies to a throttled record.
    late = decided(Answer(429, header), max_retry_seconds=60, created=NOW - 61)
    assert late.status == "gave_up"


@pytest.mark.parametrize("outcome", [Answer(503), REFUSED, Answer(404)])
def test_every_backoff_draws_its_jitter_from_the_given_random_source(
    outcome: Answer | Failure,
) -> None:
    policy = RetryPolicy(initial_interval=1.0, max_interval=30.0, jitter=0.5)

    def retry_at(seed: int) -> float | None:
        return decide(
            outcome, attempts=1, created=NOW, endpoint=FRESH, url=URL, policy=policy,
            max_retry_seconds=None, now=NOW, rng=random.Random(seed),
        ).retry_at  # fmt: skip

    assert retry_at(1) == retry_at(1)
    assert len({retry_at(seed) for seed in range(10)}) > 5


def test_a_definitive_rejection_is_dead_even_past_the_time_limit_with_its_own_status() -> None:
    d = decided(Answer(400), max_retry_seconds=60, created=NOW - 600)
    assert (d.verdict, d.status) == (Verdict.DEAD, "400")


def test_jitter_comes_from_the_given_random_source() -> None:
    policy = RetryPolicy(initial_interval=1.0, max_interval=30.0, jitter=0.5)
    delays = {
        decide(
            Answer(503), attempts=1, created=NOW, endpoint=FRESH, url=URL, policy=policy,
            max_retry_seconds=None, now=NOW, rng=random.Random(seed),
        ).retry_at
        for seed in range(20)
    }  # fmt: skip
    assert len(delays) > 10
    assert all(NOW + 0.5 <= d <= NOW + 1.5 for d in delays if d is not None)
