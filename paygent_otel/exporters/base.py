"""What the span and metric exporters share: settings, identity defaults, the delivery
pipeline, self-metrics, flush and shutdown. Each exporter adds only its ``export()``."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
from opentelemetry.metrics import MeterProvider

from paygent_otel.convention.frameworks import FrameworkSet, parse_frameworks
from paygent_otel.convention.mapping import IdentityDefaults
from paygent_otel.delivery.config import ExporterConfig, ExporterSettings
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.delivery.selfmetrics import register_self_metrics

__all__ = ["ExporterSettings", "PaygentExporterBase"]


class PaygentExporterBase:
    """Mixed in before ``SpanExporter`` / ``MetricExporter``; ``signal`` names the pipeline."""

    signal: ClassVar[str]
    config: ExporterConfig
    _defaults: IdentityDefaults
    _pipeline: DeliveryPipeline
    _frameworks: FrameworkSet
    _shutdown: bool

    def _start_pipeline(
        self,
        settings: ExporterSettings,
        retry_policy: RetryPolicy | None,
        meter_provider: MeterProvider | None,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.config = ExporterConfig.resolve(self.signal, **settings)
        self._defaults = IdentityDefaults(
            agent_id=self.config.agent_id,
            customer_id=self.config.customer_id,
            indicator=self.config.indicator,
            trace_tags=self.config.trace_tags,
        )
        self._frameworks = parse_frameworks(self.config.frameworks)
        self._pipeline = DeliveryPipeline(
            self.config, name=self.signal, retry_policy=retry_policy, transport=transport
        )
        self._shutdown = False
        register_self_metrics(self._pipeline, meter_provider)
        # Records an earlier process left in the spool go out without waiting for new ones.
        self._pipeline.start()

    @property
    def stats(self) -> dict[str, int]:
        """Counters of every record's fate: delivered, retried, rejected, invalid, ... (and,
        for metrics, streams refused: ``wrong_instrument``, ``wrong_temporality``, ...)."""
        return self._pipeline.stats.snapshot()

    @property
    def pipeline(self) -> DeliveryPipeline:
        """The spool and worker this exporter feeds (the seam every route shares)."""
        return self._pipeline

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        """Wait until every committed record is delivered, within the timeout.

        After :meth:`shutdown` it returns at once: nothing can be delivered any more, and
        what shutdown could not deliver stays in the spool (or was counted as dropped).
        """
        if self._shutdown:
            return True
        return self._pipeline.force_flush(timeout_millis / 1000.0)

    def shutdown(self, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        """Deliver what is pending within the timeout, then stop. Idempotent.

        ``PeriodicExportingMetricReader`` passes what is left of its deadline as
        ``timeout=`` (milliseconds); it wins over ``timeout_millis``. The wait never exceeds
        the ``flush_timeout`` setting: the SDK's processors pass up to 30 s at exit.
        """
        if self._shutdown:
            return
        self._shutdown = True
        seconds = float(kwargs.get("timeout", timeout_millis)) / 1000.0
        self._pipeline.shutdown(max(min(seconds, self.config.flush_timeout), 0.0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
