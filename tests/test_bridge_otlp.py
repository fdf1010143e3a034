"""The OTLP bridge end to end in one process: OTLP/HTTP in, the sandbox's ledger out.

A real :class:`BridgeServer` (uvicorn on loopback) in front of a real sandbox; requests are
built by the OpenTelemetry SDK (spans and logs through its own OTLP encoders, metrics
through the stock OTLP/HTTP exporter) or, where the test needs exact timestamps, as
protobuf messages. Assertions are on the ledger, the spool and the OTLP responses.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import partially_rejected, wait_for
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paygent_otel.bridge import (
    LOGS_PATH,
    METRICS_PATH,
    TRACES_PATH,
    BridgeServer,
    Limits,
)
from paygent_otel.convention import semconv as sc
from paygent_otel.delivery.spool import SqliteSpool

PB = {"Content-Type": "application/x-protobuf"}
STT = {
    sc.USAGE_KIND: "stt",
    sc.STT_AUDIO_SECONDS: 30.0,
    sc.CUSTOMER_ID: "cust-1",
    sc.PROVIDER: "deepgram",
    sc.MODEL: "nova-2",
}
RESOURCE = {sc.AGENT_ID: "agent-voice", "service.name": "voice-app"}

"""The shared fixture of conftest.py, still named here for test_keys_and_limits.py."""


def delivered(server: BridgeServer) -> None:
    assert server.app.pipeline.force_flush(10.0), server.app.pipeline.stats.snapshot()


def span_request(build: Callable[[Tracer], None], resource: dict[str, Any] = RESOURCE) -> Any:
    """Spans made by a real TracerProvider, encoded by the SDK's own OTLP encoder."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    build(provider.get_tracer("tests"))
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans())


def one_span(tracer: Tracer, attributes: dict[str, Any], name: str = "transcribe") -> None:
    with tracer.start_as_current_span(name, attributes=attributes):
        pass


def otlp_json(message: Any) -> bytes:
    """OTLP/JSON as the spec writes it: camelCase, ids as hex, enums as integers."""
    document = json_format.MessageToDict(message, use_integers_for_enums=True)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(document)
    return json.dumps(document).encode()


def sum_request(
    name: str,
    points: list[tuple[int, int, float | int]],
    *,
    temporality: int = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
    attributes: dict[str, str] | None = None,
) -> ExportMetricsServiceRequest:
    """One monotonic sum with points (start_ns, time_ns, value)."""
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    for key, value in RESOURCE.items():
        rm.resource.attributes.add(key=key).value.string_value = value
    metric = rm.scope_metrics.add().metrics.add(name=name)
    metric.sum.is_monotonic = True
    metric.sum.aggregation_temporality = temporality
    for start, time_ns, value in points:
        point = metric.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=time_ns)
        if isinstance(value, int):
            point.as_int = value
        else:
            point.as_double = value
        for key, text in (
            attributes or {"paygent.customer.id": "cust-m", sc.PROVIDER: "el", sc.MODEL: "m1"}
        ).items():
            point.attributes.add(key=key).value.string_value = text
    return request


def post(server: BridgeServer, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={**PB, **headers}, timeout=10.0)


# --------------------------------------------------------------------------- spans


def test_spans_with_and_without_usage_bill_only_the_usage(bridge, sandbox) -> None:
    server = bridge()

    def build(tracer: Tracer) -> None:
        one_span(tracer, STT)
        one_span(tracer, {"http.route": "/healthz"}, name="GET /healthz")
        with tracer.start_as_current_span("session", attributes={sc.CUSTOMER_ID: "cust-2"}) as span:
            span.add_event(
                sc.USAGE_EVENT_NAME,
                {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 120, sc.PROVIDER: "el", sc.MODEL: "m1"},
            )
            span.add_event("other")
            span.add_event(
                sc.USAGE_EVENT_NAME,
                {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 80, sc.PROVIDER: "el", sc.MODEL: "m1"},
            )

    response = post(server, TRACES_PATH, span_request(build).SerializeToString())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert not answer.HasField("partial_success")
    delivered(server)
    totals = sandbox.ledger.totals(by=("agent_id", "customer_id", "kind"))
    assert totals == [
        {"agent_id": "agent-voice", "customer_id": "cust-1", "kind": "stt", "calls": 1,
         "audio_minutes": 0.5, "characters": 0, "sts_tokens": 0, "sts_minutes": 0.0},
        {"agent_id": "agent-voice", "customer_id": "cust-2", "kind": "tts", "calls": 2,
         "audio_minutes": 0.0, "characters": 200, "sts_tokens": 0, "sts_minutes": 0.0},
    ]  # fmt: skip


