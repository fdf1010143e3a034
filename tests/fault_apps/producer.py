"""An application that records usage the way users do, driven over stdin by the fault suite.

A real ``TracerProvider`` + ``BatchSpanProcessor`` + ``PaygentSpanExporter`` (durable spool);
each usage record is one span with ``record_stt``, tagged ``metaTags.seq`` so the suite can
tell which records reached the sandbox. Commands, one per line on stdin; each answer is one
JSON line on stdout (``event`` says which):

- ``record N PACE``: record N more records, PACE seconds apart; ``progress`` lines every
  10 records, then ``recorded`` once the batch processor has handed them all to the
  exporter (so they are committed to the spool or refused), with the exporter's counters,
  the application thread's CPU time per record and the process's resident memory;
- ``flush SECONDS``: wait for delivery; ``flushed`` with ``ok`` and the counters;
- ``fsize BYTES`` / ``fsize none``: cap the size any file may grow to (the disk is full) /
  lift the cap (space was freed): ``fsize``;
- ``exit [SECONDS]``: shut the provider down (as at the end of a process), giving the
  exporter SECONDS (default: what the batch processor gives it, up to 30 s); ``exit``.

Options: ``--record-requests FILE`` logs every request the exporter sends (key, sent and
answered time, status) as JSON lines, through a transport wrapped around the real one;
``--fsize-limit BYTES`` caps file sizes before the exporter starts (a full disk at start);
``--first-seq N`` numbers this process's records from N (a second process on one spool).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import statistics
import sys
import threading
import time
from typing import IO, Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import paygent_otel.delivery.pipeline as delivery
from paygent_otel import PaygentSpanExporter, RetryPolicy, record_stt


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real transport, with each request's send and answer time written down."""

    def __init__(self, inner: httpx.AsyncBaseTransport, sink: IO[str]) -> None:
        self._inner = inner
        self._sink = sink
        self._lock = threading.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.time()
        response = await self._inner.handle_async_request(request)
        await response.aread()  # "answered" = the whole answer is here, as the worker sees it
        entry = {
            "key": request.headers.get("Idempotency-Key"),
            "sent": sent,
            "answered": time.time(),
            "status": response.status_code,
        }
        with self._lock:
            self._sink.write(json.dumps(entry) + "\n")
            self._sink.flush()
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def set_fsize(limit: int | None) -> None:
    """A file-size cap stands in for a full disk: writes past it fail (EFBIG)."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY if limit is None else limit, hard)
    )


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--record-requests")
    parser.add_argument("--fsize-limit", type=int)
    parser.add_argument("--spool-reopen-seconds", type=float)
    parser.add_argument("--first-seq", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # Past a file-size cap the kernel sends SIGXFSZ, which kills; a full disk does not.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if args.fsize_limit is not None:
        set_fsize(args.fsize_limit)
    if args.spool_reopen_seconds is not None:
        delivery.SPOOL_REOPEN_SECONDS = args.spool_reopen_seconds

    transport = None
    if args.record_requests:
        from httpx_aiohttp import AiohttpTransport

        sink = open(args.record_requests, "a", encoding="utf-8")
        transport = RecordingTransport(AiohttpTransport(), sink)
    exporter = PaygentSpanExporter(
        endpoint=args.endpoint,
        api_key=args.api_key,
        spool_path=args.spool,
        max_in_flight=args.max_in_flight,
        timeout=args.timeout,
        retry_policy=RetryPolicy(initial_interval=0.05, max_interval=0.5),
        transport=transport,
    )
    provider = TracerProvider()
    # A queue large enough that the processor never drops a span: what is measured here
    # is the exporter, from export() on.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=100_000, schedule_delay_millis=50)
    )
    tracer = provider.get_tracer("fault-producer")
    emit("ready", pid=os.getpid())

    seq = args.first_seq
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "record":
            count, pace = int(rest[0]), float(rest[1])
            thread_us: list[float] = []
            for _ in range(count):
                started = time.thread_time()
                with tracer.start_as_current_span("transcribe"):
                    record_stt(
                        "agent-fault",
                        f"cust-{seq % 4}",
                        "voice-minutes",
                        {"serviceProvider": "deepgram", "model": "nova-2",
                         "audioDuration": 0.01 * (seq % 50 + 1)},
                        meta_tags={"seq": seq},
                    )  # fmt: skip
                thread_us.append((time.thread_time() - started) * 1e6)
                seq += 1
                if seq % 10 == 0:
                    emit("progress", recorded=seq)
                if pace:
                    time.sleep(pace)
            provider.force_flush(30_000)
            emit(
                "recorded",
                recorded=seq,
                stats=exporter.stats,
                thread_us_median=statistics.median(thread_us) if thread_us else 0.0,
                thread_us_p90=statistics.quantiles(thread_us, n=10)[-1] if count > 1 else 0.0,
                rss_kib=rss_kib(),
            )
        elif command == "flush":
            ok = exporter.force_flush(int(float(rest[0]) * 1000))
            emit("flushed", ok=ok, stats=exporter.stats)
        elif command == "fsize":
            set_fsize(None if rest[0] == "none" else int(rest[0]))
            emit("fsize", limit=rest[0])
        elif command == "exit":
            if rest:  # a short grace period, as an orchestrator stopping the process gives
                provider.force_flush(30_000)
                exporter.shutdown(timeout_millis=float(rest[0]) * 1000)
            provider.shutdown()
            emit("exit", stats=exporter.stats)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
