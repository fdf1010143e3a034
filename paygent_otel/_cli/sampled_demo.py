"""The demo's sampled-service route: a service that samples 10% of its traces bills all
of its usage (:class:`~paygent_otel.recording.sampling.UsageSampler` with
:class:`~paygent_otel.recording.sampling.UsageSpanProcessor`). ``make demo`` runs it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from paygent_otel.convention import semconv as sc
from paygent_otel.exporters.trace import PaygentSpanExporter
from paygent_otel.recording.helpers import record_stt
from paygent_otel.recording.sampling import UsageSampler, UsageSpanProcessor

__all__ = ["run_sampled_service_demo"]


class _CountingExporter(SpanExporter):
    """Stands for the application's tracing backend in the demo: counts what it receives."""

    def __init__(self) -> None:
        self.received = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.received += len(spans)
        return SpanExportResult.SUCCESS


def run_sampled_service_demo(
    url: str,
    spool: Path,
    *,
    api_key: str,
    agent_id: str = "demo-agent-sampled",
    customer_id: str = "cust_acme",
    requests: int = 100,
    ratio: float = 0.1,
) -> dict[str, int]:
    """A service that samples ``ratio`` of its traces bills all of its usage.

    Runs ``requests`` traces, each transcribing 6 seconds of audio, through
    ``UsageSampler(ParentBased(TraceIdRatioBased(ratio)))`` with a ``BatchSpanProcessor``
    standing for the tracing backend and a :class:`UsageSpanProcessor` feeding a
    :class:`~paygent_otel.PaygentSpanExporter` at ``url``. Returns the exporter's stats
    plus ``requests``, ``usage_spans_recorded`` and ``spans_sampled_to_backend``.
    """
    exporter = PaygentSpanExporter(endpoint=url, api_key=api_key, spool_path=spool)
    backend = _CountingExporter()
    provider = TracerProvider(
        resource=Resource.create({sc.AGENT_ID: agent_id}),
        sampler=UsageSampler(ParentBased(TraceIdRatioBased(ratio))),
    )
    provider.add_span_processor(BatchSpanProcessor(backend))
    provider.add_span_processor(UsageSpanProcessor(exporter))
    tracer = provider.get_tracer("paygent_otel._cli.demo.sampled")
    recorded = 0
    for _ in range(requests):
        with tracer.start_as_current_span("handle-call"), tracer.start_as_current_span("stt"):
            recorded += record_stt(
                None,
                customer_id,
                "voice-minutes",
                service_provider="deepgram",
                model="nova-2",
                audio_seconds=6.0,
            )
    provider.shutdown()
    return {
        **exporter.stats,
        "requests": requests,
        "usage_spans_recorded": recorded,
        "spans_sampled_to_backend": backend.received,
    }