def test_a_retried_request_is_billed_once(bridge, sandbox) -> None:
    server = bridge()
    body = span_request(lambda t: [one_span(t, STT) for _ in range(3)]).SerializeToString()
    assert post(server, TRACES_PATH, body).status_code == 200
    delivered(server)
    # The Collector did not see the first answer and sends the same request again.
    assert (
        post(server, TRACES_PATH, gzip.compress(body), **{"Content-Encoding": "gzip"}).status_code
        == 200
    )
    delivered(server)
    assert sandbox.ledger.count() == 3
    assert len(set(sandbox.ledger.keys())) == 3
    assert server.app.pipeline.stats.snapshot()["duplicate_suppressed"] == 3


def test_invalid_records_are_reported_and_dead_lettered(bridge, sandbox) -> None:
    server = bridge()

    def build(tracer: Tracer) -> None:
        one_span(tracer, STT)
        one_span(tracer, {**STT, sc.CUSTOMER_ID: ""}, name="no-customer")
        one_span(tracer, {**STT, sc.STT_AUDIO_SECONDS: -5.0}, name="negative")

    response = post(server, TRACES_PATH, span_request(build).SerializeToString())
    partially_rejected(
        response,
        2,
        "paygent.customer.id is missing or blank",
        "paygent.stt.audio.seconds must not be negative",
    )
    delivered(server)
    assert sandbox.ledger.count() == 1
    spool = server.app.pipeline.spool
    assert isinstance(spool, SqliteSpool)
    dead = spool.dead_letters(status="invalid")
    assert sorted(d.origin.split("'")[1] for d in dead) == ["negative", "no-customer"]


def test_json_requests_get_json_answers(bridge, sandbox) -> None:
    server = bridge()
    request = span_request(lambda t: [one_span(t, STT), one_span(t, {sc.USAGE_KIND: "xyz"})])
    body = otlp_json(request)
    assert '"traceId": "' in body.decode() and "==" not in body.decode()  # hex, not base64
    response = post(server, TRACES_PATH, body, **{"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert int(document["partialSuccess"]["rejectedSpans"]) == 1
    assert "unknown usage kind 'xyz'" in document["partialSuccess"]["errorMessage"]
    delivered(server)
    [row] = sandbox.ledger.rows()
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    assert row["meta_tags"]["otel_trace_id"] == trace_id


# --------------------------------------------------------------------------- logs


def log_request(records: list[dict[str, Any]]) -> Any:
    """Log records emitted through a real LoggerProvider, encoded by the SDK's encoder."""
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create(RESOURCE))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("usage-log-test")
    for attributes in records:
        logger.emit(body="usage", attributes=attributes, timestamp=time.time_ns())
    provider.shutdown()
    return encode_logs(exporter.get_finished_logs())


def test_log_records_with_the_usage_kind_are_usage_records(bridge, sandbox) -> None:
    server = bridge()
    sts = {sc.USAGE_KIND: "sts", sc.STS_INPUT_TEXT_TOKENS: 40, sc.STS_OUTPUT_AUDIO_TOKENS: 60,
           sc.CUSTOMER_ID: "cust-l", sc.PROVIDER: "openai", sc.MODEL: "rt"}  # fmt: skip
    request = log_request([sts, {"note": "not usage"}, {**sts, sc.STS_INPUT_TEXT_TOKENS: 10}])
    response = post(server, LOGS_PATH, request.SerializeToString())
    assert response.status_code == 200
    assert not ExportLogsServiceResponse.FromString(response.content).HasField("partial_success")
    # Resent after a Collector restart: a later observed time, same records, billed once.
    for record in request.resource_logs[0].scope_logs[0].log_records:
        record.observed_time_unix_nano += 5_000_000_000
    assert post(server, LOGS_PATH, request.SerializeToString()).status_code == 200
    delivered(server)
    assert sandbox.ledger.totals(by=("agent_id", "kind")) == [
        {"agent_id": "agent-voice", "kind": "sts", "calls": 2, "audio_minutes": 0.0,
         "characters": 0, "sts_tokens": 170, "sts_minutes": 0.0},
    ]  # fmt: skip


# --------------------------------------------------------------------------- metrics


def test_stock_sdk_cumulative_counters_bill_each_increment_once(bridge, sandbox) -> None:
    server = bridge()
    exporter = OTLPMetricExporter(endpoint=server.url + METRICS_PATH)  # CUMULATIVE by default
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource.create(RESOURCE), metric_readers=[reader])
    counter = provider.get_meter("app").create_counter(sc.TTS_CHARACTERS, unit="{character}")
    identity = {sc.CUSTOMER_ID: "cust-m", sc.PROVIDER: "el", sc.MODEL: "m1"}
    for amount in (100, 250, 0, 7):
        counter.add(amount, identity)
        assert reader.force_flush(10_000)
    provider.shutdown()
    delivered(server)
    [total] = sandbox.ledger.totals(by=("customer_id",))
    assert (total["calls"], total["characters"]) == (3, 357)


