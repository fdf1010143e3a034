"""Sampling never loses usage: UsageSampler + UsageSpanProcessor under a 10% ratio sampler.

A real OTLP/HTTP exporter (``OTLPSpanExporter`` under ``BatchSpanProcessor``) sends to a
small local OTLP receiver that decodes every request, so the test counts exactly which
spans the tracing backend got, while the sandbox ledger shows what was billed.
"""

from __future__ import annotations

import gzip
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, QuietHandler, wait_for
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from paygent_otel import PaygentSpanExporter, record_stt
from paygent_otel._cli.sampled_demo import run_sampled_service_demo
from paygent_otel.convention import semconv as sc
from paygent_otel.recording.sampling import UsageSampler, UsageSpanProcessor
from paygent_otel.sandbox import SandboxServer

AGENT = "agent-sampled"
CUSTOMER = "cust_8812"
TRACES = 200
RATIO = 0.1
SEED = 7
"""The trace id seed of the ratio-sampled service: it gives a usual tenth."""


class SeededIds(IdGenerator):
    """Random ids from a fixed seed, so which traces the ratio sampler keeps is fixed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver on loopback: decodes and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            spans.extend(
                                {
                                    "trace_id": int.from_bytes(s.trace_id, "big"),
                                    "name": s.name,
                                }
                                for s in scope_spans.spans
                            )
                self.reply(
                    ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def processor(self) -> BatchSpanProcessor:
        """A tracing backend's processor: batches sampled spans to this receiver."""
        return BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


def run_service(provider: TracerProvider) -> tuple[int, int]:
    """TRACES requests, each with a TTS record on the root and an STT record on a child.

    Returns (records the helpers wrote, characters written on recording spans)."""
    tracer = provider.get_tracer("service")
    written = characters = 0
    for i in range(1, TRACES + 1):
        with tracer.start_as_current_span("handle-call") as root:
            root.set_attributes(
                {
                    sc.USAGE_KIND: "tts",
                    sc.CUSTOMER_ID: CUSTOMER,
                    sc.PROVIDER: "elevenlabs",
                    sc.MODEL: "eleven_flash_v2_5",
                    sc.TTS_CHARACTERS: i,
                }
            )
            if root.is_recording():
                written += 1
                characters += i
            with tracer.start_as_current_span("transcribe"):
                written += record_stt(
                    None,
                    CUSTOMER,
                    "voice-minutes",
                    service_provider="deepgram",
                    model="nova-2",
                    audio_seconds=6.0,
                )
    return written, characters


@contextmanager
def usage_service(
    sandbox: SandboxServer,
    tmp_path: Path,
    sampler: Sampler,
    processor: Callable[[PaygentSpanExporter], SpanProcessor],
    *,
    backend: SpanProcessor | None = None,
    resource: dict[str, Any] | None = None,
    seeded: bool = False,
    **exporter_args: Any,
) -> Iterator[tuple[TracerProvider, PaygentSpanExporter]]:
    """A service's provider with ``sampler``, the tracing ``backend`` (first, when given)
    and ``processor`` feeding a Paygent exporter at ``sandbox``; trace ids from
    ``SeededIds(SEED)`` when ``seeded``. Flushed (asserted) and shut down on exit."""
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create(resource or {sc.AGENT_ID: AGENT}),
        id_generator=SeededIds(SEED) if seeded else None,
    )
    if backend is not None:
        provider.add_span_processor(backend)
    exporter = PaygentSpanExporter(
        endpoint=sandbox.url,
        api_key=API_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        **exporter_args,
    )
    provider.add_span_processor(processor(exporter))
    try:
        yield provider, exporter
        assert provider.force_flush(10_000)
        assert exporter.force_flush(10_000), exporter.stats
    finally:
        provider.shutdown()


@contextmanager
def unsampled_service(
    sandbox: SandboxServer, tmp_path: Path, otlp: OtlpReceiver, **service_args: Any
) -> Iterator[TracerProvider]:
    """:func:`usage_service` under ``UsageSampler(ALWAYS_OFF)``: nothing is sampled, the
    receiver ``otlp`` is the tracing backend, usage goes through a UsageSpanProcessor."""
    with usage_service(
        sandbox,
        tmp_path,
        UsageSampler(ALWAYS_OFF),
        UsageSpanProcessor,
        backend=otlp.processor(),
        **service_args,
    ) as (provider, _):
        yield provider


def sampled_by_ratio(seed: int) -> set[int]:
    """The trace ids TraceIdRatioBased(RATIO) samples among the ids SeededIds(seed) makes."""
    ids = SeededIds(seed)
    sampler = TraceIdRatioBased(RATIO)
    sampled = set()
    for _ in range(TRACES):
        trace_id = ids.generate_trace_id()
        ids.generate_span_id()  # root
        ids.generate_span_id()  # child
        if sampler.should_sample(None, trace_id, "x").decision is Decision.RECORD_AND_SAMPLE:
            sampled.add(trace_id)
    return sampled


