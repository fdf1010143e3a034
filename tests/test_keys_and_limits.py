"""Keys that survive every sender, span limits that never change who pays, dead letters
that can be corrected (issue #10, findings 5 to 8).

Everything runs for real: a genuine ``otelcol-contrib`` killed and restarted mid-file, real
``TracerProvider`` s with their span limits set low, the bridge answering real OTLP/HTTP
requests, SQLite spool files (one written with the previous release's schema), and the
sandbox's ledger as the verdict.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_collectors
from conftest import Tracing, prometheus_sample, wait_for
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from test_bridge_otlp import delivered, post
from test_collectors import (
    UsageWriter,
    bridge_counter,
    free_port,
    start_bridge,
    start_otelcol,
    usage_line,
)
from test_span_exporter import ended_span, ids
from test_spool_cli import run

from paygent_otel.bridge import LOGS_PATH, TRACES_PATH, BridgeServer
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    idempotency_key,
)
from paygent_otel.delivery.spool import SqliteSpool, destination_id
from paygent_otel.exporters.metrics import UsagePoint, records_from_points
from paygent_otel.sandbox import SandboxServer

IDENTITY = {sc.AGENT_ID: "agent-1", sc.PROVIDER: "deepgram", sc.MODEL: "nova-2"}
STT = {sc.USAGE_KIND: "stt", sc.STT_AUDIO_SECONDS: 30.0}
TTS = {sc.USAGE_KIND: "tts", sc.PROVIDER: "elevenlabs", sc.MODEL: "flash"}


def customers(sandbox: SandboxServer) -> list[str]:
    return sorted(row["customer_id"] for row in sandbox.ledger.rows())


def set_attributes(target: Any, attributes: dict[str, Any]) -> None:
    """Attributes onto a protobuf repeated ``KeyValue`` field."""
    for key, value in attributes.items():
        any_value = target.add(key=key).value
        if isinstance(value, str):
            any_value.string_value = value
        elif isinstance(value, int):
            any_value.int_value = value
        else:
            any_value.double_value = value


def trace_request(*spans: tuple[bytes, bytes, dict[str, Any]], **span_fields: int) -> bytes:
    """One protobuf trace request, one span per (trace id, span id, attributes)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    set_attributes(resource_spans.resource.attributes, {sc.AGENT_ID: "agent-1"})
    scope = resource_spans.scope_spans.add()
    for trace_id, span_id, attributes in spans:
        span = scope.spans.add(trace_id=trace_id, span_id=span_id, name="transcribe", **span_fields)
        set_attributes(span.attributes, attributes)
    return bytes(request.SerializeToString())


def partial_success(response: Any, message: type[Any]) -> Any:
    assert response.status_code == 200, response.text
    answer = message()
    answer.ParseFromString(response.content)
    return answer.partial_success


"""Fixture: a started in-process bridge delivering to the sandbox (``bridge(spool_path=...)``)."""
children = test_collectors.children
"""Fixture: child processes, stopped at teardown."""

VALID_TRACE, VALID_SPAN = (
    bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
    bytes.fromhex("00f067aa0ba902b7"),
)


# ----------------------------------------------------------- 5: a Collector restarted mid-file


def test_a_collector_killed_and_restarted_mid_file_bills_each_line_once(
    sandbox, children, tmp_path
) -> None:
    bridge_url = start_bridge(children, sandbox, tmp_path / "spool.sqlite3", free_port())
    usage_file = tmp_path / "usage-1.jsonl"
    usage_file.write_text("".join(usage_line(i) for i in range(150)))
    glob = tmp_path / "usage-*.jsonl"
    collector = start_otelcol(children, tmp_path, glob, bridge_url)
    writer = UsageWriter(usage_file, 20, written=150)  # the program keeps writing
    logs_in = 'paygent_bridge_items_received_total{signal="logs"}'
    wait_for(lambda: bridge_counter(bridge_url, logs_in) >= 150, timeout=30, message="sending")
    collector.stop(signal.SIGKILL)
    time.sleep(0.5)
    # Without offset storage (this build has no file_storage) it reads the file from the
    # start again: every line so far arrives a second time, attributes in another order.
    start_otelcol(children, tmp_path, glob, bridge_url)
    time.sleep(1.0)
    total = writer.stop()
    wait_for(
        lambda: (
            bridge_counter(bridge_url, logs_in) >= total + 150 and sandbox.ledger.count() >= total
        ),
        timeout=60,
        message="the file read again and all usage billed",
    )
    time.sleep(1.0)  # a line billed twice would show up now
    assert sandbox.ledger.count() == total
    assert len(set(sandbox.ledger.keys())) == total
    [row] = sandbox.ledger.totals(by=("agent_id",))
    assert row["characters"] == sum(100 + i % 7 for i in range(total))
    suppressed = 'paygent_bridge_delivery_records_total{outcome="duplicate_suppressed"}'
    assert bridge_counter(bridge_url, suppressed) >= 150


