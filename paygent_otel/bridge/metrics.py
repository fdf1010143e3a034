"""The bridge's ``GET /metrics``: its counters as Prometheus metric families.

Written with ``prometheus-client`` (a custom collector that reads the bridge's state when
scraped), under names, types and labels that dashboards (``collector-config/grafana/``) and
operators' alerts depend on: change none of them. Delivery outcomes and spool depth come
from the same source the SDK exporters report through (:mod:`paygent_otel._selfmetrics`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from paygent_otel.bridge.guard import ConnectionGuard, MemoryBudget
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.selfmetrics import record_outcomes, spool_depth
from paygent_otel.delivery.spool import SpoolStats

__all__ = ["METRICS_MEDIA_TYPE", "BridgeCounters", "BridgeState", "bridge_metrics_text"]

METRICS_MEDIA_TYPE: Final = "text/plain; version=0.0.4"
"""The Prometheus text exposition format ``generate_latest`` writes."""


@dataclass
class BridgeCounters:
    """The bridge's own counters (read by ``GET /metrics``); thread-safe through ``lock``."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    usage: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, signal: str, status: int, reason: str | None = None) -> None:
        """One export request answered ``status`` (refused for ``reason``, when given)."""
        with self.lock:
            self.requests[(signal, status)] += 1
            if reason is not None:
                self.refused[reason] += 1

    def received(self, signal: str, items: int) -> None:
        """Spans, data points or log records received in an accepted request."""
        with self.lock:
            self.items[signal] += items

    def found(self, signal: str, valid: int, rejected: Iterable[str]) -> None:
        """Usage records found in a request: ``valid`` ones, and the others' reasons."""
        with self.lock:
            self.usage[(signal, "valid")] += valid
            self.usage.update((signal, reason) for reason in rejected)


class BridgeState(Protocol):
    """What the collector reads from the bridge app when scraped."""

    @property
    def counters(self) -> BridgeCounters: ...
    @property
    def pipeline(self) -> DeliveryPipeline: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def connections(self) -> ConnectionGuard: ...
    @property
    def memory(self) -> MemoryBudget: ...
    @property
    def spool_readable(self) -> bool: ...


def _counter(
    name: str, help_text: str, labels: list[str], samples: Iterable[tuple[list[str], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class _BridgeCollector:
    """Yields the bridge's metric families from its state at each scrape."""

    def __init__(self, state: BridgeState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        c = state.counters
        with c.lock:
            requests = sorted(c.requests.items())
            items = sorted(c.items.items())
            usage = sorted(c.usage.items())
            refused = sorted(c.refused.items())
        yield _counter(
            "paygent_bridge_requests_total",
            "OTLP export requests answered, by signal and HTTP status.",
            ["signal", "status"],
            (([s, str(code)], n) for (s, code), n in requests),
        )
        yield _counter(
            "paygent_bridge_items_received_total",
            "Spans, data points and log records received in accepted requests, by signal.",
            ["signal"],
            (([s], n) for s, n in items),
        )
        yield _counter(
            "paygent_bridge_usage_records_total",
            "Usage records found, by signal and result (valid, invalid, zero, lost).",
            ["signal", "result"],
            (([s, r], n) for (s, r), n in usage),
        )
        yield _counter(
            "paygent_bridge_requests_rejected_total",
            "Export requests refused, by reason.",
            ["reason"],
            (([r], n) for r, n in refused),
        )
        yield _counter(
            "paygent_bridge_delivery_records_total",
            "Usage records by delivery outcome (accepted, delivered, retried, invalid, ...).",
            ["outcome"],
            (([o], n) for o, n in sorted(record_outcomes(state.pipeline).items())),
        )
        yield from self._connections(state)
        spool = spool_depth(state.pipeline) if state.spool_readable else None
        if spool is not None:
            yield from self._spool(spool)

    @staticmethod
    def _connections(state: BridgeState) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "paygent_bridge_in_flight_requests",
            "Export requests being processed.",
            value=state.in_flight,
        )
        yield GaugeMetricFamily(
            "paygent_bridge_open_connections", "Connections open now.", value=state.connections.open
        )
        yield _counter(
            "paygent_bridge_connections_closed_total",
            "Connections the bridge closed or refused, by reason.",
            ["reason"],
            (([r], n) for r, n in sorted(state.connections.closed.items())),
        )
        yield GaugeMetricFamily(
            "paygent_bridge_memory_budget_used_bytes",
            "Bytes of the shared memory budget held by request bodies now.",
            value=state.memory.used,
        )

    @staticmethod
    def _spool(spool: SpoolStats) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "paygent_bridge_spool_pending",
            "Usage records waiting in the spool for delivery.",
            value=spool.pending,
        )
        yield GaugeMetricFamily(
            "paygent_bridge_spool_dead_letters",
            "Dead letters in the spool (invalid, or refused by Paygent).",
            value=spool.dead_letters,
        )


def bridge_metrics_text(state: BridgeState) -> str:
    """The bridge's metrics in the Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BridgeCollector(state))
    return generate_latest(registry).decode("utf-8")
