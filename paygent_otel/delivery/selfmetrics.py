"""What a delivery pipeline reports about itself: every record's fate by outcome, and the
spool's depth.

One counting source for both ways out: :func:`record_outcomes` (the pipeline's counters)
and :func:`spool_depth` (the spool's own counts). The SDK exporters report them as OTel
instruments on the user's ``MeterProvider`` (:func:`register_self_metrics`), so they can be
watched like any Collector component. The bridge has no ``MeterProvider`` of its own: it
reads the same two functions for its ``GET /metrics`` (``paygent_otel.bridge``), under the
Prometheus names its dashboards and operators already use
(``paygent_bridge_delivery_records_total``, ``paygent_bridge_spool_pending``,
``paygent_bridge_spool_dead_letters``), which the OTel names here would not translate to.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from paygent_otel._version import __version__
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.spool import SpoolStats

__all__ = [
    "RECORDS_METRIC",
    "SPOOL_DEAD_METRIC",
    "SPOOL_PENDING_METRIC",
    "record_outcomes",
    "register_self_metrics",
    "spool_depth",
]

_logger = logging.getLogger(__name__)

RECORDS_METRIC = "paygent_otel.records"
"""Counter of usage records by ``outcome`` (accepted, delivered, retried, rejected, invalid,
skipped_zero, refused, gave_up, duplicate_suppressed, ...) and ``pipeline``."""
SPOOL_PENDING_METRIC = "paygent_otel.spool.pending"
"""Gauge: records waiting in the spool for delivery."""
SPOOL_DEAD_METRIC = "paygent_otel.spool.dead_letters"
"""Gauge: dead letters in the spool (rejected by Paygent or invalid)."""


def record_outcomes(pipeline: DeliveryPipeline) -> dict[str, int]:
    """Usage records ``pipeline`` handled, by outcome (``accepted``, ``delivered``, ...)."""
    return pipeline.stats.snapshot()


def spool_depth(pipeline: DeliveryPipeline) -> SpoolStats | None:
    """The counts of ``pipeline``'s spool; None once it is shut down (its spool is closed,
    and reading it would open it again). Errors reading the spool are raised."""
    if pipeline.is_shut_down:
        return None
    return pipeline.spool.stats()


class _ObservedPipelines:
    """The instruments of one ``MeterProvider`` and every pipeline they report.

    A meter hands back the instrument registered first for a name and silently drops the
    callbacks of a second registration, so the span and metric exporters share one set of
    instruments per provider instead of each creating its own.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        self._pipelines: weakref.WeakSet[DeliveryPipeline] = weakref.WeakSet()
        meter = meter_provider.get_meter("paygent_otel", __version__)
        meter.create_observable_counter(
            RECORDS_METRIC,
            callbacks=[self._records],
            unit="{record}",
            description="Usage records handled by paygent-otel, by outcome",
        )
        meter.create_observable_gauge(
            SPOOL_PENDING_METRIC,
            callbacks=[lambda _: self._spool("pending")],
            unit="{record}",
            description="Usage records waiting in the spool",
        )
        meter.create_observable_gauge(
            SPOOL_DEAD_METRIC,
            callbacks=[lambda _: self._spool("dead")],
            unit="{record}",
            description="Dead letters in the spool",
        )

    def add(self, pipeline: DeliveryPipeline) -> None:
        self._pipelines.add(pipeline)

    def _records(self, _: CallbackOptions) -> Iterable[Observation]:
        # Pipelines of the same name (two span exporters) add up under one attribute set.
        totals: Counter[tuple[str, str]] = Counter()
        for pipeline in list(self._pipelines):
            for outcome, count in record_outcomes(pipeline).items():
                totals[pipeline.name, outcome] += count
        for (name, outcome), count in sorted(totals.items()):
            yield Observation(count, {"pipeline": name, "outcome": outcome})

    def _spool(self, metric: str) -> Iterable[Observation]:
        totals: Counter[str] = Counter()
        seen: set[tuple[str, int]] = set()
        for pipeline in list(self._pipelines):
            # A shut-down pipeline's spool is not read; one spool shared by two pipelines of
            # a name is counted once.
            if pipeline.is_shut_down or (pipeline.name, id(pipeline.spool)) in seen:
                continue
            seen.add((pipeline.name, id(pipeline.spool)))
            try:
                stats = spool_depth(pipeline)
            except Exception as exc:
                _logger.debug("spool of %s not observed: %s", pipeline.name, exc)
                continue
            if stats is None:
                continue
            totals[pipeline.name] += stats.pending if metric == "pending" else stats.dead_letters
        for name, value in sorted(totals.items()):
            yield Observation(value, {"pipeline": name})


_observed: weakref.WeakKeyDictionary[MeterProvider, _ObservedPipelines] = (
    weakref.WeakKeyDictionary()
)
_observed_lock = threading.Lock()


def register_self_metrics(pipeline: DeliveryPipeline, meter_provider: MeterProvider | None) -> None:
    """Report ``pipeline``'s counters and spool through ``meter_provider`` (or the global one).

    Each pipeline is reported under its ``pipeline`` attribute (``traces``, ``metrics``)
    for as long as it exists.
    """
    provider = meter_provider or metrics.get_meter_provider()
    with _observed_lock:
        observed = _observed.get(provider)
        if observed is None:
            observed = _observed[provider] = _ObservedPipelines(provider)
    observed.add(pipeline)
