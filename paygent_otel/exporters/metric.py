"""``PaygentMetricExporter``: usage counters become Paygent tracking calls.

Run it under the SDK's ``PeriodicExportingMetricReader``, or zero-code with
``OTEL_METRICS_EXPORTER=paygent`` (add it next to ``otlp``: ``otlp,paygent``). Each export
interval turns every non-zero point of a usage counter into usage; points with the same
identity in one interval are one call. See ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Final, Unpack

import httpx
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.metrics.view import Aggregation, DefaultAggregation, SumAggregation

from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.exporters.base import ExporterSettings, PaygentExporterBase
from paygent_otel.exporters.metrics import (
    UsagePoint,
    is_usage_metric,
    records_from_points,
    usage_stream_problem,
)

__all__ = ["USAGE_TEMPORALITY", "PaygentMetricExporter"]

_logger = logging.getLogger("paygent_otel.metric_exporter")

USAGE_TEMPORALITY: Final[Mapping[type, AggregationTemporality]] = {
    Counter: AggregationTemporality.DELTA,
    ObservableCounter: AggregationTemporality.DELTA,
    Histogram: AggregationTemporality.DELTA,
    UpDownCounter: AggregationTemporality.CUMULATIVE,
    ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
    ObservableGauge: AggregationTemporality.CUMULATIVE,
}
"""The temporality the exporter asks its reader for (the OTLP exporters' ``delta`` preset).

Counters must be DELTA: each point is then exactly the usage of one interval. The other
instrument types are never billed (a usage name on them is an error), so their entries
only keep the reader's memory small."""

_BILLED_INSTRUMENTS = (Counter, ObservableCounter)
_SUM_AGGREGATIONS = (DefaultAggregation, SumAggregation)


def _data_type(metric: Metric) -> str:
    """``Sum`` -> ``"sum"``, ``ExponentialHistogram`` -> ``"exponential histogram"``."""
    name = type(metric.data).__name__
    return "".join(" " + c.lower() if c.isupper() else c for c in name).strip()


class PaygentMetricExporter(PaygentExporterBase, MetricExporter):
    """Turns the usage counters of each export interval into ``POST /api/v2/usage`` calls.

    Takes the same keyword arguments as :class:`~paygent_otel.PaygentSpanExporter` and the
    same environment variables (``OTEL_EXPORTER_PAYGENT_METRICS_*`` before the generic
    ones); with no arguments (zero-code) it configures itself from the environment.
    ``preferred_temporality`` and ``preferred_aggregation`` are passed to the reader like
    any exporter's, but one that would make usage counters arrive as cumulative sums or
    as anything but sums raises ``ValueError`` here: such a configuration would bill the
    running total every interval, or nothing at all.

    ``export()`` commits the interval's records to the spool (durable by default) and
    returns; a background worker delivers them. It never raises.
    """

    signal = "metrics"

    def __init__(
        self,
        *,
        retry_policy: RetryPolicy | None = None,
        meter_provider: MeterProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        preferred_temporality: Mapping[type, AggregationTemporality] | None = None,
        preferred_aggregation: Mapping[type, Aggregation] | None = None,
        **settings: Unpack[ExporterSettings],
    ) -> None:
        temporality = {**USAGE_TEMPORALITY, **(preferred_temporality or {})}
        for instrument in _BILLED_INSTRUMENTS:
            if temporality[instrument] is not AggregationTemporality.DELTA:
                raise ValueError(
                    f"PaygentMetricExporter needs DELTA temporality for {instrument.__name__}: "
                    f"with {temporality[instrument].name} every export would carry the running "
                    f"total and bill the same usage again each interval"
                )
        for instrument_type, aggregation in (preferred_aggregation or {}).items():
            if instrument_type in _BILLED_INSTRUMENTS and not isinstance(
                aggregation, _SUM_AGGREGATIONS
            ):
                raise ValueError(
                    f"PaygentMetricExporter needs {instrument_type.__name__} aggregated as a sum, "
                    f"not {type(aggregation).__name__}: usage counters would not be billed"
                )
        super().__init__(
            preferred_temporality=temporality,
            preferred_aggregation=dict(preferred_aggregation or {}),
        )
        self._reported: set[tuple[str, str]] = set()
        self._reported_lock = threading.Lock()
        self._start_pipeline(settings, retry_policy, meter_provider, transport)

    def _refused(self, metric: Metric, name: str) -> bool:
        """True when ``metric`` (usage quantity ``name``) must not be billed (reported once)."""
        data = metric.data
        unit = metric.unit or ""
        if isinstance(data, Sum):
            problem = usage_stream_problem(
                name,
                "sum",
                unit=unit,
                monotonic=data.is_monotonic,
                delta=data.aggregation_temporality is AggregationTemporality.DELTA,
            )
        else:
            problem = usage_stream_problem(name, _data_type(metric), unit=unit)
        if problem is None:
            return False
        reason, message = problem
        self._pipeline.stats.add(reason, len(data.data_points))
        with self._reported_lock:
            first = (metric.name, reason) not in self._reported
            self._reported.add((metric.name, reason))
        if first:
            _logger.error("paygent metric exporter: %s", message)
        return True

    def _usage_points(self, metrics_data: MetricsData) -> Iterator[UsagePoint]:
        frameworks = self._frameworks
        for resource_metrics in metrics_data.resource_metrics:
            resource = resource_metrics.resource.attributes
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope.name
                for metric in scope_metrics.metrics:
                    # A framework's own usage counter (frameworks setting) bills as the
                    # convention quantity it measures.
                    framework = frameworks.metric(scope, metric.name) if frameworks else None
                    name = metric.name if framework is None else framework.quantity
                    if not is_usage_metric(name) or self._refused(metric, name):
                        continue
                    data = metric.data
                    if not isinstance(data, Sum):  # _refused let only sums through
                        continue
                    for point in data.data_points:
                        attributes = point.attributes or {}
                        if framework is not None:
                            attributes = framework.attributes(attributes)
                        yield UsagePoint(
                            resource,
                            name,
                            attributes,
                            point.start_time_unix_nano,
                            point.time_unix_nano,
                            point.value,
                        )

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Commit the interval's usage records; SUCCESS once they are stored."""
        try:
            records, rejections = records_from_points(
                self._usage_points(metrics_data), self._defaults, source="metrics"
            )
        except Exception:
            _logger.exception("paygent metric exporter: could not map an export")
            return MetricExportResult.FAILURE
        if not records and not rejections:
            return MetricExportResult.SUCCESS
        # After shutdown the pipeline refuses, logs and counts them (never silently lost).
        refused = self._pipeline.submit(records, rejections)
        return MetricExportResult.FAILURE if refused else MetricExportResult.SUCCESS