# ------------------------------------------------------------------- 6: span limits


def test_a_customer_evicted_by_the_attribute_limit_is_not_billed_to_a_fallback(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(
        customer_id="default-customer",
        resource={sc.AGENT_ID: "agent-1"},
        span_limits=SpanLimits(max_span_attributes=8),
    )
    tracer = pipeline.tracer
    with tracer.start_as_current_span("evicted") as span:
        span.set_attribute(sc.CUSTOMER_ID, "cust-right")  # the oldest: evicted first
        span.set_attributes({**STT, **IDENTITY, "app.a": 1, "app.b": 2, "app.c": 3})
    with tracer.start_as_current_span("kept") as kept:
        kept.set_attributes({"app.a": 1, "app.b": 2, "app.c": 3})  # these are evicted
        kept.set_attributes({**STT, **IDENTITY, sc.CUSTOMER_ID: "cust-right"})
    pipeline.flush()

    assert span.dropped_attributes == 1 and kept.dropped_attributes == 1  # type: ignore[attr-defined]
    assert customers(sandbox) == ["cust-right"]  # the span that kept its identity
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert dead.status == "invalid"
    assert "paygent.customer.id would come from the exporter's defaults" in dead.reason
    assert "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT" in dead.reason
    assert pipeline.exporter.stats["invalid"] == 1


def test_an_agent_on_the_resource_is_refused_when_the_span_lost_attributes(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(
        resource={sc.AGENT_ID: "resource-agent"}, span_limits=SpanLimits(max_span_attributes=6)
    )
    with pipeline.tracer.start_as_current_span("turn") as span:
        span.set_attribute(sc.AGENT_ID, "span-agent")  # evicted: the resource's would bill
        span.set_attributes({**STT, sc.PROVIDER: "deepgram", sc.MODEL: "nova-2"})
        span.set_attributes({sc.CUSTOMER_ID: "cust-1", "app.a": 1})
    pipeline.flush()
    assert sandbox.ledger.count() == 0
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert "paygent.agent.id would come from the resource" in dead.reason


def test_a_usage_kind_evicted_by_the_attribute_limit_is_refused_not_ignored(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(span_limits=SpanLimits(max_span_attributes=7))
    with pipeline.tracer.start_as_current_span("turn") as span:
        span.set_attribute(sc.USAGE_KIND, "stt")  # evicted
        span.set_attributes({sc.STT_AUDIO_SECONDS: 30.0, **IDENTITY, sc.CUSTOMER_ID: "c"})
        span.set_attributes({"app.a": 1, "app.b": 2})
    pipeline.flush()
    assert sandbox.ledger.count() == 0
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert "paygent.usage.kind was probably one of them" in dead.reason
    assert "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT" in dead.reason


def test_an_event_that_lost_its_customer_does_not_inherit_the_spans(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(span_limits=SpanLimits(max_event_attributes=4))
    with pipeline.tracer.start_as_current_span("session", attributes=IDENTITY) as span:
        span.set_attribute(sc.CUSTOMER_ID, "span-customer")
        # Five attributes, the limit is four: the first, the customer, is evicted.
        event = {sc.CUSTOMER_ID: "event-customer", **TTS, sc.TTS_CHARACTERS: 100}
        span.add_event(sc.USAGE_EVENT_NAME, event)
        span.add_event(sc.USAGE_EVENT_NAME, {**TTS, sc.TTS_CHARACTERS: 50})  # 4: kept whole
    pipeline.flush()
    assert customers(sandbox) == ["span-customer"]  # only the event that had no customer
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert (
        "would come from the span, but the SDK dropped 1 attributes from this span event"
        in dead.reason
    )
    assert "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT" in dead.reason


def test_an_id_cut_to_the_value_length_limit_is_refused(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "16")
    pipeline = tracing()  # the TracerProvider reads the limit from the environment
    long_id = "customer-" + "x" * 31  # 40 characters: the SDK keeps the first 16
    with pipeline.tracer.start_as_current_span("long", attributes={**STT, **IDENTITY}) as span:
        span.set_attribute(sc.CUSTOMER_ID, long_id)
    with pipeline.tracer.start_as_current_span("short", attributes={**STT, **IDENTITY}) as short:
        short.set_attribute(sc.CUSTOMER_ID, "cust-short")
    pipeline.flush()
    assert span.attributes[sc.CUSTOMER_ID] == long_id[:16]  # type: ignore[attr-defined]
    assert customers(sandbox) == ["cust-short"]
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert "paygent.customer.id is exactly 16 characters long" in dead.reason
    assert "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT" in dead.reason


def test_usage_events_dropped_by_the_event_limit_are_counted_and_logged_as_lost(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "paygent_otel")
    pipeline = tracing()
    with pipeline.tracer.start_as_current_span("long session", attributes=IDENTITY) as span:
        span.set_attribute(sc.CUSTOMER_ID, "cust-1")
        for i in range(129):  # the SDK keeps the last 128 (OTEL_SPAN_EVENT_COUNT_LIMIT)
            span.add_event(sc.USAGE_EVENT_NAME, {**TTS, sc.TTS_CHARACTERS: 10 + i})
    pipeline.flush()
    assert sandbox.ledger.count() == 128
    assert pipeline.exporter.stats["lost_to_span_event_limit"] == 1
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1 and "OTEL_SPAN_EVENT_COUNT_LIMIT" in lost[0]


def test_the_bridge_uses_the_dropped_attribute_count_otlp_carries(
    bridge, sandbox: SandboxServer
) -> None:
    server: BridgeServer = bridge()
    other_span = bytes.fromhex("00f067aa0ba902b8")
    attributes = {**STT, sc.CUSTOMER_ID: "cust-1", sc.PROVIDER: "deepgram", sc.MODEL: "nova-2"}
    lost_some = trace_request((VALID_TRACE, VALID_SPAN, attributes), dropped_attributes_count=3)
    answer = partial_success(post(server, TRACES_PATH, lost_some), ExportTraceServiceResponse)
    assert answer.rejected_spans == 1
    assert "paygent.agent.id would come from the resource" in answer.error_message
    whole = trace_request((VALID_TRACE, other_span, attributes))
    answer = partial_success(post(server, TRACES_PATH, whole), ExportTraceServiceResponse)
    assert answer.rejected_spans == 0
    # A span whose sender dropped 2 events, beside its one usage event.
    request = ExportTraceServiceRequest()
    request.ParseFromString(
        trace_request((VALID_TRACE, bytes(7) + b"\x09", {}), dropped_events_count=2)
    )
    event = request.resource_spans[0].scope_spans[0].spans[0].events.add(name=sc.USAGE_EVENT_NAME)
    set_attributes(event.attributes, {**TTS, sc.TTS_CHARACTERS: 40, sc.CUSTOMER_ID: "cust-2"})
    answer = partial_success(
        post(server, TRACES_PATH, request.SerializeToString()), ExportTraceServiceResponse
    )
    assert answer.rejected_spans == 0
    assert "2 events were dropped by the sender's span event limit" in answer.error_message
    delivered(server)
    assert customers(sandbox) == ["cust-1", "cust-2"]
    assert server.app.pipeline.stats.snapshot()["lost_to_span_event_limit"] == 2
    lost = 'paygent_bridge_usage_records_total{signal="traces",result="lost"}'
    assert prometheus_sample(server.app.metrics_text(), lost) == 2


# ------------------------------------------------------------------ 7: invalid span ids


def test_spans_with_invalid_ids_are_refused_not_merged(bridge, sandbox: SandboxServer) -> None:
    server: BridgeServer = bridge()
    invalid_ids = [(b"", b""), (bytes(16), bytes(8)), (b"\x01", b"\x02")]
    spans = [
        (trace_id, span_id, {**STT, **IDENTITY, sc.CUSTOMER_ID: f"cust-{n}"})
        for n, (trace_id, span_id) in enumerate(invalid_ids)
    ]
    answer = partial_success(
        post(server, TRACES_PATH, trace_request(*spans)), ExportTraceServiceResponse
    )
    assert answer.rejected_spans == 3
    assert "are not valid OpenTelemetry ids" in answer.error_message
    assert sc.USAGE_ID in answer.error_message  # the way out is named
    delivered(server)
    assert sandbox.ledger.count() == 0
    assert server.app.pipeline.stats.snapshot().get("duplicate_suppressed", 0) == 0

    # With an explicit id each, the same spans are told apart and billed.
    with_ids = [(t, s, {**a, sc.USAGE_ID: f"call-{n}"}) for n, (t, s, a) in enumerate(spans)]
    answer = partial_success(
        post(server, TRACES_PATH, trace_request(*with_ids)), ExportTraceServiceResponse
    )
    assert answer.rejected_spans == 0 and answer.error_message == ""
    delivered(server)
    assert customers(sandbox) == ["cust-0", "cust-1", "cust-2"]


# ------------------------------------------------------------ 8: correcting dead letters


def test_a_corrected_record_is_billed_after_an_invalid_dead_letter(
    bridge, sandbox: SandboxServer
) -> None:
    server: BridgeServer = bridge()
    mistake = {**STT, sc.CUSTOMER_ID: "cust-1", sc.PROVIDER: "deepgram"}  # no model
    answer = partial_success(
        post(server, TRACES_PATH, trace_request((VALID_TRACE, VALID_SPAN, mistake))),
        ExportTraceServiceResponse,
    )
    assert answer.rejected_spans == 1 and "paygent.model" in answer.error_message
    corrected = trace_request((VALID_TRACE, VALID_SPAN, {**mistake, sc.MODEL: "nova-2"}))
    answer = partial_success(post(server, TRACES_PATH, corrected), ExportTraceServiceResponse)
    assert answer.rejected_spans == 0
    delivered(server)
    assert customers(sandbox) == ["cust-1"]
    assert [d.status for d in server.app.pipeline.spool.dead_letters()] == ["invalid"]


def test_a_record_paygent_refused_can_be_corrected_under_a_new_key(
    bridge, sandbox: SandboxServer
) -> None:
    server: BridgeServer = bridge()
    sandbox.set_faults(reject_rate=1.0)  # Paygent answers 400: "unknown customer", say
    wrong = {**STT, **IDENTITY, sc.CUSTOMER_ID: "cust-typo"}
    post(server, TRACES_PATH, trace_request((VALID_TRACE, VALID_SPAN, wrong)))
    wait_for(server.app.pipeline.spool.dead_letters, message="the 400 dead letter")
    sandbox.set_faults(reject_rate=0.0)
    post(server, TRACES_PATH, trace_request((VALID_TRACE, VALID_SPAN, wrong)))  # the same
    right = trace_request((VALID_TRACE, VALID_SPAN, {**wrong, sc.CUSTOMER_ID: "cust-right"}))
    post(server, TRACES_PATH, right)
    delivered(server)
    assert customers(sandbox) == ["cust-right"]
    [refused_key] = {
        e["idempotency_key"] for e in sandbox.ledger.request_log() if e["status"] == 400
    }
    assert refused_key not in sandbox.ledger.keys()  # Paygent never saw one key twice
    assert server.app.pipeline.stats.snapshot()["duplicate_suppressed"] == 1  # the same one


def test_spool_status_suggests_only_commands_that_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bridge
) -> None:
    path = tmp_path / "spool.sqlite3"
    server: BridgeServer = bridge(spool_path=path)
    bad = {**STT, sc.CUSTOMER_ID: "c"}  # no provider, no model
    post(server, TRACES_PATH, trace_request((VALID_TRACE, VALID_SPAN, bad)))
    code, out, _ = run(capsys, "status", "--spool", str(path))
    assert code == 0 and "invalid: 1" in out
    assert "spool retry" not in out
    assert "cannot be retried" in out and "spool purge" in out


# ------------------------------------------------------------------ paygent.usage.id


def log_request(*records: tuple[int, dict[str, Any]]) -> bytes:
    """One protobuf log request, one log record per (timestamp, attributes)."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    set_attributes(resource_logs.resource.attributes, {sc.AGENT_ID: "agent-1"})
    scope = resource_logs.scope_logs.add()
    for timestamp, attributes in records:
        record = scope.log_records.add(time_unix_nano=timestamp)
        record.body.string_value = "job finished"
        set_attributes(record.attributes, attributes)
    return bytes(request.SerializeToString())


def test_one_usage_id_with_different_usage_is_refused_with_a_reason(
    bridge, sandbox: SandboxServer
) -> None:
    server: BridgeServer = bridge()
    job = {**TTS, sc.CUSTOMER_ID: "cust-1", sc.USAGE_ID: "job-1"}
    first = log_request((1_000, {**job, sc.TTS_CHARACTERS: 100}))
    assert (
        partial_success(
            post(server, LOGS_PATH, first), ExportLogsServiceResponse
        ).rejected_log_records
        == 0
    )
    # The job ran again: another time, the same usage. Billed once, nothing to report.
    retried = log_request((2_000, {**job, sc.TTS_CHARACTERS: 100}))
    answer = partial_success(post(server, LOGS_PATH, retried), ExportLogsServiceResponse)
    assert answer.rejected_log_records == 0 and answer.error_message == ""
    # The same id for other usage, beside a record with an id of its own.
    clash = log_request(
        (3_000, {**job, sc.TTS_CHARACTERS: 150}),
        (3_000, {**job, sc.USAGE_ID: "job-2", sc.TTS_CHARACTERS: 50}),
    )
    answer = partial_success(post(server, LOGS_PATH, clash), ExportLogsServiceResponse)
    assert answer.rejected_log_records == 1
    assert "paygent.usage.id 'job-1'" in answer.error_message
    assert "different usage" in answer.error_message
    delivered(server)
    assert sorted(r["characters"] for r in sandbox.ledger.rows()) == [50, 100]
    stats = server.app.pipeline.stats.snapshot()
    assert stats["conflict"] == 1 and stats["duplicate_suppressed"] == 1
    (dead,) = server.app.pipeline.spool.dead_letters()
    assert dead.status == "conflict" and '"characterCount":150' in dead.body


@pytest.mark.parametrize("spool", ["durable", ":memory:"])
def test_a_usage_id_keys_span_and_event_records_across_traces(
    sandbox: SandboxServer,
    tracing: Callable[..., Tracing],
    caplog: pytest.LogCaptureFixture,
    spool: str,
) -> None:
    in_memory = {"spool_path": spool} if spool == ":memory:" else {}
    pipeline = tracing(customer_id="cust-1", **in_memory)
    tracer = pipeline.tracer
    for attempt in range(2):  # a retried job: a new trace each time, the same usage
        with tracer.start_as_current_span(f"job attempt {attempt}") as span:
            span.set_attributes({**STT, **IDENTITY, sc.USAGE_ID: "job-7"})
            span.add_event(
                sc.USAGE_EVENT_NAME, {**TTS, sc.TTS_CHARACTERS: 9, sc.USAGE_ID: "job-7/tts"}
            )
    with tracer.start_as_current_span("another job, same id") as span:
        span.set_attributes({**STT, **IDENTITY, sc.USAGE_ID: "job-7", sc.STT_AUDIO_SECONDS: 45.0})
    pipeline.flush()
    assert sorted(r["kind"] for r in sandbox.ledger.rows()) == ["stt", "tts"]
    stats = pipeline.exporter.stats
    assert stats["duplicate_suppressed"] == 2 and stats["conflict"] == 1
    assert any("paygent.usage.id 'job-7'" in r.getMessage() for r in caplog.records)


def test_a_usage_id_on_a_metric_point_does_not_key_it() -> None:
    point = UsagePoint(
        {}, sc.TTS_CHARACTERS, {**IDENTITY, sc.CUSTOMER_ID: "c", sc.USAGE_ID: "x"}, 1, 2, 5
    )
    [record], _ = records_from_points([point], IdentityDefaults())
    later = UsagePoint(point.resource, point.name, point.attributes, 2, 3, 7)
    [next_record], _ = records_from_points([later], IdentityDefaults())
    assert record.ref != next_record.ref  # each interval is its own record: no conflict


# ------------------------------------------------------------------------ the upgrade

SCHEMA_0_1_0 = """
CREATE TABLE pending (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, dest TEXT NOT NULL,
    body BLOB NOT NULL, origin TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, lease_owner TEXT,
    lease_until REAL, last_error TEXT);
CREATE INDEX pending_due ON pending (dest, next_attempt);
CREATE TABLE dead (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, dest TEXT NOT NULL,
    body BLOB NOT NULL, origin TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    died REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL,
    reason TEXT NOT NULL);
CREATE TABLE delivered (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX delivered_at ON delivered (at);
CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
"""The spool schema of paygent-otel 0.1.0 (PRAGMA user_version 0)."""


def spool_0_1_0(path: Path, delivered_keys: list[str], pending: list[tuple[str, str]]) -> None:
    """A spool file as 0.1.0 left it: delivered keys, and (key, destination) pending."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_0_1_0)
        now = time.time()
        db.executemany("INSERT INTO delivered VALUES (?, ?)", [(k, now) for k in delivered_keys])
        body = (
            b'{"agentId":"agent-1","customerId":"cust-old","indicator":"","rawUsage":'
            b'{"provider":"deepgram","model":"nova-2","plan":"default","audioDuration":0.5}}'
        )
        db.executemany(
            "INSERT INTO pending (key, dest, body, created, next_attempt) VALUES (?, ?, ?, ?, ?)",
            [(key, dest, body, now, now) for key, dest in pending],
        )
    db.close()


def test_an_upgrade_does_not_bill_again_what_0_1_0_delivered_or_spooled(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], tmp_path: Path
) -> None:
    path = tmp_path / "spool.sqlite3"
    provider = TracerProvider()
    attributes = {**STT, **IDENTITY, sc.CUSTOMER_ID: "cust-old"}
    billed, waiting = (
        ended_span("a", attributes, provider=provider),
        ended_span("b", attributes, provider=provider),
    )
    # 0.1.0 keyed a span record by its trace id, span id, position and kind alone.
    old_key = {s.name: idempotency_key("span", *ids(s), 0, "stt") for s in (billed, waiting)}
    spool_0_1_0(path, [old_key["a"]], [(old_key["b"], destination_id(sandbox.url))])

    pipeline = tracing(spool_path=path)  # the upgraded exporter on the old file
    pipeline.exporter.export([billed, waiting])  # both handed over again (a replay)
    pipeline.flush()
    assert sandbox.ledger.keys() == [old_key["b"]]  # the spooled one, once, with its key
    assert pipeline.exporter.stats["duplicate_suppressed"] == 2


def test_an_upgrade_does_not_bill_again_a_log_line_0_1_0_delivered(
    bridge, sandbox: SandboxServer, tmp_path: Path
) -> None:
    path = tmp_path / "spool.sqlite3"
    body = log_request((1_000, {**TTS, sc.CUSTOMER_ID: "cust-1", sc.TTS_CHARACTERS: 10}))
    request = ExportLogsServiceRequest()
    request.ParseFromString(body)
    # 0.1.0's log key: the serialized resource and record (observed time zeroed).
    resource_logs = request.resource_logs[0]
    record = logs_pb2.LogRecord()
    record.CopyFrom(resource_logs.scope_logs[0].log_records[0])
    record.observed_time_unix_nano = 0

    def digest(message: Any) -> str:
        return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()

    spool_0_1_0(path, [idempotency_key("log", digest(resource_logs.resource), digest(record))], [])
    server: BridgeServer = bridge(spool_path=path)
    post(server, LOGS_PATH, body)
    delivered(server)
    assert sandbox.ledger.count() == 0
    assert server.app.pipeline.stats.snapshot()["duplicate_suppressed"] == 1


def test_an_invalid_dead_letter_never_holds_back_a_record_of_its_key(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", max_bytes=1 << 30)
    payload = {"agentId": "a", "customerId": "c", "indicator": "", "rawUsage": {}}
    spool.add_rejected([Rejection(RejectReason.INVALID, "bad", "span x", "key-1", {})])
    assert spool.add("dest", [UsageRecord("key-1", payload, "span x")]).accepted == 1
    spool.close()
