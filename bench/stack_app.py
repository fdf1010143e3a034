"""The application of row 11: deliver a spooled backlog through one HTTP stack.

``stack`` is ``aiohttp`` (the runtime sender,
:class:`paygent_otel.delivery.transport.AiohttpSender`) or ``httpx-aiohttp``
(``httpx.AsyncClient`` over ``httpx_aiohttp.AiohttpTransport``, the stack the design card
names, through the pipeline's injected-transport seam). The records are written to a fresh
SQLite spool before the clock starts, so the measured CPU is the delivery's alone: leasing,
the HTTP stack, settling. Both stacks import aiohttp before the clock starts.

Protocol: prints ``result`` with the process CPU seconds (every thread) from ``start()``
to the moment the spool is empty, and the exporter's counters.
"""

from __future__ import annotations

from typing import Any

import aiohttp  # noqa: F401  (imported before the clock for both stacks)
import httpx

from bench._child import cpu_seconds, emit, now, spec
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.spool import destination_id, open_spool


def usage(prefix: str, i: int) -> UsageRecord:
    """One STT record with a key of its own (every round's keys are new to the sandbox)."""
    payload = {
        "agentId": "bench-agent",
        "customerId": f"cust-{i % 50}",
        "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": 1.0 + i % 7},
    }  # fmt: skip
    return UsageRecord(f"{prefix}-{i:06d}", payload, f"bench record {i}")


def main() -> None:
    """Fill the spool, deliver it through the chosen stack, report CPU per record."""
    s = spec()
    n, url = s["n"], s["url"]
    config = ExporterConfig.resolve(
        "traces", endpoint=url, api_key=s["api_key"], spool_path=s["spool"]
    )
    spool = open_spool(s["spool"], max_bytes=config.spool_max_bytes)
    spool.add(destination_id(config.endpoint), [usage(s["prefix"], i) for i in range(n)])
    spool.close()
    transport: httpx.AsyncBaseTransport | None = None
    if s["stack"] == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(max_connections=config.max_in_flight)
        transport = AiohttpTransport(limits=limits)
    pipeline = DeliveryPipeline(config, name="traces", transport=transport)
    cpu0, t0 = cpu_seconds(), now()
    pipeline.start()
    flushed = pipeline.force_flush(300)
    cpu, elapsed = cpu_seconds() - cpu0, now() - t0
    stats: dict[str, Any] = pipeline.stats.snapshot()
    pipeline.shutdown(5)
    emit("result", flushed=flushed, cpu_s=cpu, elapsed_s=elapsed, stats=stats)


if __name__ == "__main__":
    main()
