"""The application of row 4: usage counters at the default export interval.

A ``MeterProvider`` with a ``PeriodicExportingMetricReader`` (its default interval, 60 s,
unless the spec gives one) feeding ``PaygentMetricExporter``; the application adds the
workload's records with ``UsageInstruments.add_stt/add_tts/add_sts`` as fast as it can, in
a loop over the workload, for one interval, then shuts the provider down (the last
collection exports everything recorded, all of it inside one interval). Every increment is
counted here, so the parent can check the ledger's totals against exactly what was added.

Protocol: prints ``result`` (increments per (customer, kind) and their sums) after the
exporter has delivered every record (its shutdown flushes the spool).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import workload
from bench._child import cpu_seconds, emit, spec


def _add_call(usage: Any, r: workload.Record) -> Callable[[], bool]:
    identity = {
        "agent_id": workload.AGENT,
        "customer_id": r.customer,
        "indicator": r.indicator,
        "provider": r.provider,
        "model": r.model,
    }
    if r.kind == "stt":
        return lambda: bool(usage.add_stt(minutes=r.minutes, **identity))
    if r.kind == "tts":
        return lambda: bool(usage.add_tts(characters=r.characters, **identity))
    return lambda: bool(usage.add_sts(usage_metadata=r.sts, **identity))


def main() -> None:
    """Record for one interval; shut down; report what was added."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from paygent_otel.exporters.metric import PaygentMetricExporter
    from paygent_otel.recording.instruments import UsageInstruments

    s = spec()
    rs = workload.records(s["n"])
    exporter = PaygentMetricExporter(endpoint=s["url"], api_key=s["api_key"], spool_path=s["spool"])
    interval_ms = s.get("interval_ms")
    reader = (
        PeriodicExportingMetricReader(exporter)
        if interval_ms is None
        else PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
    )
    interval = reader._export_interval_millis / 1000.0
    provider = MeterProvider(metric_readers=[reader])
    usage = UsageInstruments(provider.get_meter("bench"))
    calls = [_add_call(usage, r) for r in rs]
    cpu0 = cpu_seconds()
    began = time.monotonic()
    # Stop half a second before the reader's first collection: one interval, one export.
    deadline = began + interval - 0.5
    added = refused = 0
    while time.monotonic() < deadline:
        index = added % len(calls)
        chunk = calls[index : index + 1000]
        for call in chunk:
            if not call():
                refused += 1
        added += len(chunk)
    recording_s = time.monotonic() - began
    recording_cpu = cpu_seconds() - cpu0
    provider.shutdown()
    full, rest = divmod(added, len(rs))
    whole, part = workload.expected_totals(rs), workload.expected_totals(rs[:rest])
    expected = [
        {
            "customer_id": customer,
            "kind": kind,
            **{
                name: value * full + part.get((customer, kind), {}).get(name, 0)
                for name, value in totals.items()
            },
        }
        for (customer, kind), totals in sorted(whole.items())
    ]
    emit(
        "result",
        interval_s=interval,
        increments=added,
        refused=refused,
        recording_s=recording_s,
        recording_cpu_s=recording_cpu,
        exporter_stats=exporter.stats,
        expected=expected,
    )


if __name__ == "__main__":
    main()
