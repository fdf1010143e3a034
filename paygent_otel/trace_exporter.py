"""``PaygentSpanExporter``: usage on spans becomes Paygent tracking calls.

Run it under the SDK's ``BatchSpanProcessor`` (or, to bill unsampled spans too,
:class:`paygent_otel.sampling.UsageSpanProcessor`), or zero-code with
``OTEL_TRACES_EXPORTER=otlp,paygent``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import httpx
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ._config import ExporterConfig
from ._delivery import DeliveryPipeline
from ._mapping import IdentityDefaults, Rejection, UsageRecord
from ._retry import RetryPolicy
from ._selfmetrics import register_self_metrics
from ._spans import has_usage, records_from_span

__all__ = ["PaygentSpanExporter"]

_logger = logging.getLogger("paygent_otel.trace_exporter")


class PaygentSpanExporter(SpanExporter):
    """Turns every usage record on exported spans into one ``POST /api/v2/usage``.

    Every argument falls back to its environment variable, then to its default (see
    ``README.md``, *Configuration*); with no arguments (zero-code) it configures itself from
    the environment. ``export()`` commits the batch's records to the spool (durable by
    default) and returns; a background worker delivers them. It never raises.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
        agent_id: str | None = None,
        customer_id: str | None = None,
        indicator: str | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        spool_max_bytes: int | None = None,
        max_in_flight: int | None = None,
        max_retry_seconds: float | None = None,
        trace_tags: bool | None = None,
        genai: bool | None = None,
        retry_policy: RetryPolicy | None = None,
        meter_provider: MeterProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ExporterConfig.resolve(
            "traces",
            endpoint=endpoint,
            api_key=api_key,
            timeout=timeout,
            headers=headers,
            agent_id=agent_id,
            customer_id=customer_id,
            indicator=indicator,
            spool_path=spool_path,
            spool_max_bytes=spool_max_bytes,
            max_in_flight=max_in_flight,
            max_retry_seconds=max_retry_seconds,
            trace_tags=trace_tags,
            genai=genai,
        )
        self._defaults = IdentityDefaults(
            agent_id=self.config.agent_id,
            customer_id=self.config.customer_id,
            indicator=self.config.indicator,
            trace_tags=self.config.trace_tags,
        )
        self._pipeline = DeliveryPipeline(
            self.config, name="traces", retry_policy=retry_policy, transport=transport
        )
        self._shutdown = False
        register_self_metrics(self._pipeline, meter_provider)
        # Records an earlier process left in the spool go out without waiting for new ones.
        self._pipeline.start()

    @property
    def stats(self) -> dict[str, int]:
        """Counters of every record's fate: delivered, retried, rejected, invalid, ..."""
        return self._pipeline.stats.snapshot()

    @property
    def pipeline(self) -> DeliveryPipeline:
        """The spool and worker this exporter feeds (shared seam with the other routes)."""
        return self._pipeline

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Commit the usage records of ``spans``; SUCCESS once they are stored."""
        records: list[UsageRecord] = []
        rejections: list[Rejection] = []
        genai = self.config.genai
        failed = 0
        for span in spans:
            attributes = span.attributes or {}
            events = span.events
            if not has_usage(attributes, (e.name for e in events), genai):
                continue
            # One span that cannot be mapped must not cost the other spans of the batch
            # their records (the processor drops a whole batch reported as FAILURE).
            try:
                ctx = span.context
                found, refused = records_from_span(
                    trace_id=format(ctx.trace_id, "032x") if ctx else "0" * 32,
                    span_id=format(ctx.span_id, "016x") if ctx else "0" * 16,
                    name=span.name,
                    attributes=attributes,
                    events=((e.name, e.attributes or {}) for e in events),
                    resource=span.resource.attributes if span.resource else {},
                    defaults=self._defaults,
                    genai=genai,
                )
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

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until every committed record is delivered, within the timeout.

        After :meth:`shutdown` it returns at once: nothing can be delivered any more, and
        what shutdown could not deliver stays in the spool (or was counted as dropped).
        """
        if self._shutdown:
            return True
        return self._pipeline.force_flush(timeout_millis / 1000.0)

    def shutdown(self, timeout_millis: float = 10_000, **_: Any) -> None:
        """Deliver what is pending within the timeout, then stop. Idempotent."""
        if self._shutdown:
            return
        self._shutdown = True
        self._pipeline.shutdown(timeout_millis / 1000.0)

    def __repr__(self) -> str:
        return f"PaygentSpanExporter({self.config!r})"
