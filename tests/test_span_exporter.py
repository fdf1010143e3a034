"""PaygentSpanExporter end to end: real TracerProviders, a real spool, the sandbox over loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, Tracing, wait_for
from conftest import STT_ATTRIBUTES as STT
from conftest import USAGE_IDENTITY as IDENTITY
from opentelemetry.instrumentation.utils import is_http_instrumentation_enabled
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from paygent_otel import PaygentSpanExporter, RetryPolicy
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import UsageRecord, idempotency_key, map_usage
from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer

FAST_RETRY = RetryPolicy(initial_interval=0.05, max_interval=0.2)
"""Retries within a test's patience; the policy's shape is the delivery tests' business."""

TTS_EVENT = {
    sc.USAGE_KIND: "tts",
    sc.PROVIDER: "elevenlabs",
    sc.MODEL: "v2",
    sc.TTS_CHARACTERS: 120,
}

_bare = TracerProvider()


def ended_span(
    name: str = "voice-turn",
    attributes: dict[str, Any] | None = None,
    events: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
    provider: TracerProvider = _bare,
) -> ReadableSpan:
    """A finished SDK span, made without any processor, to hand to ``export()`` directly."""
    span = provider.get_tracer("tests").start_span(name, attributes=attributes)
    for event_name, event_attributes in events:
        span.add_event(event_name, event_attributes)
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


def ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def expected_key(
    span: ReadableSpan, position: int, record: dict[str, Any], *inherited: dict[str, Any]
) -> str:
    """The key of the record at ``position`` of ``span``: its ref (trace id, span id,
    position, kind) and its usage, as the one mapping digests them."""
    ref = idempotency_key("span", *ids(span), position, record[sc.USAGE_KIND])
    mapped = map_usage(record, inherited=inherited, ref=ref, origin="test", trace_ids=ids(span))
    assert isinstance(mapped, UsageRecord)
    return mapped.idempotency_key


def meta_tags(sandbox: SandboxServer) -> list[dict[str, str] | None]:
    return [row["meta_tags"] for row in sandbox.ledger.rows()]


# ----------------------------------------------------------------- idempotency keys


