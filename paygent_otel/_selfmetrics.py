"""The bridge's own metrics, exported through the user's ``MeterProvider``.

So the bridge can be watched like any Collector component: every record's fate by outcome,
and the spool's depth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ._delivery import DeliveryPipeline
from ._version import __version__

__all__ = ["RECORDS_METRIC", "SPOOL_DEAD_METRIC", "SPOOL_PENDING_METRIC", "register_self_metrics"]

_logger = logging.getLogger(__name__)

RECORDS_METRIC = "paygent_otel.records"
"""Counter of usage records by ``outcome`` (accepted, delivered, retried, rejected, invalid,
skipped_zero, refused, gave_up, duplicate_suppressed, ...) and ``pipeline``."""
SPOOL_PENDING_METRIC = "paygent_otel.spool.pending"
"""Gauge: records waiting in the spool for delivery."""
SPOOL_DEAD_METRIC = "paygent_otel.spool.dead_letters"
"""Gauge: dead letters in the spool (rejected by Paygent or invalid)."""


def register_self_metrics(pipeline: DeliveryPipeline, meter_provider: MeterProvider | None) -> None:
    """Create observable instruments reading ``pipeline``'s counters and spool."""
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("paygent_otel", __version__)
    labels = {"pipeline": pipeline.name}

    def records(_: CallbackOptions) -> Iterable[Observation]:
        for outcome, count in pipeline.stats.snapshot().items():
            yield Observation(count, {**labels, "outcome": outcome})

    def spool(metric: str) -> Iterable[Observation]:
        try:
            stats = pipeline.spool.stats()
        except Exception:  # a closed spool after shutdown: nothing to observe
            return
        yield Observation(stats.pending if metric == "pending" else stats.dead_letters, labels)

    meter.create_observable_counter(
        RECORDS_METRIC,
        callbacks=[records],
        unit="{record}",
        description="Usage records handled by paygent-otel, by outcome",
    )
    meter.create_observable_gauge(
        SPOOL_PENDING_METRIC,
        callbacks=[lambda _: spool("pending")],
        unit="{record}",
        description="Usage records waiting in the spool",
    )
    meter.create_observable_gauge(
        SPOOL_DEAD_METRIC,
        callbacks=[lambda _: spool("dead")],
        unit="{record}",
        description="Dead letters in the spool",
    )
