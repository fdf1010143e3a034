"""The application of row 6: a million records wait in the spool while Paygent is down.

The exporter points at a port nothing listens on (connection refused: an outage), so its
worker keeps failing and backing off while records pile up. The first batch goes through
the whole exporter path: 512 real spans from a ``TracerProvider``, ``export()``, mapping,
spool. Mapping a million spans would take most of the benchmark's time budget and
measures nothing about memory, so the rest of the backlog re-keys that batch's mapped
records (new idempotency keys, same bodies) and hands them to the same exporter's
pipeline (``exporter.pipeline.submit``, 4,096 at a time), which commits them to the
spool exactly as ``export()`` does. Peak RSS is the process's ``ru_maxrss``, read while
the backlog sits in the spool with the worker retrying.

Protocol: prints ``result``.
"""

from __future__ import annotations

import time
from typing import Any

from bench import workload
from bench._child import cpu_seconds, dead_endpoint, emit, now, peak_rss_mb, spec

BATCH = 512
"""Spans per ``export()`` (the batch processor's batch size)."""
SUBMIT = 4096
"""Records per ``pipeline.submit`` for the rest: what the bridge hands over for one large
OTLP request. Fewer, larger transactions fill the spool faster (the spool's cost per
record is its random-key index, not the commit)."""


def _current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main() -> None:
    """Fill the spool during the outage; report time, RSS and what the spool holds."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult as Result

    from paygent_otel import IdentityDefaults, PaygentSpanExporter, UsageRecord
    from paygent_otel.convention.mapping import idempotency_key
    from paygent_otel.exporters.spans import records_from_span

    s = spec()
    total: int = s["n"]
    exporter = PaygentSpanExporter(
        endpoint=dead_endpoint(), api_key=s["api_key"], spool_path=s["spool"]
    )

    class Keep(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def export(self, spans: Any) -> Result:
            self.spans.extend(spans)
            return Result.SUCCESS

    kept = Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("bench")
    for r in workload.records(BATCH):
        with tracer.start_as_current_span("usage") as span:
            span.set_attributes(workload.attributes(r))
    rss_start = _current_rss_mb()
    cpu0 = cpu_seconds()
    began = now()
    exporter.export(kept.spans)
    first = exporter.stats.get("accepted", 0)
    # The same batch mapped again, by the function export() uses, as the template.

    template: list[UsageRecord] = []
    for span in kept.spans:
        ctx = span.context
        assert ctx is not None
        found, _ = records_from_span(
            trace_id=format(ctx.trace_id, "032x"),
            span_id=format(ctx.span_id, "016x"),
            name=span.name,
            attributes=span.attributes or {},
            events=(),
            resource=span.resource.attributes,
            defaults=IdentityDefaults(),
        )
        template += found
    pipeline = exporter.pipeline
    submitted = first
    batch_no = 0
    samples: list[float] = []
    while submitted < total:
        batch_no += 1
        take = min(SUBMIT, total - submitted)
        records = [
            UsageRecord(
                idempotency_key("bench-backlog", batch_no, i),
                template[i % len(template)].payload,
                template[i % len(template)].origin,
            )
            for i in range(take)
        ]
        refused = pipeline.submit(records)
        if refused:
            break
        submitted += take
        if batch_no % 25 == 0:
            samples.append(_current_rss_mb())
    spooled_s = now() - began
    spool_cpu = cpu_seconds() - cpu0
    # Hold the backlog for a moment with the worker retrying against the dead endpoint.
    for _ in range(10):
        time.sleep(0.3)
        samples.append(_current_rss_mb())
    pending = pipeline.spool.pending()
    stats = exporter.stats
    size = pipeline.spool.stats().size_bytes
    peak = peak_rss_mb()
    emit(
        "result",
        records=submitted,
        pending=pending,
        spooled_s=spooled_s,
        spool_cpu_s=spool_cpu,
        rss_start_mb=rss_start,
        rss_samples_mb=samples[-5:],
        peak_rss_mb=peak,
        spool_bytes=size,
        exporter_stats=stats,
    )
    exporter.shutdown(timeout_millis=1000)


if __name__ == "__main__":
    main()
