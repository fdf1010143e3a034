"""``PaygentSpanExporter``: usage on spans becomes Paygent tracking calls.

Run it under the SDK's ``BatchSpanProcessor`` (or, to bill unsampled spans too,
:class:`paygent_otel.recording.sampling.UsageSpanProcessor`), or zero-code with
``OTEL_TRACES_EXPORTER=otlp,paygent``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Unpack

import httpx
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from paygent_otel.convention.mapping import Rejection, UsageRecord
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.exporters.base import ExporterSettings, PaygentExporterBase
from paygent_otel.exporters.spans import Truncation, has_usage, records_from_span

__all__ = ["PaygentSpanExporter"]

_logger = logging.getLogger("paygent_otel.trace_exporter")


class PaygentSpanExporter(PaygentExporterBase, SpanExporter):
    """Turns every usage record on exported spans into one ``POST /api/v2/usage``.

    Every argument falls back to its environment variable, then to its default (see
    ``docs/configuration.md``); with no arguments (zero-code) it configures itself from
    the environment. A bad argument raises ``ValueError`` here, the one place this exporter
    raises; a bad environment value is a warning and its default is used (a bad endpoint,
    key or TLS file instead stops delivery and keeps the records). ``export()`` commits the
    batch's records to the spool (durable by default) and returns; a background worker
    delivers them. It never raises.
    """

    signal = "traces"

    def __init__(
        self,
        *,
        retry_policy: RetryPolicy | None = None,
        meter_provider: MeterProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **settings: Unpack[ExporterSettings],
    ) -> None:
        self._start_pipeline(settings, retry_policy, meter_provider, transport)
        # The SDK's length limits as the environment sets them, for spans whose attribute
        # maps do not say which limit they were cut to (not built by the SDK's Span).
        self._span_length_limit: int | None = None
        self._event_length_limit: int | None = None
        try:
            limits = SpanLimits()
        except ValueError:  # a malformed limit: the TracerProvider reports it
            return
        self._span_length_limit = limits.max_span_attribute_length
        self._event_length_limit = limits.max_attribute_length

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Commit the usage records of ``spans``; SUCCESS once they are stored."""
        records: list[UsageRecord] = []
        rejections: list[Rejection] = []
        failed = 0
        for span in spans:
            scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
            if not has_usage(
                span.attributes or {},
                (e.name for e in span.events),
                self.config.genai,
                dropped=span.dropped_attributes,
                frameworks=self._frameworks,
                scope=scope,
                span_name=span.name,
            ):
                continue
            # One span that cannot be mapped must not cost the other spans of the batch
            # their records (the processor drops a whole batch reported as FAILURE).
            try:
                found, refused = self._records(span, scope)
            except Exception:
                failed += 1
                _logger.exception(
                    "paygent span exporter: could not map the usage of span %r; the span is "
                    "counted as mapping_failed and its records are not sent",
                    span.name,
                )
                continue
            records += found
            rejections += refused
        self._pipeline.stats.add("mapping_failed", failed)
        if not records and not rejections:
            return SpanExportResult.FAILURE if failed else SpanExportResult.SUCCESS
        # After shutdown the pipeline refuses the records and counts them: never silent.
        refused_count = self._pipeline.submit(records, rejections)
        return SpanExportResult.FAILURE if refused_count or failed else SpanExportResult.SUCCESS

    def _records(self, span: ReadableSpan, scope: str) -> tuple[list[UsageRecord], list[Rejection]]:
        """The usage records (and rejections) of one span that carries usage."""
        ctx = span.context
        events = span.events
        return records_from_span(
            trace_id=format(ctx.trace_id, "032x") if ctx else "0" * 32,
            span_id=format(ctx.span_id, "016x") if ctx else "0" * 16,
            name=span.name,
            attributes=span.attributes or {},
            events=((e.name, e.attributes or {}) for e in events),
            resource=span.resource.attributes if span.resource else {},
            defaults=self._defaults,
            genai=self.config.genai,
            truncation=Truncation(
                span.dropped_attributes,
                _length_limit(getattr(span, "_attributes", None), self._span_length_limit),
            ),
            event_truncations=[
                Truncation(
                    e.dropped_attributes, _length_limit(e.attributes, self._event_length_limit)
                )
                for e in events
            ],
            dropped_events=span.dropped_events,
            frameworks=self._frameworks,
            scope=scope,
        )


def _length_limit(attributes: object, fallback: int | None) -> int | None:
    """The value length limit the SDK applied to ``attributes`` (its ``BoundedAttributes``
    knows it), else ``fallback``, the limit the environment sets."""
    if isinstance(attributes, BoundedAttributes):
        return attributes.max_value_len
    return fallback
