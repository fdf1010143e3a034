"""The sender of row 5: OTLP/HTTP protobuf requests of 512 spans to the bridge.

``usage`` true: every span carries the workload's usage attributes; false: plain HTTP
server spans with no ``paygent.*`` attribute, most of what a Collector forwards.

It stands in for a Collector's ``otlphttp`` exporter: requests are built before the clock
starts (one ``ExportTraceServiceRequest`` of 512 spans carrying the workload's usage
attributes, re-keyed with fresh span ids for each request so every span is a new record),
then sent over keep-alive connections. Two phases:

- throughput: ``requests`` requests, ``concurrency`` at a time, as fast as the bridge
  answers; usage spans accepted per second = spans in 200 answers / elapsed time;
- acknowledgement: open loop at ``rate`` spans/s (a request every 512/rate s, sent on
  schedule whether or not the previous one was answered) for ``seconds``; each request's
  time from send to the 200 answer.

Protocol: prints ``built``, ``fast`` (after the throughput phase) and ``result``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench import workload
from bench._child import emit, spec

SPANS_PER_REQUEST = 512


def _any_value(value: Any) -> Any:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _plain_attributes(seq: int) -> dict[str, Any]:
    """An HTTP server span's attributes: nothing to bill."""
    return {"http.request.method": "GET", "url.path": f"/api/items/{seq % 100}",
            "http.response.status_code": 200, "server.address": "api.internal"}  # fmt: skip


def build_requests(count: int, first: int = 0, usage: bool = True) -> list[bytes]:
    """``count`` serialized requests of 512 spans each (usage spans, or plain ones), all span
    ids distinct."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    resource = ResourceSpans()
    resource.resource.attributes.extend(
        [KeyValue(key="service.name", value=_any_value("bench-collector-sender"))]
    )
    scope = ScopeSpans()
    scope.scope.name = "bench"
    start = time.time_ns()
    for r in workload.records(SPANS_PER_REQUEST):
        span = scope.spans.add()
        span.name = {"stt": "transcribe", "tts": "synthesize", "sts": "converse"}[r.kind]
        span.kind = Span.SPAN_KIND_INTERNAL
        span.start_time_unix_nano = start
        span.end_time_unix_nano = start + 1_000_000
        attributes = workload.attributes(r) if usage else _plain_attributes(r.seq)
        span.attributes.extend(KeyValue(key=k, value=_any_value(v)) for k, v in attributes.items())
    resource.scope_spans.append(scope)
    request = ExportTraceServiceRequest(resource_spans=[resource])
    spans = request.resource_spans[0].scope_spans[0].spans
    bodies = []
    for n in range(first, first + count):
        trace_id = (0xBE0C << 112 | n).to_bytes(16, "big")
        for i, span in enumerate(spans):
            span.trace_id = trace_id
            span.span_id = (n << 16 | i + 1).to_bytes(8, "big")
        bodies.append(request.SerializeToString())
    return bodies


async def _post(session: Any, url: str, body: bytes) -> float:
    began = time.perf_counter()
    async with session.post(
        url, data=body, headers={"Content-Type": "application/x-protobuf"}
    ) as response:
        answer = await response.read()
        if response.status != 200:
            raise RuntimeError(f"bridge answered {response.status}: {answer[:300]!r}")
        _check_no_rejections(answer)
    return time.perf_counter() - began


def _check_no_rejections(answer: bytes) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    response = ExportTraceServiceResponse.FromString(answer)
    if response.partial_success.rejected_spans:
        raise RuntimeError(f"bridge rejected spans: {response.partial_success}")


async def throughput(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body, ``concurrency`` at a time; spans/s and acknowledgement times."""
    import aiohttp

    queue = list(reversed(bodies))
    times: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def sender() -> None:
            while queue:
                times.append(await _post(s, url, queue.pop()))

        began = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {
        "requests": len(bodies),
        "spans": len(bodies) * SPANS_PER_REQUEST,
        "elapsed_s": elapsed,
        "spans_per_s": len(bodies) * SPANS_PER_REQUEST / elapsed,
        **_percentiles(times),
    }


async def paced(url: str, bodies: list[bytes], rate: float) -> dict[str, Any]:
    """Open loop: one body every 512/rate seconds, each acknowledgement timed."""
    import aiohttp

    period = SPANS_PER_REQUEST / rate
    async with aiohttp.ClientSession() as s:
        began = time.perf_counter()
        tasks = []
        for n, body in enumerate(bodies):
            delay = began + n * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(s, url, body)))
        times = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    return {
        "requests": len(bodies),
        "spans": len(bodies) * SPANS_PER_REQUEST,
        "rate_spans_per_s": rate,
        "elapsed_s": elapsed,
        "achieved_spans_per_s": len(bodies) * SPANS_PER_REQUEST / elapsed,
        **_percentiles(list(times)),
    }


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "ack_p50_ms": statistics.median(ordered) * 1e3,
        "ack_p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        "ack_max_ms": ordered[-1] * 1e3,
    }


def main() -> None:
    """Build the requests, run both phases, report."""
    s = spec()
    url = s["url"] + "/v1/traces"
    paced_count = max(1, round(s["seconds"] * s["rate"] / SPANS_PER_REQUEST))
    bodies = build_requests(s["requests"] + paced_count, usage=s.get("usage", True))
    emit("built", requests=len(bodies), bytes_per_request=len(bodies[0]))
    fast = asyncio.run(throughput(url, bodies[: s["requests"]], s["concurrency"]))
    emit("fast")
    slow = asyncio.run(paced(url, bodies[s["requests"] :], s["rate"]))
    emit("result", throughput=fast, paced=slow)


if __name__ == "__main__":
    main()