def test_each_record_has_a_key_from_trace_span_position_and_kind(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing()
    with pipeline.tracer.start_as_current_span("turn", attributes=STT) as span:
        span.add_event("user.spoke", {"words": 12})  # not a usage record: position 1
        span.add_event(sc.USAGE_EVENT_NAME, TTS_EVENT)  # position 2
        span.add_event(sc.USAGE_EVENT_NAME, {**TTS_EVENT, sc.TTS_CHARACTERS: 80})  # position 3
    pipeline.flush()

    expected = [
        expected_key(span, 0, STT),  # type: ignore[arg-type]
        expected_key(span, 2, TTS_EVENT, STT),  # type: ignore[arg-type]
        expected_key(span, 3, {**TTS_EVENT, sc.TTS_CHARACTERS: 80}, STT),  # type: ignore[arg-type]
    ]
    assert sorted(sandbox.ledger.keys()) == sorted(expected)
    assert len(set(expected)) == 3
    sent = {entry["idempotency_key"] for entry in sandbox.ledger.request_log()}
    assert sent == set(expected)


def test_a_retried_record_keeps_its_key(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    sandbox.set_faults(fail_rate=1.0, fail_status=503)
    pipeline = tracing(retry_policy=FAST_RETRY)
    span = ended_span(attributes=STT)
    assert pipeline.exporter.export([span]) is SpanExportResult.SUCCESS
    wait_for(lambda: len(sandbox.ledger.request_log()) >= 3, message="three failed attempts")
    sandbox.set_faults(fail_rate=0.0)
    pipeline.flush()

    log = sandbox.ledger.request_log()
    assert {entry["idempotency_key"] for entry in log} == {expected_key(span, 0, STT)}
    assert [entry["status"] for entry in log][-1] == 200
    assert set(entry["status"] for entry in log[:-1]) == {503}
    assert sandbox.ledger.count() == 1
    assert pipeline.exporter.stats["retried"] >= 2


@pytest.mark.parametrize("status", [408, 429, 502, 504])
def test_retryable_statuses_are_retried_and_delivered_once(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], status: int
) -> None:
    sandbox.set_faults(fail_rate=1.0, fail_status=status)
    pipeline = tracing(retry_policy=FAST_RETRY)
    pipeline.exporter.export([ended_span(attributes=STT)])
    wait_for(lambda: len(sandbox.ledger.request_log()) >= 2, message="a retry")
    sandbox.set_faults(fail_rate=0.0)
    pipeline.flush()
    assert sandbox.ledger.count() == 1


def test_a_timed_out_request_is_retried_and_billed_once(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    sandbox.set_faults(latency_ms=600)
    pipeline = tracing(timeout=0.2, retry_policy=FAST_RETRY)
    pipeline.exporter.export([ended_span(attributes=STT)])
    wait_for(lambda: pipeline.exporter.stats.get("retried", 0) >= 1, message="a timeout")
    sandbox.set_faults(latency_ms=0)
    assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 1
    assert sandbox.ledger.keys() == [sandbox.ledger.request_log()[-1]["idempotency_key"]]
    assert pipeline.exporter.stats["delivered"] == 1


def test_a_definitive_rejection_is_not_retried_and_kept_as_dead_letter(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    sandbox.set_faults(reject_rate=1.0)  # 400
    pipeline = tracing(retry_policy=FAST_RETRY)
    pipeline.exporter.export([ended_span(attributes=STT)])
    pipeline.flush()
    assert len(sandbox.ledger.request_log()) == 1
    assert pipeline.exporter.stats["rejected"] == 1
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert dead.status == "400"


def test_the_key_survives_a_restart_and_a_delivered_record_is_not_sent_again(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], tmp_path: Path
) -> None:
    spool_path = tmp_path / "durable.sqlite3"
    span = ended_span(attributes=STT)
    sandbox.stop()  # Paygent is down while the first process runs
    first = tracing(spool_path=spool_path, retry_policy=FAST_RETRY)
    assert first.exporter.export([span]) is SpanExportResult.SUCCESS
    wait_for(lambda: first.exporter.stats.get("retried", 0) >= 1, message="a failed attempt")
    first.exporter.shutdown(timeout_millis=200)
    assert SqliteSpool(spool_path, max_bytes=1 << 20).pending() == 1

    sandbox.start()
    second = tracing(spool_path=spool_path, retry_policy=FAST_RETRY)  # the next process
    wait_for(lambda: sandbox.ledger.count() == 1, message="the spooled record delivered")
    assert sandbox.ledger.keys() == [expected_key(span, 0, STT)]

    # The same span exported again (a replay) is recognised and not billed twice.
    assert second.exporter.export([span]) is SpanExportResult.SUCCESS
    assert second.exporter.force_flush(5000)
    assert second.exporter.stats.get("duplicate_suppressed") == 1
    assert len(sandbox.ledger.request_log()) == 1


# ----------------------------------------------------------------- records, identity, tags


def test_span_and_event_records_each_become_one_call(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(trace_tags=False)
    with pipeline.tracer.start_as_current_span("call", attributes=STT) as span:
        span.add_event(sc.USAGE_EVENT_NAME, TTS_EVENT)
        span.add_event(
            sc.USAGE_EVENT_NAME,
            {sc.USAGE_KIND: "sts", sc.MODEL: "gpt-realtime", sc.STS_INPUT_TEXT_TOKENS: 50},
        )
    with pipeline.tracer.start_as_current_span("events-only") as span:
        span.set_attributes(IDENTITY)
        span.add_event(sc.USAGE_EVENT_NAME, {sc.USAGE_KIND: "stt", sc.STT_AUDIO_SECONDS: 30})
    pipeline.flush()

    rows = sorted(sandbox.ledger.rows(), key=lambda r: (r["kind"], r["provider"]))
    got = [(r["kind"], r["provider"], r["model"], r["customer_id"]) for r in rows]
    assert got == [
        ("sts", "deepgram", "gpt-realtime", "cust_8812"),  # provider inherited from the span
        ("stt", "deepgram", "nova-2", "cust_8812"),
        ("stt", "deepgram", "nova-2", "cust_8812"),
        ("tts", "elevenlabs", "v2", "cust_8812"),
    ]
    # Quantities are never inherited: each row bills only what its own record carries.
    assert sorted(r["audio_minutes"] for r in rows if r["kind"] == "stt") == [0.45, 0.5]
    assert [r["characters"] for r in rows if r["kind"] == "tts"] == [120]
    assert [r["sts_tokens"] for r in rows if r["kind"] == "sts"] == [50]


def test_identity_precedence_record_span_resource_defaults(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYGENT_AGENT_ID", "env-agent")
    monkeypatch.setenv("PAYGENT_CUSTOMER_ID", "env-customer")
    monkeypatch.setenv("PAYGENT_INDICATOR", "env-indicator")
    pricing = {sc.PROVIDER: "deepgram", sc.MODEL: "nova-2"}
    resource = {sc.AGENT_ID: "resource-agent", sc.INDICATOR: "resource-indicator", **pricing}
    with_resource = tracing(resource=resource, customer_id="default-customer", trace_tags=False)
    usage = {sc.USAGE_KIND: "stt", sc.STT_AUDIO_MINUTES: 1.0}
    with with_resource.tracer.start_as_current_span(
        "s", attributes={**usage, sc.CUSTOMER_ID: "span-customer"}
    ) as span:
        span.add_event(
            sc.USAGE_EVENT_NAME, {**usage, sc.AGENT_ID: "event-agent", sc.STT_AUDIO_MINUTES: 2.0}
        )
    with with_resource.tracer.start_as_current_span(
        "t", attributes={**usage, sc.STT_AUDIO_MINUTES: 4.0}
    ):
        pass
    with_resource.flush()
    # Arguments beat the environment; the environment is the last resort.
    bare = tracing(agent_id="argument-agent", trace_tags=False)
    with bare.tracer.start_as_current_span(
        "u", attributes={**usage, **pricing, sc.STT_AUDIO_MINUTES: 3.0}
    ):
        pass
    bare.flush()

    rows = {
        r["audio_minutes"]: (r["agent_id"], r["customer_id"], r["indicator"])
        for r in sandbox.ledger.rows()
    }
    assert rows == {
        # span record: agent and indicator from the resource, customer from the span
        1.0: ("resource-agent", "span-customer", "resource-indicator"),
        # event record: agent from the event, customer from its span, indicator resource
        2.0: ("event-agent", "span-customer", "resource-indicator"),
        # nothing on span or resource: the exporter's argument, else the environment
        3.0: ("argument-agent", "env-customer", "env-indicator"),
        # nothing on the span: resource, then the exporter's customer_id argument
        4.0: ("resource-agent", "default-customer", "resource-indicator"),
    }


def test_default_trace_tags_link_the_row_to_its_trace(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing()
    span = ended_span(attributes={**STT, f"{sc.META_PREFIX}region": "eu"})
    pipeline.exporter.export([span])
    pipeline.exporter.force_flush(5000)
    trace_id, span_id = ids(span)
    assert meta_tags(sandbox) == [
        {"region": "eu", "otel_trace_id": trace_id, "otel_span_id": span_id}
    ]


@pytest.mark.parametrize(
    ("user_tags", "expected_trace_tags"),
    [(18, ["otel_trace_id", "otel_span_id"]), (19, ["otel_trace_id"]), (20, [])],
)
def test_trace_tags_never_push_user_tags_over_twenty(
    sandbox: SandboxServer,
    tracing: Callable[..., Tracing],
    user_tags: int,
    expected_trace_tags: list[str],
) -> None:
    pipeline = tracing()
    tags = {f"{sc.META_PREFIX}t{i:02d}": str(i) for i in range(user_tags)}
    pipeline.exporter.export([ended_span(attributes={**STT, **tags})])
    pipeline.exporter.force_flush(5000)
    (sent,) = meta_tags(sandbox)
    assert sent is not None
    assert {k: v for k, v in sent.items() if not k.startswith("otel_")} == {
        f"t{i:02d}": str(i) for i in range(user_tags)
    }
    assert [k for k in sent if k.startswith("otel_")] == expected_trace_tags


def test_trace_tags_still_sent_when_invalid_user_tags_are_dropped(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing()
    tags = {f"{sc.META_PREFIX}t{i:02d}": "x" for i in range(21)}
    span = ended_span(attributes={**STT, **tags})
    pipeline.exporter.export([span])
    pipeline.exporter.force_flush(5000)
    trace_id, span_id = ids(span)
    assert meta_tags(sandbox) == [{"otel_trace_id": trace_id, "otel_span_id": span_id}]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_trace_tags_can_be_turned_off(
    sandbox: SandboxServer,
    tracing: Callable[..., Tracing],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    if how == "argument":
        pipeline = tracing(trace_tags=False)
    else:
        monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TRACE_TAGS", "false")
        pipeline = tracing()
    pipeline.exporter.export([ended_span(attributes=STT)])
    pipeline.exporter.force_flush(5000)
    assert meta_tags(sandbox) == [None]


# ----------------------------------------------------------------- delivery behaviour


def test_requests_run_concurrently_up_to_max_in_flight(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    latency = 0.25
    sandbox.set_faults(latency_ms=latency * 1000)
    pipeline = tracing(max_in_flight=4)
    spans = [ended_span(attributes={**STT, sc.STT_AUDIO_MINUTES: float(i + 1)}) for i in range(12)]
    pipeline.exporter.export(spans)
    pipeline.exporter.force_flush(10_000)
    assert sandbox.ledger.count() == 12

    # The sandbox answers a request no earlier than `latency` after it arrived, so every
    # request arriving inside that window was sent while the earlier one was in flight.
    arrivals = sorted(entry["received_at"] for entry in sandbox.ledger.request_log())
    in_flight = [sum(1 for a in arrivals if a <= t < a + latency) for t in arrivals]
    assert max(in_flight) > 1, arrivals
    assert max(in_flight) <= 4, arrivals


def client_sockets_to(port: int) -> int:
    """Sockets on this host, in any state (TIME_WAIT included), whose peer is ``port``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote = line.split()[2]
        count += int(remote.rsplit(":", 1)[1], 16) == port
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_connections_are_reused(sandbox: SandboxServer, tracing: Callable[..., Tracing]) -> None:
    pipeline = tracing(max_in_flight=2)
    for batch in range(5):
        spans = [
            ended_span(attributes={**STT, sc.STT_AUDIO_MINUTES: batch + 1 + i / 10})
            for i in range(6)
        ]
        pipeline.exporter.export(spans)
        assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 30
    # A connection per request would leave ~30 client sockets (closed ones in TIME_WAIT).
    assert 1 <= client_sockets_to(sandbox.port) <= 2


def test_export_returns_before_the_request_is_answered(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    sandbox.set_faults(latency_ms=500)
    pipeline = tracing()
    assert pipeline.exporter.export([ended_span(attributes=STT)]) is SpanExportResult.SUCCESS
    assert sandbox.ledger.count() == 0  # committed to the spool, not yet delivered
    assert pipeline.exporter.pipeline.spool.pending() == 1
    assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 1


def test_force_flush_and_shutdown_deliver_pending_and_are_idempotent(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    sandbox.set_faults(latency_ms=50)
    pipeline = tracing(max_in_flight=2)
    for i in range(6):
        with pipeline.tracer.start_as_current_span(
            "turn", attributes={**STT, sc.STT_AUDIO_MINUTES: i + 1.0}
        ):
            pass
    assert pipeline.provider.force_flush()
    assert pipeline.exporter.force_flush(10_000)
    assert pipeline.exporter.force_flush(10_000)  # nothing left: returns at once, True
    assert sandbox.ledger.count() == 6

    with pipeline.tracer.start_as_current_span(
        "last", attributes={**STT, sc.STT_AUDIO_MINUTES: 9.0}
    ):
        pass
    pipeline.provider.shutdown()  # processor flush, then exporter.shutdown() delivers
    assert sandbox.ledger.count() == 7
    pipeline.exporter.shutdown()
    pipeline.exporter.shutdown(timeout_millis=1)
    assert pipeline.exporter.force_flush(1)
    assert pipeline.exporter.stats["delivered"] == 7


def test_a_record_exported_after_shutdown_is_refused_and_counted(
    tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing()
    pipeline.exporter.shutdown()
    assert pipeline.exporter.export([ended_span(attributes=STT)]) is SpanExportResult.FAILURE
    assert pipeline.exporter.stats["refused_after_shutdown"] == 1
    assert "after shutdown refused" in caplog.text


def test_spans_without_usage_cost_nothing(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing()
    for i in range(200):
        with pipeline.tracer.start_as_current_span(
            "http.request", attributes={"http.status_code": 200, "i": i}
        ) as span:
            span.add_event("exception", {"exception.message": "boom"})
    pipeline.flush()
    assert pipeline.exporter.stats == {}
    assert pipeline.exporter.pipeline.spool.pending() == 0
    assert sandbox.ledger.request_log() == []


def test_one_span_that_cannot_be_mapped_does_not_lose_the_batch(
    sandbox: SandboxServer,
    tracing: Callable[..., Tracing],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import paygent_otel.exporters.trace as module

    real = module.records_from_span

    def failing_for_one_span(**kwargs: Any) -> Any:
        if kwargs["name"] == "broken":
            raise RuntimeError("mapping bug")
        return real(**kwargs)

    monkeypatch.setattr(module, "records_from_span", failing_for_one_span)
    pipeline = tracing()
    result = pipeline.exporter.export([ended_span("broken", STT), ended_span("fine", STT)])
    assert result is SpanExportResult.FAILURE
    assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 1
    assert pipeline.exporter.stats["mapping_failed"] == 1
    assert "'broken'" in caplog.text and "mapping bug" in caplog.text


# ----------------------------------------------------------------- API key


def test_missing_api_key_is_reported_once_and_in_memory_records_are_counted(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing(api_key=None, spool_path=":memory:")
    for _ in range(3):
        with pipeline.tracer.start_as_current_span("turn", attributes=STT):
            pass
        pipeline.provider.force_flush()
    assert pipeline.exporter.force_flush(100) is True
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no Paygent API key" in errors[0] and "PAYGENT_API_KEY" in errors[0]
    assert pipeline.exporter.stats["dropped_no_api_key"] == 3
    assert sandbox.ledger.request_log() == []


def test_missing_api_key_keeps_durable_records_without_sending(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing(api_key=None)
    pipeline.exporter.export([ended_span(attributes=STT), ended_span(attributes=STT)])
    assert pipeline.exporter.pipeline.spool.pending() == 2
    assert sandbox.ledger.request_log() == []
    assert sum("no Paygent API key" in r.getMessage() for r in caplog.records) == 1


def test_records_spooled_without_a_key_are_sent_once_a_key_is_configured(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], tmp_path: Path
) -> None:
    spool_path = tmp_path / "keyless.sqlite3"
    keyless = tracing(api_key=None, spool_path=spool_path)
    keyless.exporter.export([ended_span(attributes=STT)])
    keyless.exporter.shutdown(timeout_millis=100)
    keyed = tracing(spool_path=spool_path)
    assert keyed.exporter.force_flush(2000)
    assert sandbox.ledger.count() == 1


def test_api_key_never_appears_in_logs_reprs_or_errors(
    tmp_path: Path, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SandboxServer(tmp_path / "strict.sqlite3", api_key="the-right-key") as strict:
        pipeline = tracing(
            endpoint=strict.url, retry_policy=FAST_RETRY, spool_path=tmp_path / "s.sqlite3"
        )
        pipeline.exporter.export([ended_span(attributes=STT)])
        wait_for(strict.ledger.request_log, message="the 401")
        stats = pipeline.exporter.pipeline.spool.stats()
        pipeline.exporter.shutdown(timeout_millis=100)
    assert [e["status"] for e in strict.ledger.request_log()] == [401]
    assert "not accepted" in caplog.text  # the 401 was reported...
    for text in (
        caplog.text,
        repr(pipeline.exporter),
        str(pipeline.exporter.config),
        repr(stats),
        str(pipeline.exporter.stats),
    ):
        assert API_KEY not in text
    assert API_KEY.encode() not in (tmp_path / "s.sqlite3").read_bytes()


def test_a_key_read_with_a_trailing_newline_still_works(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(api_key=f" {API_KEY}\n")
    pipeline.exporter.export([ended_span(attributes=STT)])
    assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 1


# ----------------------------------------------------------------- configuration


def test_configuration_from_the_environment(
    sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_ENDPOINT", "http://127.0.0.1:9")  # generic
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TRACES_ENDPOINT", sandbox.url + "/")  # wins
    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TIMEOUT", "2.5")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_SPOOL_PATH", str(tmp_path / "env.sqlite3"))
    exporter = PaygentSpanExporter()
    try:
        config = exporter.config
        assert (config.endpoint, config.timeout, config.max_in_flight) == (sandbox.url, 2.5, 3)
        assert config.spool_path == str(tmp_path / "env.sqlite3")
        exporter.export([ended_span(attributes=STT)])
        assert exporter.force_flush(5000)
        assert sandbox.ledger.count() == 1
    finally:
        exporter.shutdown()
    # Arguments beat every variable.
    argument = PaygentSpanExporter(
        endpoint="http://127.0.0.1:1", timeout=4.0, spool_path=":memory:"
    )
    try:
        assert (argument.config.endpoint, argument.config.timeout) == ("http://127.0.0.1:1", 4.0)
    finally:
        argument.shutdown()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "0"),
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT", "0"),
        ("OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT", "inf"),
        ("OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES", "nan"),
    ],
)
def test_bad_configuration_values_fall_back_to_defaults_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    exporter = PaygentSpanExporter(api_key=API_KEY, spool_path=":memory:")
    try:
        config = exporter.config
        assert (
            config.timeout == 10.0
            and config.max_in_flight == 128
            and config.spool_max_bytes == 1 << 30
        )
        assert any(
            r.levelno == logging.WARNING and name in r.getMessage() and value in r.getMessage()
            for r in caplog.records
        )
    finally:
        exporter.shutdown()


# ----------------------------------------------------------------- no self-tracing


class InstrumentedTransport(httpx.AsyncBaseTransport):
    """What an HTTP client instrumentation does: a CLIENT span per request, unless the
    caller's context suppresses HTTP instrumentation. Sends over a real transport."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("http-client-instrumentation")
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not is_http_instrumentation_enabled():
            return await self._inner.handle_async_request(request)
        with self._tracer.start_as_current_span(f"{request.method}", kind=SpanKind.CLIENT):
            return await self._inner.handle_async_request(request)


def test_delivery_requests_are_not_traced(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    transport = InstrumentedTransport(provider)
    pipeline = tracing(transport=transport)
    pipeline.exporter.export([ended_span(attributes=STT)])
    assert pipeline.exporter.force_flush(5000)
    assert sandbox.ledger.count() == 1
    assert spans.get_finished_spans() == ()

    # The probe does trace an ordinary caller: without the worker's suppression it would.
    async def ordinary_call() -> None:
        async with httpx.AsyncClient(transport=InstrumentedTransport(provider)) as client:
            await client.get(sandbox.url + "/healthz")

    asyncio.run(ordinary_call())
    assert [s.kind for s in spans.get_finished_spans()] == [SpanKind.CLIENT]
