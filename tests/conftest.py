"""Shared test fixtures: a local Paygent, a real tracing pipeline into it, bounded waits.

- ``wait_for(predicate, timeout=..., message=...)``: poll until ``predicate()`` is truthy,
  return its value; fail the test at the deadline (never an unbounded wait).
- ``API_KEY``: the key every fixture sends (any non-empty key passes the default sandbox).
- ``sandbox`` fixture: a started :class:`~paygent_otel.sandbox.SandboxServer` with its ledger
  in ``tmp_path``; stopped after the test.
- ``tracing`` fixture (uses ``sandbox``): a factory ``tracing(resource=None,
  span_limits=None, **exporter_kwargs) -> Tracing`` that builds a real ``TracerProvider``
  + ``BatchSpanProcessor(PaygentSpanExporter(...))`` aimed at ``sandbox`` (durable spool in
  ``tmp_path``, unless overridden); everything it built is shut down after the test,
  before the sandbox stops. ``Tracing.flush()`` exports what ended and waits for delivery.
- ``sent_by_sdk(sandbox, call)``: run ``call(client)`` with a real ``paygent_sdk.Client``
  aimed at the sandbox, wait for its thread pool, return the bodies the SDK got recorded.
- ``ledger_bodies(sandbox, keyed=None)``: parsed request bodies the sandbox recorded;
  ``keyed=True`` only ours (they carry an Idempotency-Key), ``False`` only the SDK's.
- ``stt_usage(key, seconds, origin)``: a spooled STT usage record (agent-voice, cust-1,
  deepgram nova-2) of ``seconds`` of audio, for tests that fill a spool directly.
- autouse ``isolated_env``: removes ``PAYGENT_*`` and ``OTEL_*`` variables and points
  ``XDG_STATE_HOME`` (the default spool folder) into ``tmp_path``, so the developer's own
  environment can neither change a result nor receive a test's spool.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paygent_otel import PaygentSpanExporter
from paygent_otel._mapping import UsageRecord
from paygent_otel.sandbox import SandboxServer

API_KEY = "pg_test_3f9c2a7d41b8e6a0"
"""The API key the fixtures configure; tests assert it never leaks into logs."""

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, message: str = "", interval: float = 0.01
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Fails the test with ``message`` (and the last value seen) once ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout:g} s: {message or predicate!r} (last: {value!r})"
            )
        time.sleep(interval)


def ledger_bodies(sandbox: SandboxServer, keyed: bool | None = None) -> list[dict[str, Any]]:
    """Parsed bodies of the recorded usage rows, oldest first.

    The exporters send an ``Idempotency-Key``, paygent-sdk never does: ``keyed`` selects.
    """
    return [
        json.loads(row["body"])
        for row in sandbox.ledger.rows()
        if keyed is None or (row["idempotency_key"] is not None) is keyed
    ]


def sent_by_sdk(sandbox: SandboxServer, call: Callable[[Any], object]) -> list[dict[str, Any]]:
    """Run ``call(client)`` on a real paygent-sdk client aimed at ``sandbox``; then return
    every body the SDK got recorded in that sandbox so far (parsed).

    The SDK posts from its own thread pool and reports nothing back; draining that pool
    (each post is bounded by the SDK's 10 s timeout) means every send has finished.
    """
    import paygent_sdk

    client = paygent_sdk.Client(API_KEY)
    client.base_url = sandbox.url
    call(client)
    client._executor.shutdown(wait=True)
    client.session.close()
    return ledger_bodies(sandbox, keyed=False)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PAYGENT_*/OTEL_* from the outside; the default spool folder lives in tmp_path."""
    for name in list(os.environ):
        if name.startswith(("PAYGENT_", "OTEL_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    """A local Paygent on a loopback port, ledger at ``tmp_path / "ledger.sqlite3"``."""
    server = SandboxServer(tmp_path / "ledger.sqlite3")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Tracing:
    """A real SDK tracing pipeline whose only processor feeds a :class:`PaygentSpanExporter`."""

    provider: TracerProvider
    tracer: Tracer
    exporter: PaygentSpanExporter

    def flush(self, timeout: float = 10.0) -> None:
        """Export every ended span, then wait until the exporter has delivered its records."""
        assert self.provider.force_flush(int(timeout * 1000)), "span processor flush timed out"
        assert self.exporter.force_flush(int(timeout * 1000)), (
            f"delivery flush timed out: {self.exporter.stats}"
        )

    def shutdown(self) -> None:
        """Shut the provider (and so the processor and exporter) down; idempotent."""
        self.provider.shutdown()


@pytest.fixture
def tracing(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Callable[..., Tracing]]:
    """Factory: ``tracing(resource=None, span_limits=None, **exporter_kwargs)`` -> Tracing.

    Exporter defaults: ``endpoint`` = the ``sandbox`` fixture's URL, ``api_key`` =
    :data:`API_KEY`, a fresh durable spool in ``tmp_path``. ``resource`` becomes the
    provider's resource attributes. At teardown each exporter gets at most 2 s to deliver.
    """
    built: list[Tracing] = []

    def build(
        resource: dict[str, Any] | None = None,
        span_limits: SpanLimits | None = None,
        **exporter_kwargs: Any,
    ) -> Tracing:
        exporter_kwargs.setdefault("endpoint", sandbox.url)
        exporter_kwargs.setdefault("api_key", API_KEY)
        exporter_kwargs.setdefault("spool_path", tmp_path / f"spool-{len(built)}.sqlite3")
        exporter = PaygentSpanExporter(**exporter_kwargs)
        provider = TracerProvider(resource=Resource.create(resource or {}), span_limits=span_limits)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        result = Tracing(provider, provider.get_tracer("paygent-otel-tests"), exporter)
        built.append(result)
        return result

    yield build
    for pipeline in built:
        pipeline.provider.force_flush(2000)
        # Bounded: the processor would give the exporter its default 10 s.
        pipeline.exporter.shutdown(timeout_millis=2000)
        pipeline.shutdown()


def stt_usage(key: str, seconds: float, origin: str) -> UsageRecord:
    """A spooled STT usage record of ``seconds`` of audio for cust-1, keyed ``key``."""
    payload = {
        "agentId": "agent-voice",
        "customerId": "cust-1",
        "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": seconds},
    }  # fmt: skip
    return UsageRecord(key, payload, origin)
