"""The worker's retry rules through the runtime HTTP stack (aiohttp) against a real server.

No injected transport here: the pipeline posts with the same sender production uses, to the
sandbox, whose request log says when each request arrived and what it was answered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, wait_for

from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.sandbox import SandboxServer


def usage(i: int) -> UsageRecord:
    payload = {
        "agentId": "agent-voice",
        "customerId": f"cust-{i}",
        "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": 1.0},
    }  # fmt: skip
    return UsageRecord(f"runtime-key-{i:04d}", payload, f"test record {i}")


def pipeline_for(
    tmp_path: Path, endpoint: str, policy: RetryPolicy, **settings: Any
) -> DeliveryPipeline:
    config = ExporterConfig.resolve(
        "traces",
        endpoint=endpoint,
        api_key=API_KEY,
        spool_path=str(tmp_path / "spool.sqlite3"),
        **settings,
    )
    return DeliveryPipeline(config, name="traces", retry_policy=policy)


def test_retry_after_from_the_server_holds_every_send_until_its_time(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    sandbox.set_faults(fail_rate=1.0, fail_status=429, retry_after=2)
    # A policy far shorter than Retry-After: only the header can explain a 2 s gap.
    fast = RetryPolicy(initial_interval=0.02, max_interval=0.05)
    pipeline = pipeline_for(tmp_path, sandbox.url, fast, max_in_flight=1)
    try:
        pipeline.submit([usage(1), usage(2), usage(3)])
        wait_for(sandbox.ledger.request_log, message="a first request")
        sandbox.set_faults(fail_rate=0.0)
        assert pipeline.force_flush(15)
        log = sandbox.ledger.request_log()
    finally:
        pipeline.shutdown(2)

    first = log[0]
    assert (first["status"], first["outcome"]) == (429, "injected_failure")
    gap = log[1]["received_at"] - first["received_at"]
    assert gap >= 1.9, f"the next request came {gap:.3f} s after Retry-After: 2"
    assert len(sandbox.ledger.rows()) == 3


def test_an_unreachable_endpoint_is_probed_by_one_request_at_a_time(
    tmp_path: Path, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(initial_interval=0.05, max_interval=0.2, jitter=0.0)
    endpoint = sandbox.url
    sandbox.stop()  # an outage: connections are refused
    pipeline = pipeline_for(tmp_path, endpoint, policy)
    try:
        pipeline.submit([usage(i) for i in range(30)])
        time.sleep(2.5)
        attempts = pipeline.stats.snapshot().get("retried", 0)
        # The first lease sends all 30; then one probe per backoff interval (0.05, 0.1,
        # 0.2, 0.2, ... s): about 13 more in 2.5 s. Without the pause the probes would go
        # as fast as connections are refused (thousands); without probing, all 30 would go
        # at every interval (hundreds).
        assert 30 < attempts <= 60, attempts
        assert pipeline.spool.pending() == 30

        sandbox.start()  # back on the same port
        assert pipeline.force_flush(15)
    finally:
        pipeline.shutdown(2)
    assert len(sandbox.ledger.rows()) == 30
    said = [r.getMessage() for r in caplog.records if r.name == "paygent_otel.delivery"]
    assert f"connection refused by 127.0.0.1:{sandbox.port}" in said[0]
    assert said[-1].endswith("works again (it had failed: ClientConnectorError)")


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retryable_answers_are_retried_with_the_same_key_until_accepted(
    tmp_path: Path, sandbox: SandboxServer, status: int
) -> None:
    sandbox.set_faults(fail_rate=1.0, fail_status=status)
    fast = RetryPolicy(initial_interval=0.02, max_interval=0.05)
    pipeline = pipeline_for(tmp_path, sandbox.url, fast)
    try:
        pipeline.submit([usage(1)])
        wait_for(lambda: len(sandbox.ledger.request_log()) >= 3, message="three refused tries")
        sandbox.set_faults(fail_rate=0.0)
        assert pipeline.force_flush(15)
        log = sandbox.ledger.request_log()
    finally:
        pipeline.shutdown(2)

    assert {r["idempotency_key"] for r in log} == {"runtime-key-0001"}
    assert [r["status"] for r in log[:3]] == [status] * 3 and log[-1]["status"] == 200
    assert sandbox.ledger.keys() == ["runtime-key-0001"]
    assert pipeline.stats.snapshot()["retried"] == len(log) - 1


def test_an_answer_later_than_the_timeout_is_retried_with_the_same_key(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    sandbox.set_faults(latency_ms=1_000)
    fast = RetryPolicy(initial_interval=0.02, max_interval=0.05)
    pipeline = pipeline_for(tmp_path, sandbox.url, fast, timeout=0.2)
    try:
        pipeline.submit([usage(1)])
        wait_for(lambda: pipeline.stats.snapshot().get("retried", 0) >= 1, message="a timeout")
        sandbox.set_faults(latency_ms=0)
        assert pipeline.force_flush(15)
    finally:
        pipeline.shutdown(2)
    # The timed-out request is not in the request log (the client hung up): the ledger
    # holds the one record, once.
    assert sandbox.ledger.keys() == ["runtime-key-0001"]


def test_a_definitive_rejection_is_dead_lettered_and_not_retried(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    sandbox.set_faults(reject_rate=1.0)
    pipeline = pipeline_for(tmp_path, sandbox.url, RetryPolicy(initial_interval=0.02))
    try:
        pipeline.submit([usage(1)])
        assert pipeline.force_flush(15)
        dead = pipeline.spool.dead_letters()
    finally:
        pipeline.shutdown(2)
    assert len(sandbox.ledger.request_log()) == 1
    assert [(d.status, "sandbox injected rejection" in d.reason) for d in dead] == [("400", True)]