def test_ratio_sampled_service_bills_all_usage_and_otlp_still_gets_only_the_sampled_tenth(
    sandbox: SandboxServer, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    with usage_service(
        sandbox,
        tmp_path,
        UsageSampler(ParentBased(TraceIdRatioBased(RATIO))),
        UsageSpanProcessor,
        backend=otlp.processor(),
        seeded=True,
    ) as (provider, exporter):
        written, characters = run_service(provider)

    # Billed: every record of every trace, sampled or not.
    assert written == 2 * TRACES
    assert characters == TRACES * (TRACES + 1) // 2
    wait_for(lambda: sandbox.ledger.count() == 2 * TRACES, message="all usage billed")
    totals = {row["kind"]: row for row in sandbox.ledger.totals(by=("customer_id", "kind"))}
    assert totals["tts"]["calls"] == TRACES and totals["tts"]["characters"] == characters
    assert totals["stt"]["calls"] == TRACES
    assert totals["stt"]["audio_minutes"] == pytest.approx(TRACES * 0.1)
    assert exporter.stats["delivered"] == 2 * TRACES

    # Traced: exactly the traces the ratio sampler picked, both spans of each, no others.
    expected = sampled_by_ratio(SEED)
    assert 0.05 * TRACES <= len(expected) <= 0.15 * TRACES  # the seed gives a usual tenth
    received = otlp.spans
    assert {s["trace_id"] for s in received} == expected
    assert len(received) == 2 * len(expected)


def test_without_it_a_ratio_sampler_bills_only_the_sampled_traces(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    with usage_service(
        sandbox, tmp_path, ParentBased(TraceIdRatioBased(RATIO)), BatchSpanProcessor, seeded=True
    ) as (provider, _):
        written, _ = run_service(provider)
    kept = len(sampled_by_ratio(SEED))
    assert written == 2 * kept < 2 * TRACES
    assert sandbox.ledger.count() == 2 * kept


def test_unsampled_spans_record_but_propagate_not_sampled() -> None:
    provider = TracerProvider(sampler=UsageSampler(ALWAYS_OFF))
    tracer = provider.get_tracer("service")
    with tracer.start_as_current_span("edge", attributes={sc.CUSTOMER_ID: CUSTOMER}) as span:
        assert span.is_recording()
        assert span.attributes == {sc.CUSTOMER_ID: CUSTOMER}  # start attributes kept
        assert not span.get_span_context().trace_flags.sampled
        headers: dict[str, str] = {}
        inject(headers)
    trace_flags = int(headers["traceparent"].rsplit("-", 1)[1], 16)
    assert trace_flags & 0x01 == 0  # the sampled bit; 0x02 (random trace id) may be set
    provider.shutdown()


def test_the_root_sampler_decides_what_is_sampled() -> None:
    sampler = UsageSampler(ALWAYS_ON)
    assert sampler.should_sample(None, 1, "x").decision is Decision.RECORD_AND_SAMPLE
    assert UsageSampler(ALWAYS_OFF).should_sample(None, 1, "x").decision is Decision.RECORD_ONLY
    assert sampler.get_description() == "UsageSampler{AlwaysOnSampler}"


def test_unsampled_gen_ai_spans_are_billed_when_the_exporter_maps_them(
    sandbox: SandboxServer, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    with unsampled_service(sandbox, tmp_path, otlp, genai=True) as provider:
        tracer = provider.get_tracer("service")
        tracer.start_span(
            "realtime",
            attributes={
                sc.CUSTOMER_ID: CUSTOMER,
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-realtime",
                "gen_ai.usage.input_tokens": 900,
                "gen_ai.usage.audio.input_tokens": 900,
            },
        ).end()
        tracer.start_span("no-usage").end()
    rows = wait_for(sandbox.ledger.rows)
    assert [row["usage_metadata"] for row in rows] == [
        {"schemaVersion": 1, "input": {"audio": {"tokens": 900}}}
    ]
    assert otlp.spans == []


def test_unsampled_framework_spans_are_billed_when_the_exporter_reads_the_framework(
    sandbox: SandboxServer, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    resource = {sc.AGENT_ID: AGENT, sc.CUSTOMER_ID: CUSTOMER}
    with unsampled_service(
        sandbox, tmp_path, otlp, resource=resource, frameworks=("pipecat",)
    ) as provider:
        # What Pipecat's traced TTS service leaves on its span (tracer name "pipecat").
        provider.get_tracer("pipecat").start_span(
            "tts",
            attributes={
                "metrics.character_count": 42,
                "gen_ai.provider.name": "elevenlabs",
                "gen_ai.request.model": "eleven_turbo_v2",
            },
        ).end()
    rows = wait_for(sandbox.ledger.rows)
    assert [(row["customer_id"], row["characters"]) for row in rows] == [(CUSTOMER, 42)]
    assert otlp.spans == []


def test_demo_function_bills_every_request(sandbox: SandboxServer, tmp_path: Path) -> None:
    stats = run_sampled_service_demo(
        sandbox.url, tmp_path / "spool.sqlite3", api_key=API_KEY, requests=40
    )
    assert stats["usage_spans_recorded"] == 40 and stats["delivered"] == 40
    assert stats["spans_sampled_to_backend"] < 2 * 40
    assert sandbox.ledger.count() == 40
