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
- ``collect_lines(stream)``: a list a daemon thread fills with a child process's output
  lines as they come.
- ``env_file_settings(path)``: the ``NAME=value`` lines of an env file, as a dict.
- ``USAGE_IDENTITY`` / ``STT_ATTRIBUTES``: a span record's complete identity and pricing,
  and a valid STT record with it (0.45 minutes).
- ``QuietHandler``: base of the loopback HTTP handlers tests run (no access log);
  ``self.reply(body, content_type)`` answers 200 with ``body``.
- ``stt_usage(key, seconds, origin)``: a spooled STT usage record (agent-voice, cust-1,
  deepgram nova-2) of ``seconds`` of audio, for tests that fill a spool directly.
- autouse ``isolated_env``: removes ``PAYGENT_*`` and ``OTEL_*`` variables and points
  ``XDG_STATE_HOME`` (the default spool folder) into ``tmp_path``, so the developer's own
  environment can neither change a result nor receive a test's spool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paygent_otel import PaygentSpanExporter
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.sandbox import SandboxServer

API_KEY = "pg_test_3f9c2a7d41b8e6a0"
"""The API key the fixtures configure; tests assert it never leaks into logs."""

USAGE_IDENTITY = {
    sc.AGENT_ID: "agent-support-voice",
    sc.CUSTOMER_ID: "cust_8812",
    sc.PROVIDER: "deepgram",
    sc.MODEL: "nova-2",
}
"""Who pays and how it is priced: everything a span record needs besides its usage."""
STT_ATTRIBUTES = {**USAGE_IDENTITY, sc.USAGE_KIND: "stt", sc.STT_AUDIO_MINUTES: 0.45}
"""A valid STT record as span attributes."""

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


def collect_lines(stream: IO[str]) -> list[str]:
    """A list that a daemon thread fills with ``stream``'s lines as they come, until EOF.

    Reading a child's pipe this way keeps the child from blocking on a full pipe.
    """
    lines: list[str] = []

    def pump() -> None:
        for line in stream:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def env_file_settings(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of an env file (blank lines and ``#`` comments skipped)."""
    settings = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name] = value
    return settings


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


def prometheus_sample(text: str, sample: str) -> float | None:
    """The value of one sample in Prometheus text (None when absent); ``sample`` is written as
    in the text, ``name{label="value",...}``, its labels in any order (prometheus-client
    writes them sorted, and values as floats)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = next(text_string_to_metric_families(f"{sample} 0\n")).samples[0]
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == wanted.name and found.labels == wanted.labels:
                return float(found.value)
    return None


@pytest.fixture
def bridge(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: ``bridge(spool_path=None, spool_max_bytes=None, **config)`` -> a started
    :class:`~paygent_otel.bridge.BridgeServer` delivering to ``sandbox`` (spool at
    ``tmp_path / "spool.sqlite3"`` unless given; ``config`` goes to ``BridgeConfig``);
    every bridge it started is stopped after the test, before the sandbox."""
    from paygent_otel import ExporterConfig
    from paygent_otel.bridge import BridgeApp, BridgeConfig, BridgeServer

    started: list[BridgeServer] = []

    def start(
        spool_path: str | Path | None = None, spool_max_bytes: int | None = None, **config: Any
    ) -> BridgeServer:
        exporter = ExporterConfig.resolve(
            None,
            endpoint=sandbox.url,
            api_key=API_KEY,
            spool_path=spool_path or tmp_path / "spool.sqlite3",
            spool_max_bytes=spool_max_bytes,
        )
        server = BridgeServer(
            BridgeApp(BridgeConfig(exporter=exporter, flush_timeout=2.0, **config))
        )
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class Serving:
    """A ``paygent-otel serve`` child process that printed its listening line."""

    process: subprocess.Popen[str]
    url: str
    """The URL of its listening line."""

    def stop(self, timeout: float = 60.0) -> str:
        """SIGTERM it; its whole output (stdout and stderr) once it exited."""
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=timeout)
        return output


@contextlib.contextmanager
def serving(*flags: str) -> Iterator[Serving]:
    """``paygent-otel serve --port 0 *flags`` in a child process (``PAYGENT_API_KEY`` set),
    once it prints its listening line; killed after the block if it still runs."""
    from paygent_otel._cli.serve import LISTENING_LINE_PREFIX

    command = [sys.executable, "-m", "paygent_otel._cli.main", "serve", "--port", "0", *flags]
    process = subprocess.Popen(
        command,
        env={**os.environ, "PAYGENT_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(LISTENING_LINE_PREFIX), line
        yield Serving(process, line.removeprefix(LISTENING_LINE_PREFIX).strip())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def partially_rejected(response: Any, count: int, *quoted: str) -> str:
    """Assert an OTLP/HTTP export answer (``httpx.Response``) 200 whose ``partial_success``
    counts ``count`` rejected items and quotes each of ``quoted``; its error message."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceResponse,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    answers = {
        "/v1/traces": (ExportTraceServiceResponse, "rejected_spans"),
        "/v1/metrics": (ExportMetricsServiceResponse, "rejected_data_points"),
        "/v1/logs": (ExportLogsServiceResponse, "rejected_log_records"),
    }
    message, field = answers[response.request.url.path]
    assert response.status_code == 200, response.content
    partial = message.FromString(response.content).partial_success
    assert getattr(partial, field) == count, partial
    for text in quoted:
        assert text in partial.error_message
    return str(partial.error_message)


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the loopback HTTP servers tests run: no access log, and :meth:`reply`."""

    def reply(self, body: bytes, content_type: str) -> None:
        """Answer 200 with ``body``."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


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
