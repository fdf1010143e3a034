"""Bill every usage record whatever sampler the application runs.

The SDK's ``BatchSpanProcessor`` exports only *sampled* spans, and a span the sampler
drops records nothing at all (``set_attribute`` on it is a no-op), so a service that
samples 10% of its traces would bill 10% of its usage. Two parts fix that, and together
they leave every other exporter exactly as it was:

- :class:`UsageSampler` wraps the application's sampler. Where that sampler says DROP it
  says RECORD_ONLY instead: the span records its attributes and events, but its trace
  flags still say *not sampled*, so ``BatchSpanProcessor`` (and with it the OTLP exporter)
  still discards it, and downstream services see the same sampling decision.
- :class:`UsageSpanProcessor` replaces ``BatchSpanProcessor`` for the
  :class:`~paygent_otel.PaygentSpanExporter`: it queues every ended span that carries
  usage, sampled or not, and hands batches to the exporter from a background thread.

::

    provider = TracerProvider(sampler=UsageSampler(ParentBased(TraceIdRatioBased(0.1))))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # sees 10%
    provider.add_span_processor(UsageSpanProcessor(PaygentSpanExporter()))  # bills 100%

The cost: every span the root sampler drops is now a real recording span (allocated,
attributes kept, passed through each processor's ``on_start``/``on_end``) instead of a
shared no-op; see ``docs/usage-in-instrumented-code.md`` for numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from paygent_otel.convention.frameworks import parse_frameworks
from paygent_otel.exporters.spans import has_usage
from paygent_otel.exporters.trace import PaygentSpanExporter

__all__ = ["UsageSampler", "UsageSpanProcessor"]


class UsageSampler(Sampler):
    """Wraps any sampler so that the spans it drops still record (RECORD_ONLY).

    The root's decision is kept whenever it records; DROP becomes RECORD_ONLY with the
    span's start attributes and the same trace state, so the span's trace flags still say
    *not sampled*: processors that export only sampled spans (``BatchSpanProcessor``)
    still skip it, and the decision propagated to other services is unchanged. Pair it
    with :class:`UsageSpanProcessor`, which bills the usage on those unsampled spans.
    """

    def __init__(self, root: Sampler) -> None:
        self._root = root

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """The root's decision, with DROP turned into RECORD_ONLY."""
        result = self._root.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision is not Decision.DROP:
            return result
        # The SDK starts a span with the *result's* attributes only, and a DROP carries
        # none: hand back the ones the span was started with, or they would be lost.
        kept = {**(attributes or {}), **result.attributes}
        return SamplingResult(Decision.RECORD_ONLY, kept, result.trace_state)

    def get_description(self) -> str:
        """``UsageSampler{<root's description>}``."""
        return f"UsageSampler{{{self._root.get_description()}}}"


class UsageSpanProcessor(BatchSpanProcessor):
    """Batches every ended span that carries usage, sampled or not, to a Paygent exporter.

    Use it *instead of* ``BatchSpanProcessor`` for :class:`~paygent_otel.PaygentSpanExporter`
    (the other processors on the provider are unaffected). Spans without usage are never
    queued. It is the SDK's own batching (same queue, worker thread, fork handling, flush
    and shutdown, same ``OTEL_BSP_*`` settings and arguments); only the choice of spans
    differs. The exporter commits each batch to its spool before returning, so the queue
    holds usage only between two exports (5 s by default): size ``max_queue_size`` for
    the usage spans of one ``schedule_delay_millis``; past it the SDK drops the oldest
    with a warning.
    """

    def __init__(
        self,
        exporter: PaygentSpanExporter,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
        *,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        super().__init__(
            exporter,
            max_queue_size,
            schedule_delay_millis,
            max_export_batch_size,
            export_timeout_millis,
            meter_provider=meter_provider,
        )
        # The one place this reaches into the SDK: its batcher is private. Checked here so
        # an SDK that renamed it fails at construction, never inside span.end().
        if not callable(getattr(getattr(self, "_batch_processor", None), "emit", None)):
            raise RuntimeError(
                "this opentelemetry-sdk's BatchSpanProcessor has no _batch_processor.emit; "
                "UsageSpanProcessor needs opentelemetry-sdk 1.45.x"
            )
        self._genai = exporter.config.genai
        self._frameworks = parse_frameworks(exporter.config.frameworks)

    def on_end(self, span: ReadableSpan) -> None:
        """Queue ``span`` when it carries usage, whatever its sampled flag."""
        events = (e.name for e in span.events)
        scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
        if has_usage(
            span.attributes or {},
            events,
            self._genai,
            dropped=span.dropped_attributes,
            frameworks=self._frameworks,
            scope=scope,
            span_name=span.name,
        ):
            self._batch_processor.emit(span)