def test_cumulative_streams_survive_retries_reordering_and_sender_restarts(bridge, sandbox) -> None:
    server = bridge()
    name = sc.STT_AUDIO_SECONDS

    def send(points: list[tuple[int, int, float | int]]) -> None:
        assert (
            post(server, METRICS_PATH, sum_request(name, points).SerializeToString()).status_code
            == 200
        )

    send([(1_000, 2_000, 60.0)])  # first point: all of it, 1 min
    send([(1_000, 3_000, 90.0)])  # +30 s
    send([(1_000, 3_000, 90.0)])  # the same request again (Collector retry): nothing
    send([(1_000, 2_500, 75.0)])  # older than the last committed point: nothing
    send([(5_000, 6_000, 30.0)])  # sender restarted (new start time): +30 s
    send([(5_000, 7_000, 12.0)])  # value went down, same start (restart): +12 s
    send([(5_000, 8_000, 12.0), (5_000, 9_000, 24.0)])  # two exports in one batch: +12 s
    delivered(server)
    [total] = sandbox.ledger.totals(by=("customer_id",))
    assert total["calls"] == 5
    assert total["audio_minutes"] == pytest.approx((60 + 30 + 30 + 12 + 12) / 60)
    assert len(set(sandbox.ledger.keys())) == 5


def test_cumulative_state_outlives_a_bridge_restart(bridge, sandbox, tmp_path) -> None:
    spool = tmp_path / "restart.sqlite3"
    first = bridge(spool_path=spool)
    body = sum_request(sc.TTS_CHARACTERS, [(1, 10, 500)]).SerializeToString()
    assert post(first, METRICS_PATH, body).status_code == 200
    first.stop()
    second = bridge(spool_path=spool)
    assert post(second, METRICS_PATH, body).status_code == 200  # replayed after the restart
    later = sum_request(sc.TTS_CHARACTERS, [(1, 20, 650)]).SerializeToString()
    assert post(second, METRICS_PATH, later).status_code == 200
    delivered(second)
    assert [r["characters"] for r in sandbox.ledger.rows()] == [500, 150]


def test_a_crash_between_spool_and_state_commits_neither_loses_nor_repeats(
    bridge, sandbox, tmp_path
) -> None:
    spool = tmp_path / "crash.sqlite3"
    first = bridge(spool_path=spool)
    app = first.app
    assert (
        post(
            first, METRICS_PATH, sum_request(sc.TTS_CHARACTERS, [(1, 10, 100)]).SerializeToString()
        ).status_code
        == 200
    )
    # The next batch reaches the spool, then the process dies before the state commit.
    request = sum_request(sc.TTS_CHARACTERS, [(1, 20, 130)])
    extraction = app.extractor.metrics(request, app.cumulative)
    assert app.cumulative is not None
    app.cumulative.journal(extraction.updates, [r.idempotency_key for r in extraction.records])
    assert app.pipeline.submit(extraction.records, extraction.rejections) == 0
    first.stop()  # no commit: the journal stays, as after a crash
    second = bridge(spool_path=spool)
    # The next export overtakes the Collector's retry of the unacknowledged one.
    for points in ([(1, 30, 175)], [(1, 20, 130)]):
        body = sum_request(sc.TTS_CHARACTERS, points).SerializeToString()
        assert post(second, METRICS_PATH, body).status_code == 200
    delivered(second)
    assert [r["characters"] for r in sandbox.ledger.rows()] == [100, 30, 45]


