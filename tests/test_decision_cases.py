"""The retry decision, case by case: whole decisions, not only their verdicts.

Written from the survivors of ``make mutate`` (see ``docs/testing.md``): each test asserts
what the worker applies or reports -- the retry time drawn from the record's own random
source, the failure's cause, the full reason a paused delivery gives -- and what
``parse_retry_after`` makes of an HTTP-date without an explicit clock.
"""

from __future__ import annotations

import random
import time
from email.utils import formatdate

from paygent_otel.delivery.decision import Answer, Decision, EndpointState, Failure, Verdict, decide
from paygent_otel.delivery.retry import RetryPolicy, parse_retry_after

NOW = 1_800_000_000.0
URL = "https://paygent.test/api/v2/usage"
JITTERED = RetryPolicy(initial_interval=1.0, multiplier=2.0, max_interval=30.0, jitter=0.5)


def decided(outcome: Answer | Failure, attempts: int = 1, seed: int = 7) -> Decision:
    return decide(
        outcome,
        attempts=attempts,
        created=NOW - 5,
        endpoint=EndpointState(),
        url=URL,
        policy=JITTERED,
        max_retry_seconds=None,
        now=NOW,
        rng=random.Random(seed),
    )


def test_failure_before_an_answer_retries_with_the_records_own_random_draw() -> None:
    timeout = Failure("TimeoutError", "no answer within 10 s")
    decision = decided(timeout, attempts=3, seed=11)
    assert decision == Decision(
        Verdict.RETRY,
        retry_at=NOW + JITTERED.delay(3, random.Random(11)),
        cause="TimeoutError",
        detail="no answer within 10 s",
    )
    # The same source gives the same time: a replayed decision is reproducible.
    assert decided(timeout, attempts=3, seed=11) == decision


def test_wrong_endpoint_pause_gives_the_full_reason_with_200_characters_of_answer() -> None:
    text = "a" * 200 + "b" * 400
    decision = decided(Answer(404, None, text))
    delay = JITTERED.delay(1, random.Random(7))
    assert decision == Decision(
        Verdict.RETRY,
        retry_at=NOW + delay,
        pause_until=NOW + delay,
        cause="HTTP 404",
        detail=(
            f"HTTP 404 for POST {URL}: the endpoint looks wrong (it must be the API's base URL, "
            "for example https://cp-api.withpaygent.com; OTEL_EXPORTER_PAYGENT_ENDPOINT); "
            "delivery paused, records kept. Answer: " + "a" * 200
        ),
        endpoint_problem=True,
        misconfigured=True,
    )


def test_retry_after_date_without_a_clock_is_measured_from_now() -> None:
    header = formatdate(time.time() + 120, usegmt=True)
    seconds = parse_retry_after(header)
    assert seconds is not None and 110 <= seconds <= 120
