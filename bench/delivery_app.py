"""The application of rows 1, 2, 3 and 7: record the workload as fast as it can.

``client`` is ``sdk`` (paygent-sdk 4.9.7 ``Client.track_*``), ``helper`` (the bridge's
``record_*`` helpers on the current span) or ``attributes`` (``span.set_attributes`` with
the convention attributes). The bridge runs as a user runs it: a ``TracerProvider`` with a
``BatchSpanProcessor`` feeding ``PaygentSpanExporter`` (durable spool, or ``:memory:``);
each record is one span, whose creation and end count in the application's CPU (row 2) but
not in the timed call (row 3 times the call on an existing span). After the loop the
application flushes the batch processor, as it would at shutdown, so the last partial batch
does not wait out the processor's 5 s schedule. The processor's queue holds the whole burst
(``max_queue_size``), as the SDK's executor queue (unbounded) does.

Protocol: prints ``started`` and ``recorded`` (monotonic times), waits for ``done`` on stdin
(the parent saw every record in the ledger), prints ``result``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import workload
from bench._child import CallTimer, cpu_seconds, emit, now, spec, wait_for

Call = Callable[[], object]


def _time_calls(calls: list[Call], timer: CallTimer) -> None:
    thread_us, wall_us = timer.thread_us, timer.wall_us
    thread_time, perf = time.thread_time, time.perf_counter
    for call in calls:
        t = thread_time()
        w = perf()
        call()
        wall_us.append((perf() - w) * 1e6)
        thread_us.append((thread_time() - t) * 1e6)


class SdkApp:
    """paygent-sdk's ``Client`` pointed at the sandbox."""

    def __init__(self, s: dict[str, Any], rs: list[workload.Record]) -> None:
        from paygent_sdk import Client

        self.client = Client(s["api_key"])
        self.client.base_url = s["url"]
        self.calls = [workload.sdk_call(self.client, r) for r in rs]

    def run(self, timer: CallTimer) -> None:
        """Every ``track_*`` call, timed."""
        _time_calls(self.calls, timer)

    def stop(self) -> dict[str, Any]:
        """Let the pool finish (it has: the ledger holds every record)."""
        self.client._executor.shutdown(wait=True)
        return {}


class BridgeApp:
    """A ``TracerProvider`` + ``BatchSpanProcessor`` + ``PaygentSpanExporter``."""

    def __init__(self, s: dict[str, Any], rs: list[workload.Record]) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from paygent_otel import PaygentSpanExporter

        self.exporter = PaygentSpanExporter(
            endpoint=s["url"], api_key=s["api_key"], spool_path=s["spool"]
        )
        self.provider = TracerProvider()
        self.provider.add_span_processor(
            BatchSpanProcessor(self.exporter, max_queue_size=len(rs) + 1)
        )
        self.tracer = self.provider.get_tracer("bench")
        if s["client"] == "helper":
            self.calls = [workload.helper_call(r) for r in rs]
        else:
            self.calls = [_set_attributes(workload.attributes(r)) for r in rs]
        names = {"stt": "transcribe", "tts": "synthesize", "sts": "converse"}
        self.span_names = [names[r.kind] for r in rs]

    def run(self, timer: CallTimer) -> None:
        """One span per record; the recording call inside it timed; then flush the BSP."""
        thread_us, wall_us = timer.thread_us, timer.wall_us
        thread_time, perf = time.thread_time, time.perf_counter
        start_span = self.tracer.start_as_current_span
        for name, call in zip(self.span_names, self.calls, strict=True):
            with start_span(name):
                t = thread_time()
                w = perf()
                call()
                wall_us.append((perf() - w) * 1e6)
                thread_us.append((thread_time() - t) * 1e6)
        self.provider.force_flush()

    def stop(self) -> dict[str, Any]:
        """The exporter's counters, then a clean shutdown."""
        stats = self.exporter.stats
        self.provider.shutdown()
        return {"exporter_stats": stats}


def _set_attributes(attrs: dict[str, Any]) -> Call:
    from opentelemetry import trace

    get_current_span = trace.get_current_span
    return lambda: get_current_span().set_attributes(attrs)


def main() -> None:
    """Run one application (see the module docstring)."""
    s = spec()
    rs = workload.records(s["n"])
    app: SdkApp | BridgeApp = SdkApp(s, rs) if s["client"] == "sdk" else BridgeApp(s, rs)
    timer = CallTimer()
    cpu0 = cpu_seconds()
    emit("started", t=now())
    app.run(timer)
    emit("recorded", t=now(), cpu_s=cpu_seconds() - cpu0)
    wait_for("done")
    cpu = cpu_seconds() - cpu0
    extra = app.stop()
    emit("result", cpu_s=cpu, calls=timer.summary(), **extra)


if __name__ == "__main__":
    main()
