"""The application of rows 9 and 10: what a user waits for, not how much gets through.

``mode="steady"`` (row 9): records ``n`` TTS records at a fixed rate (open loop: the
``i``-th at ``start + i / rate``, whatever happened before) and reports when each was
recorded (``time.time()``, the clock the sandbox stamps ``received_at`` with). Record
``i`` bills ``i + 1`` characters, so the ledger row of each record is known for both
clients. paygent-otel runs a ``BatchSpanProcessor`` with ``bsp_delay_ms`` (None: the SDK's
default 5 s), the SDK its ``Client``. Waits for ``done``, then shuts down.

``mode="exit"`` (row 10): a short script. Records ``n`` records, reports the time of the
last one, and returns from ``main``: the interpreter exits the way a script does, with
the provider's (or the SDK's) own exit handling delivering what is left. The parent times
the exit and checks the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench._child import emit, spec, wait_for

AGENT = "agent-bench"


def _otel(s: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[], None]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from paygent_otel import PaygentSpanExporter, record_tts

    exporter = PaygentSpanExporter(endpoint=s["url"], api_key=s["api_key"], spool_path=s["spool"])
    provider = TracerProvider()
    delay = s.get("bsp_delay_ms")
    processor = (
        BatchSpanProcessor(exporter)
        if delay is None
        else BatchSpanProcessor(exporter, schedule_delay_millis=delay)
    )
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")

    def record(i: int) -> None:
        with tracer.start_as_current_span("synthesize"):
            data = {"serviceProvider": "elevenlabs", "model": "m1", "characterCount": i + 1}
            record_tts(AGENT, f"cust_{i % 10}", "bench-tts", data)

    return record, provider.shutdown


def _sdk(s: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[], None]]:
    from paygent_sdk import Client

    client = Client(s["api_key"])
    client.base_url = s["url"]

    def record(i: int) -> None:
        data = {"serviceProvider": "elevenlabs", "model": "m1", "characterCount": i + 1}
        client.track_tts(AGENT, f"cust_{i % 10}", "bench-tts", data)

    return record, lambda: client._executor.shutdown(wait=True)


def main() -> None:
    """Run one application (see the module docstring)."""
    s = spec()
    record, stop = (_sdk if s["client"] == "sdk" else _otel)(s)
    n = s["n"]
    if s["mode"] == "exit":
        for i in range(n):
            record(i)
        emit("recorded", t=time.time())
        return  # the exit is what is measured
    rate = s["rate"]
    times: list[float] = []
    start = time.monotonic() + 0.05
    for i in range(n):
        pause = start + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        record(i)
        times.append(time.time())
    emit("recorded", times=times)
    wait_for("done")
    stop()
    emit("result")


if __name__ == "__main__":
    main()
