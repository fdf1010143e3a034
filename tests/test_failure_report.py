"""Delivery failures are said once, then summarised at most every 30 s (a fake clock)."""

from __future__ import annotations

import logging

import pytest

from paygent_otel.delivery.reporting import SUMMARY_INTERVAL_SECONDS, FailureReport

LOGGER = "paygent_otel.tests.failures"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, waiting: int = 7) -> FailureReport:
    return FailureReport(
        logging.getLogger(LOGGER), "traces", "https://paygent.test/api/v2/usage",
        lambda: waiting, clock,
    )  # fmt: skip


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_the_first_failure_is_a_warning_with_what_waits_and_when_the_next_try_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    report = make(Clock())
    with caplog.at_level(logging.WARNING, LOGGER):
        report.failed("HTTP 503", "HTTP 503: overloaded", 8.2)

    assert lines(caplog) == [
        "traces: cannot deliver usage to https://paygent.test/api/v2/usage: HTTP 503: "
        "overloaded. 7 records wait in the spool; next try in 8 s"
    ]
    assert caplog.records[0].levelno == logging.WARNING
    assert report.last_error == "HTTP 503: overloaded"


def test_repeats_are_summarised_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    report = make(clock)
    with caplog.at_level(logging.WARNING, LOGGER):
        for _ in range(50):
            report.failed("ConnectionRefused", "connection refused by paygent.test:443", 2.0)
            clock.now += 1.0
    said = lines(caplog)

    # 50 failures over 50 s: the first line, then one summary when 30 s had passed.
    assert len(said) == 2
    assert said[1].startswith("traces: still cannot deliver usage to")
    assert f"(30 failed attempts in the last {SUMMARY_INTERVAL_SECONDS:.0f} s)" in said[1]


def test_a_new_kind_of_failure_is_said_at_once_and_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    report = make(Clock())
    with caplog.at_level(logging.WARNING, LOGGER):
        report.failed("HTTP 503", "HTTP 503: overloaded", 1.0)
        report.failed("HTTP 401", "HTTP 401, the API key is not accepted", 30.0)
        report.recovered()
        report.recovered()

    said = lines(caplog)
    assert len(said) == 3
    assert "HTTP 401, the API key is not accepted" in said[1]
    assert said[2] == (
        "traces: delivery to https://paygent.test/api/v2/usage works again "
        "(it had failed: HTTP 401)"
    )
    assert report.last_error is None