def test_delta_sums_are_billed_as_sent(bridge, sandbox) -> None:
    server = bridge()
    request = sum_request(
        sc.STS_INPUT_TEXT_TOKENS,
        [(0, 10, 5), (10, 20, 7)],
        temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA,
    )
    assert post(server, METRICS_PATH, request.SerializeToString()).status_code == 200
    delivered(server)
    assert [r["sts_tokens"] for r in sandbox.ledger.rows()] == [5, 7]


def test_usage_names_on_other_instruments_are_refused(bridge, sandbox) -> None:
    server = bridge()
    request = sum_request(sc.TTS_CHARACTERS, [(0, 10, 5)])
    gauge = request.resource_metrics[0].scope_metrics[0].metrics.add(name=sc.STT_AUDIO_SECONDS)
    gauge.gauge.data_points.add(time_unix_nano=10, as_double=3.0)
    gauge.gauge.data_points.add(time_unix_nano=11, as_double=4.0)
    other = request.resource_metrics[0].scope_metrics[0].metrics.add(name="http.server.duration")
    other.gauge.data_points.add(time_unix_nano=10, as_double=3.0)
    response = post(server, METRICS_PATH, request.SerializeToString())
    partially_rejected(
        response,
        2,
        "'paygent.stt.audio.seconds' is a Paygent usage instrument but arrived as a gauge",
    )
    delivered(server)
    assert [r["characters"] for r in sandbox.ledger.rows()] == [5]


def test_cumulative_sums_are_refused_without_a_durable_spool(bridge, sandbox) -> None:
    server = bridge(spool_path=":memory:")
    response = post(
        server, METRICS_PATH, sum_request(sc.TTS_CHARACTERS, [(0, 10, 5)]).SerializeToString()
    )
    partially_rejected(
        response,
        1,
        "cumulative temporality",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta",
    )
    delivered(server)
    assert sandbox.ledger.count() == 0


def test_limits_apply_to_the_usage_attributes_only(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_attribute_length=64))

    def build(tracer: Tracer) -> None:
        one_span(tracer, {**STT, "http.url": "https://example.com/" + "x" * 5000})
        one_span(tracer, {**STT, sc.CUSTOMER_ID: "c" * 65}, name="long-customer")

    response = post(server, TRACES_PATH, span_request(build).SerializeToString())
    partially_rejected(
        response, 1, "attribute paygent.customer.id is 65 characters long, over the limit of 64"
    )
    delivered(server)
    wait_for(lambda: sandbox.ledger.count() == 1)


def test_a_crash_before_the_spool_commit_leaves_the_increment_to_the_retry(
    bridge, sandbox, tmp_path
) -> None:
    spool = tmp_path / "crash.sqlite3"
    first = bridge(spool_path=spool)
    app = first.app
    body = sum_request(sc.TTS_CHARACTERS, [(1, 10, 100)]).SerializeToString()
    assert post(first, METRICS_PATH, body).status_code == 200
    request = sum_request(sc.TTS_CHARACTERS, [(1, 20, 130)])
    extraction = app.extractor.metrics(request, app.cumulative)
    assert app.cumulative is not None
    app.cumulative.journal(extraction.updates, [r.idempotency_key for r in extraction.records])
    first.stop()  # died before the records reached the spool: nothing was acknowledged
    second = bridge(spool_path=spool)
    assert post(second, METRICS_PATH, request.SerializeToString()).status_code == 200
    delivered(second)
    assert [r["characters"] for r in sandbox.ledger.rows()] == [100, 30]
