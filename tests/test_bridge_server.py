"""The bridge as a server: health, its own metrics, back-pressure, concurrency, shutdown.

The shutdown test runs the real ``paygent-otel serve`` command in a child process and
stops it with SIGTERM while a request is half-way in.
"""

from __future__ import annotations

import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import prometheus_sample, serving, wait_for
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paygent_otel.bridge import TRACES_PATH, Limits
from paygent_otel.convention import semconv as sc

PB = {"Content-Type": "application/x-protobuf"}


def spans(count: int, customer: str = "cust-1") -> bytes:
    """``count`` TTS usage spans from a real TracerProvider, protobuf-encoded by the SDK."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({sc.AGENT_ID: "agent-voice"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    for _ in range(count):
        attributes = {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 10, sc.CUSTOMER_ID: customer,
                      sc.PROVIDER: "el", sc.MODEL: "m1"}  # fmt: skip
        with tracer.start_as_current_span("synthesize", attributes=attributes):
            pass
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) in Prometheus text."""
    value = prometheus_sample(text, name)
    assert value is not None, f"{name} not in\n{text}"
    return value


def half_sent(url: str, body: bytes) -> socket.socket:
    """A request whose headers and first half of the body are sent; the rest is not (yet)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10.0)
    head = (
        f"POST {TRACES_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def finish(sock: socket.socket, body: bytes) -> int:
    """Send the rest of the body; the response's status code."""
    sock.sendall(body[len(body) // 2 :])
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    sock.close()
    return int(answer.split(b" ", 2)[1])


def test_one_health_path_on_both_servers(bridge, sandbox) -> None:
    """``/health`` on the bridge and the sandbox; the sandbox's ``/healthz`` is a deprecated
    alias kept for one release."""
    for url in (bridge().url + "/health", sandbox.url + "/health", sandbox.url + "/healthz"):
        answer = httpx.get(url)
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"}), url


def test_health_and_own_metrics(bridge, sandbox) -> None:
    server = bridge()
    health = httpx.get(server.url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert httpx.post(server.url + TRACES_PATH, content=spans(3), headers=PB).status_code == 200
    assert httpx.post(server.url + TRACES_PATH, content=b"\x01", headers=PB).status_code == 400
    assert server.app.pipeline.force_flush(5.0)
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 'paygent_bridge_requests_total{signal="traces",status="200"}') == 1
    assert metric(text, 'paygent_bridge_requests_total{signal="traces",status="400"}') == 1
    assert metric(text, 'paygent_bridge_items_received_total{signal="traces"}') == 3
    assert metric(text, 'paygent_bridge_usage_records_total{signal="traces",result="valid"}') == 3
    assert metric(text, 'paygent_bridge_requests_rejected_total{reason="bad_request"}') == 1
    assert metric(text, 'paygent_bridge_delivery_records_total{outcome="delivered"}') == 3
    assert metric(text, "paygent_bridge_spool_pending") == 0
    assert metric(text, "paygent_bridge_in_flight_requests") == 0
    assert sandbox.ledger.count() == 3


def test_a_full_spool_is_503_with_retry_after_and_nothing_acknowledged(bridge, sandbox) -> None:
    server = bridge(spool_max_bytes=1)
    response = httpx.post(server.url + TRACES_PATH, content=spans(2), headers=PB)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    message = status_pb2.Status.FromString(response.content).message
    assert "could not be stored (spool full or stopping)" in message
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 'paygent_bridge_requests_rejected_total{reason="spool_full"}') == 1
    assert server.app.pipeline.spool.pending() == 0
    assert sandbox.ledger.count() == 0


def test_more_requests_than_the_limit_are_429_with_retry_after(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_concurrent_requests=1))
    # A request still sending its body holds no processing slot.
    bodies = [spans(5, customer="cust-1"), spans(5, customer="cust-2")]
    slow = [half_sent(server.url, body) for body in bodies]
    assert httpx.get(server.url + "/health").status_code == 200
    wait_for(
        lambda: server.app.memory.used == sum(map(len, bodies)),
        message="both half-sent requests are reading their bodies",
    )
    third = spans(1, customer="cust-3")
    assert httpx.post(server.url + TRACES_PATH, content=third, headers=PB).status_code == 200
    assert [finish(sock, body) for sock, body in zip(slow, bodies, strict=True)] == [200, 200]
    # A request being processed holds the one slot: metrics wait for their lock here.
    with ThreadPoolExecutor(1) as pool:
        with server.app.intake.lock:
            held = pool.submit(
                httpx.post, server.url + "/v1/metrics", content=b"", headers=PB, timeout=10.0
            )
            wait_for(
                lambda: metric(server.app.metrics_text(), "paygent_bridge_in_flight_requests") == 1,
                message="the metrics request is being processed",
            )
            second = httpx.post(server.url + TRACES_PATH, content=spans(1), headers=PB)
    assert held.result().status_code == 200
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    assert (
        "more than 1 export requests in progress"
        in status_pb2.Status.FromString(second.content).message
    )
    assert server.app.pipeline.force_flush(5.0)
    assert sandbox.ledger.count() == 11


def test_concurrent_senders_are_all_billed_once(bridge, sandbox) -> None:
    server = bridge()
    bodies = [spans(20, customer=f"cust-{i}") for i in range(16)]
    with httpx.Client(headers=PB, timeout=30.0) as client, ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda b: client.post(server.url + TRACES_PATH, content=b).status_code, bodies)
        )
    assert statuses == [200] * 16
    assert server.app.pipeline.force_flush(20.0)
    assert sandbox.ledger.count() == 320
    assert len(set(sandbox.ledger.keys())) == 320


def test_sigterm_finishes_the_request_in_progress_then_flushes(sandbox, tmp_path) -> None:
    flags = ("--spool", str(tmp_path / "spool.sqlite3"), "--endpoint", sandbox.url,
             "--drain-grace", "0.5")  # fmt: skip
    with serving(*flags) as served:
        url = served.url
        body = spans(4)
        sock = half_sent(url, body)
        wait_for(
            lambda: (
                prometheus_sample(
                    httpx.get(url + "/metrics").text, "paygent_bridge_memory_budget_used_bytes"
                )
                == len(body)
            ),
            message="the half-sent request is reading its body",
        )
        served.process.send_signal(signal.SIGTERM)  # drains first (--drain-grace): /health 503

        def refusing() -> bool:
            try:
                httpx.get(url + "/health", timeout=1.0)
            except httpx.TransportError:
                return True
            return False

        wait_for(refusing, message="the bridge stops accepting connections")
        assert finish(sock, body) == 200
        output, _ = served.process.communicate(timeout=30)
    assert served.process.returncode == 0, output
    assert "SIGTERM received, stopping" in output
    assert output.rstrip().endswith(
        "0 left in " + str(tmp_path / "spool.sqlite3") + " for delivery"
    )
    assert sandbox.ledger.count() == 4  # delivered during the shutdown flush
