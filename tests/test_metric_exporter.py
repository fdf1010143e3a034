"""The metric route: usage counters -> PaygentMetricExporter -> the sandbox ledger.

Real MeterProviders and readers, a real SQLite spool and the sandbox over loopback HTTP.
Intervals are forced with ``provider.force_flush()`` (collect, export, wait for delivery),
so nothing depends on timing.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import re
import socket
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY
from opentelemetry import baggage, context
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import Counter, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import DropAggregation, LastValueAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from paygent_otel import Identity
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import IdentityDefaults, UsageRecord
from paygent_otel.delivery.spool import open_spool
from paygent_otel.exporters.metric import USAGE_TEMPORALITY, PaygentMetricExporter
from paygent_otel.exporters.metrics import UsagePoint, records_from_points
from paygent_otel.exporters.trace import PaygentSpanExporter
from paygent_otel.recording.instruments import UsageInstruments, create_usage_counters
from paygent_otel.sandbox import SandboxServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
NOVA = {"provider": "deepgram", "model": "nova-2"}
PAYER = Identity("a", "c", provider="deepgram", model="nova-2")
"""Agent ``a``, customer ``c``, Deepgram nova-2: the usual identity of a helper call."""


Route = tuple[PaygentMetricExporter, PeriodicExportingMetricReader, MeterProvider]


@pytest.fixture
def route(tmp_path: Path, sandbox: SandboxServer) -> Iterator[Callable[..., Route]]:
    """Build exporter + long-interval reader + provider; everything is shut down after."""
    providers: list[MeterProvider] = []

    def build(
        resource: dict[str, Any] | None = None,
        cardinality_limits: dict[type, int] | None = None,
        **exporter_args: Any,
    ) -> Route:
        exporter_args.setdefault("endpoint", sandbox.url)
        exporter_args.setdefault("api_key", API_KEY)
        exporter_args.setdefault("spool_path", tmp_path / f"spool-{len(providers)}.sqlite3")
        exporter = PaygentMetricExporter(meter_provider=NoOpMeterProvider(), **exporter_args)
        reader = PeriodicExportingMetricReader(
            exporter, export_interval_millis=3_600_000, cardinality_limits=cardinality_limits
        )
        provider = MeterProvider(metric_readers=[reader], resource=Resource.create(resource or {}))
        providers.append(provider)
        return exporter, reader, provider

    yield build
    for provider in providers:
        provider.shutdown(timeout_millis=5_000)


def instruments(
    route: Callable[..., Route], **exporter_args: Any
) -> tuple[UsageInstruments, MeterProvider, PaygentMetricExporter]:
    """``route(**exporter_args)`` with instruments on its provider's meter ``app``."""
    exporter, _, provider = route(**exporter_args)
    return UsageInstruments(provider.get_meter("app")), provider, exporter


def _payloads(sandbox: SandboxServer) -> list[dict[str, Any]]:
    return [json.loads(row["body"]) for row in sandbox.ledger.rows()]


def _delta_metrics(record: Callable[[UsageInstruments], None]) -> MetricsData:
    """What a delta reader collects after ``record`` ran against fresh instruments."""
    reader = InMemoryMetricReader(preferred_temporality=dict(USAGE_TEMPORALITY))
    provider = MeterProvider(metric_readers=[reader])
    record(UsageInstruments(provider.get_meter("test")))
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data


# ------------------------------------------------------------------ temporality


def test_counters_are_billed_per_interval_whatever_the_otlp_temporality_env(
    route: Callable[..., Route], sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The OTLP exporters read this variable; a Paygent reader must stay DELTA regardless.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "cumulative")
    usage, provider, exporter = instruments(route)
    assert usage.add_tts(characters=5, identity=PAYER)
    provider.force_flush()
    assert usage.add_tts(characters=7, identity=PAYER)
    provider.force_flush()
    provider.force_flush()  # an interval with no usage makes no call

    assert [p["rawUsage"]["characterCount"] for p in _payloads(sandbox)] == [5, 7]
    assert exporter.stats["delivered"] == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            {"preferred_temporality": {Counter: AggregationTemporality.CUMULATIVE}},
            "needs DELTA temporality for Counter",
        ),
        (
            {"preferred_temporality": {ObservableCounter: AggregationTemporality.CUMULATIVE}},
            "needs DELTA temporality for ObservableCounter",
        ),
        (
            {"preferred_aggregation": {Counter: LastValueAggregation()}},
            "needs Counter aggregated as a sum, not LastValueAggregation",
        ),
        (
            {"preferred_aggregation": {ObservableCounter: DropAggregation()}},
            "needs ObservableCounter aggregated as a sum, not DropAggregation",
        ),
    ],
)
def test_a_configuration_that_would_double_bill_is_refused_at_construction(
    arguments: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        PaygentMetricExporter(api_key=API_KEY, spool_path=tmp_path / "s.sqlite3", **arguments)
    assert not (tmp_path / "s.sqlite3").exists()  # refused before anything was opened


def test_cumulative_sums_from_a_reader_that_ignores_the_preference_are_not_billed(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    exporter, _, _ = route()
    reader = InMemoryMetricReader()  # cumulative for everything, whatever the exporter asks
    provider = MeterProvider(metric_readers=[reader])
    usage = UsageInstruments(provider.get_meter("app"))
    for _ in range(2):
        usage.add_tts(characters=5, identity=PAYER)
        data = reader.get_metrics_data()
        assert data is not None
        assert exporter.export(data) is MetricExportResult.SUCCESS
    provider.shutdown()
    exporter.force_flush()

    assert sandbox.ledger.count() == 0
    assert exporter.stats["wrong_temporality"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "'paygent.tts.characters' arrived as a cumulative sum" in errors[0]


def test_observable_counters_are_billed_as_deltas(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    _, _, provider = route()
    totals = iter([10, 25])

    def observe(_: CallbackOptions) -> list[Observation]:
        attributes = {sc.AGENT_ID: "a", sc.CUSTOMER_ID: "c", sc.PROVIDER: "x", sc.MODEL: "y"}
        return [Observation(next(totals), attributes)]

    provider.get_meter("app").create_observable_counter(
        sc.TTS_CHARACTERS, callbacks=[observe], unit="{character}"
    )
    provider.force_flush()
    provider.force_flush()
    assert [p["rawUsage"]["characterCount"] for p in _payloads(sandbox)] == [10, 15]


# ------------------------------------------------------------------ joining and identity


def test_sts_modalities_of_one_interval_are_one_call(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    _, _, provider = route()
    meter = provider.get_meter("app")
    usage = UsageInstruments(meter)
    who = {"agent_id": "a", "customer_id": "c1", "provider": "openai", "model": "gpt-realtime"}
    # Raw counter first: its stream's first interval starts earlier than the others'.
    usage.counters[sc.STS_CACHED_TEXT_TOKENS].add(
        4, {sc.AGENT_ID: "a", sc.CUSTOMER_ID: "c1", sc.PROVIDER: "openai", sc.MODEL: "gpt-realtime"}
    )
    assert usage.add_sts(input_text_tokens=10, input_audio_seconds=30.0, **who)
    assert usage.add_sts(input_text_tokens=5, output_audio_tokens=200, **who)
    assert usage.add_sts(
        usage_metadata={"output": {"text": {"tokens": 7}}, "connection": {"minutes": 1.5}}, **who
    )
    assert usage.add_sts(input_text_tokens=1, **{**who, "customer_id": "c2"})
    provider.force_flush()

    by_customer = {p["customerId"]: p for p in _payloads(sandbox)}
    assert sorted(by_customer) == ["c1", "c2"]
    assert by_customer["c1"]["rawUsage"]["usageMetadata"] == {
        "schemaVersion": 1,
        "input": {"text": {"tokens": 15}, "audio": {"minutes": 0.5}},
        "output": {"text": {"tokens": 7}, "audio": {"tokens": 200}},
        "cached": {"text": {"tokens": 4}},
        "connection": {"minutes": 1.5},
    }
    assert sandbox.ledger.count() == 2


def test_seconds_and_minutes_counters_of_one_quantity_add_up(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    usage, provider, _ = instruments(route)
    assert usage.add_stt(seconds=30.0, identity=PAYER)
    assert usage.add_stt(minutes=0.25, identity=PAYER)
    assert usage.add_stt(minutes=0.25, identity=PAYER)
    provider.force_flush()
    assert [p["rawUsage"]["audioDuration"] for p in _payloads(sandbox)] == [1.0]


def test_identity_comes_from_the_point_then_the_resource_then_the_exporter_defaults(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    usage, provider, _ = instruments(
        route,
        resource={sc.AGENT_ID: "resource-agent", sc.PLAN: "resource-plan"},
        agent_id="default-agent",
        customer_id="default-customer",
        indicator="default-indicator",
    )
    assert usage.add_tts(characters=3, **NOVA)
    assert usage.add_tts(
        characters=4,
        customer_id="point-customer",
        plan="point-plan",
        indicator="point-indicator",
        meta_tags={"region": "eu"},
        **NOVA,
    )
    provider.force_flush()

    rows = sorted(_payloads(sandbox), key=lambda p: p["rawUsage"]["characterCount"])
    assert rows == [
        {
            "agentId": "resource-agent",
            "customerId": "default-customer",
            "indicator": "default-indicator",
            "rawUsage": {**NOVA, "plan": "resource-plan", "characterCount": 3},
        },
        {
            "agentId": "resource-agent",
            "customerId": "point-customer",
            "indicator": "point-indicator",
            "rawUsage": {**NOVA, "plan": "point-plan", "characterCount": 4},
            "metaTags": {"region": "eu"},
        },
    ]


def test_baggage_fills_identity_a_call_does_not_give_when_asked_to(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    _, _, provider = route(resource={sc.AGENT_ID: "a", sc.CUSTOMER_ID: "resource-customer"})
    meter = provider.get_meter("app")
    from_baggage = UsageInstruments(meter, baggage=True)
    without = UsageInstruments(meter)
    token = context.attach(
        baggage.set_baggage(
            sc.CUSTOMER_ID, "baggage-customer", baggage.set_baggage(sc.PLAN, "baggage-plan")
        )
    )
    try:
        assert from_baggage.add_tts(characters=1, **NOVA)
        assert from_baggage.add_tts(characters=2, customer_id="explicit-customer", **NOVA)
        assert without.add_tts(characters=4, **NOVA)
    finally:
        context.detach(token)
    provider.force_flush()

    billed = {
        (p["customerId"], p["rawUsage"]["plan"]): p["rawUsage"]["characterCount"]
        for p in _payloads(sandbox)
    }
    assert billed == {
        ("baggage-customer", "baggage-plan"): 1,  # baggage beats the resource
        ("explicit-customer", "baggage-plan"): 2,  # an argument beats baggage
        ("resource-customer", "default"): 4,  # baggage=False: not read
    }


def test_one_identity_serves_every_call_and_a_calls_arguments_win(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    usage, provider, _ = instruments(route)
    caller = Identity("a", "c", "voice", "deepgram", "nova-2", meta_tags={"region": "eu"})
    assert usage.add_stt(seconds=30.0, identity=caller)
    assert usage.add_tts(
        characters=5, provider="elevenlabs", model="turbo", meta_tags={"n": 1}, identity=caller
    )
    assert usage.add_sts(input_text_tokens=7, provider="openai", model="rt", identity=caller)
    provider.force_flush()

    billed = sorted(
        (p["customerId"], p["rawUsage"]["provider"], p["rawUsage"]["model"], p["metaTags"])
        for p in _payloads(sandbox)
    )
    assert billed == [
        ("c", "deepgram", "nova-2", {"region": "eu"}),
        ("c", "elevenlabs", "turbo", {"n": "1", "region": "eu"}),
        ("c", "openai", "rt", {"region": "eu"}),
    ]


# ------------------------------------------------------------------ wrong instruments


def test_usage_names_on_other_instruments_are_reported_once_and_not_billed(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    exporter, _, provider = route()
    meter = provider.get_meter("app")
    histogram = meter.create_histogram(sc.TTS_CHARACTERS)
    up_down = meter.create_up_down_counter(sc.STT_AUDIO_SECONDS, unit="s")
    gauge = meter.create_gauge(sc.STS_INPUT_TEXT_TOKENS)
    wrong_unit = meter.create_counter(sc.STS_OUTPUT_AUDIO_SECONDS, unit="ms")
    usage = UsageInstruments(meter)
    attributes = {sc.AGENT_ID: "a", sc.CUSTOMER_ID: "c", sc.PROVIDER: "x", sc.MODEL: "y"}
    for _ in range(2):
        histogram.record(100, attributes)
        up_down.add(30, attributes)
        gauge.set(10, attributes)
        wrong_unit.add(1500, attributes)
        assert usage.add_stt(minutes=1.0, identity=PAYER)
        provider.force_flush()

    assert [p["rawUsage"]["audioDuration"] for p in _payloads(sandbox)] == [1.0, 1.0]
    assert exporter.stats["wrong_instrument"] == 6  # 3 streams x 2 intervals, one point each
    assert exporter.stats["wrong_unit"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4, errors
    assert any(
        "'paygent.tts.characters' is a Paygent usage instrument but arrived as a histogram" in e
        for e in errors
    )
    assert any(
        "'paygent.stt.audio.seconds' is a Paygent usage instrument but arrived as a "
        "non-monotonic sum" in e
        for e in errors
    )
    assert any(
        "'paygent.sts.input.text.tokens' is a Paygent usage instrument but arrived as a gauge" in e
        for e in errors
    )
    assert any("'paygent.sts.output.audio.seconds' has unit 'ms'" in e for e in errors)


def test_usage_beyond_the_cardinality_limit_is_rejected_not_billed_to_a_default(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    usage, provider, exporter = instruments(
        route, cardinality_limits={Counter: 2}, agent_id="a", customer_id="default-customer"
    )
    for customer in ("c0", "c1", "c2", "c3"):
        assert usage.add_tts(characters=10, customer_id=customer, **NOVA)
    provider.force_flush()

    assert sorted(p["customerId"] for p in _payloads(sandbox)) == ["c0", "c1"]
    assert exporter.stats["invalid"] == 1
    assert any(
        "cardinality limit" in r.getMessage() and "20 of paygent.tts.characters" in r.getMessage()
        for r in caplog.records
    )
    dead = exporter.pipeline.spool.dead_letters()
    assert len(dead) == 1 and "otel.metric.overflow" in dead[0].body


# ------------------------------------------------------------------ bad input


def test_negative_increments_are_dropped_by_the_sdk_and_refused_by_the_helpers(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    usage, provider, _ = instruments(route, agent_id="a")
    attributes = {sc.CUSTOMER_ID: "c", sc.PROVIDER: "x", sc.MODEL: "y"}
    usage.counters[sc.TTS_CHARACTERS].add(-50, attributes)
    assert not usage.add_tts(characters=-5, customer_id="c", provider="x", model="y")
    usage.counters[sc.TTS_CHARACTERS].add(10, attributes)
    provider.force_flush()

    assert [p["rawUsage"]["characterCount"] for p in _payloads(sandbox)] == [10]
    messages = [r.getMessage() for r in caplog.records]
    assert "Add amount must be non-negative on Counter paygent.tts.characters." in messages
    assert any(
        "add_tts: nothing recorded: argument characters=-5: paygent.tts.characters: must not "
        "be negative" in m
        for m in messages
    )


def test_non_finite_values_never_reach_paygent(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    usage, provider, exporter = instruments(route, agent_id="a")
    attributes = {sc.CUSTOMER_ID: "c", sc.PROVIDER: "x", sc.MODEL: "y"}
    usage.counters[sc.STT_AUDIO_SECONDS].add(math.nan, attributes)  # the SDK drops it
    assert not usage.add_stt(seconds=math.inf, customer_id="c", provider="x", model="y")
    provider.force_flush()
    assert sandbox.ledger.count() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "Add amount nan is not finite on Counter paygent.stt.audio.seconds" in m for m in messages
    )
    assert any(
        "argument seconds=inf: paygent.stt.audio.seconds: must be finite" in m for m in messages
    )

    # A non-finite sum from elsewhere (another reader, the OTLP bridge) is invalid.
    data = _delta_metrics(
        lambda u: u.add_stt(seconds=1.0, customer_id="c", provider="x", model="y")
    )
    metric = data.resource_metrics[0].scope_metrics[0].metrics[0]
    point = dataclasses.replace(metric.data.data_points[0], value=math.nan)
    metric.data.data_points[0] = point  # type: ignore[index]
    assert exporter.export(data) is MetricExportResult.SUCCESS
    exporter.force_flush()
    assert sandbox.ledger.count() == 0
    assert exporter.stats["invalid"] == 1
    assert any(
        "paygent.stt.audio.seconds must be finite, got nan" in m
        for m in (r.getMessage() for r in caplog.records)
    )
    assert len(exporter.pipeline.spool.dead_letters(status="invalid")) == 1


def test_missing_customer_is_accounted_like_on_the_span_route(
    route: Callable[..., Route],
    sandbox: SandboxServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage, provider, metric_exporter = instruments(route, agent_id="a")
    assert usage.add_stt(seconds=12.0, **NOVA)  # customer may come later: accepted here
    provider.force_flush()

    span_exporter = PaygentSpanExporter(
        endpoint=sandbox.url,
        api_key=API_KEY,
        agent_id="a",
        spool_path=tmp_path / "span-spool.sqlite3",
        meter_provider=NoOpMeterProvider(),
    )
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    with tracer_provider.get_tracer("app").start_as_current_span("stt") as span:
        span.set_attributes(
            {
                sc.USAGE_KIND: "stt",
                sc.STT_AUDIO_SECONDS: 12.0,
                sc.PROVIDER: NOVA["provider"],
                sc.MODEL: NOVA["model"],
            }
        )
    tracer_provider.shutdown()

    assert sandbox.ledger.count() == 0
    for stats in (metric_exporter.stats, span_exporter.stats):
        assert stats.get("invalid") == 1 and "accepted" not in stats
    rule = "rejected: paygent.customer.id is missing or blank"
    messages = [r.getMessage() for r in caplog.records if rule in r.getMessage()]
    assert len(messages) == 2
    assert messages[0].startswith("usage record from metrics stt stream")
    assert messages[1].startswith("usage record from span 'stt'")
    assert len(metric_exporter.pipeline.spool.dead_letters(status="invalid")) == 1


def test_helpers_refuse_bad_arguments_without_raising(
    route: Callable[..., Route], sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    usage, provider, _ = instruments(route, agent_id="a")
    calls = [
        (lambda: usage.add_stt(seconds="12", customer_id="c", **NOVA), "argument seconds='12'"),
        (lambda: usage.add_stt(customer_id="c", **NOVA), "a stt record needs a quantity"),
        (
            lambda: usage.add_stt(seconds=6.0, minutes=0.1, customer_id="c", **NOVA),
            "conflicting units",
        ),
        (
            lambda: usage.add_tts(characters=2.5, customer_id="c", **NOVA),
            "argument characters=2.5: paygent.tts.characters: must be a whole number",
        ),
        (
            lambda: usage.add_tts(characters=True, customer_id="c", **NOVA),
            "must be a number, got bool",
        ),
        (
            lambda: usage.add_tts(characters=3, customer_id=5, **NOVA),  # type: ignore[arg-type]
            "argument customer_id: paygent.customer.id: must be a string",
        ),
        (
            lambda: usage.add_tts(characters=3, customer_id="c", provider=" ", model="m"),
            "argument provider: paygent.provider: must not be blank",
        ),
        (
            lambda: usage.add_sts(cached_tokens=5, cached_text_tokens=3, customer_id="c", **NOVA),
            "never sent together",
        ),
        (
            lambda: usage.add_sts(usage_metadata={"bogus": 1}, customer_id="c", **NOVA),
            "unknown field 'bogus'",
        ),
        (
            lambda: usage.add_sts(
                usage_metadata={"input": {"text": {"tokens": 1}}},
                input_text_tokens=1,
                customer_id="c",
                **NOVA,
            ),
            "given both in usage_metadata and as an argument",
        ),
        (
            lambda: usage.add_tts(characters=3, identity=Identity(customer_id="c", model=7)),  # type: ignore[arg-type]
            "argument model: paygent.model: must be a string",
        ),
        (
            lambda: usage.add_stt(seconds=1.0, identity=("a", "c")),  # type: ignore[arg-type]
            "nothing recorded: identity: must be an Identity, got tuple",
        ),
        (lambda: usage.add_tts(characters=0, customer_id="c", **NOVA), None),
    ]
    for call, message in calls:
        caplog.clear()
        assert call() is False
        if message is not None:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and message in warnings[0], (message, warnings)
    usage.counters[sc.TTS_CHARACTERS].add(0, {sc.CUSTOMER_ID: "c"})
    provider.force_flush()
    assert sandbox.ledger.count() == 0


# ------------------------------------------------------------------ export contract


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_export_returns_success_only_once_the_records_are_committed(tmp_path: Path) -> None:
    data = _delta_metrics(lambda u: u.add_tts(characters=9, identity=PAYER))
    spool_path = tmp_path / "spool.sqlite3"
    exporter = PaygentMetricExporter(
        endpoint=_closed_port_url(),
        api_key=API_KEY,
        spool_path=spool_path,
        meter_provider=NoOpMeterProvider(),
    )
    full = PaygentMetricExporter(
        endpoint=_closed_port_url(),
        api_key=API_KEY,
        spool_path=tmp_path / "full.sqlite3",
        spool_max_bytes=1,
        meter_provider=NoOpMeterProvider(),
    )
    try:
        assert exporter.export(data) is MetricExportResult.SUCCESS
        other_connection = open_spool(str(spool_path), max_bytes=1 << 20)
        assert other_connection.pending() == 1  # on disk, though Paygent is unreachable
        other_connection.close()

        assert full.export(data) is MetricExportResult.FAILURE
        assert full.stats["refused"] == 1
    finally:
        exporter.shutdown(timeout_millis=100)
        full.shutdown(timeout_millis=100)


def test_the_same_interval_exported_twice_is_billed_once(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    exporter, _, _ = route()
    data = _delta_metrics(lambda u: u.add_tts(characters=9, identity=PAYER))
    assert exporter.export(data) is MetricExportResult.SUCCESS
    exporter.force_flush()
    assert exporter.export(data) is MetricExportResult.SUCCESS
    exporter.force_flush()
    assert sandbox.ledger.count() == 1
    assert exporter.stats["duplicate_suppressed"] == 1


def test_idempotency_key_is_derived_from_what_identifies_the_point() -> None:
    def point(**changes: Any) -> UsagePoint:
        base: dict[str, Any] = {
            "resource": {"service.name": "svc"},
            "name": sc.TTS_CHARACTERS,
            "attributes": {sc.AGENT_ID: "a", sc.CUSTOMER_ID: "c", sc.PROVIDER: "x", sc.MODEL: "y"},
            "start_ns": 100,
            "end_ns": 200,
            "value": 5,
        }
        return UsagePoint(**{**base, **changes})

    def record(*points: UsagePoint) -> UsageRecord:
        records, rejections = records_from_points(points, IdentityDefaults())
        assert not rejections and len(records) == 1
        return records[0]

    def key(*points: UsagePoint) -> str:
        return record(*points).idempotency_key

    first = key(point())
    assert key(point()) == first  # a retry of the same interval
    # The value is what is billed, not what identifies the point: the ref stays, and the
    # key (which covers the usage too) changes, so a spool refuses the pair as a conflict.
    assert record(point(value=6)).ref == record(point()).ref
    assert key(point(value=6)) != first
    different = [
        point(resource={"service.name": "other"}),
        point(attributes={sc.AGENT_ID: "a", sc.CUSTOMER_ID: "c2", sc.PROVIDER: "x", sc.MODEL: "y"}),
        point(start_ns=150),
        point(end_ns=300),
    ]
    keys = {key(p) for p in different}
    assert len(keys) == 4 and first not in keys
    joined = records_from_points(
        [point(name=sc.STS_INPUT_TEXT_TOKENS), point(name=sc.STS_OUTPUT_TEXT_TOKENS)],
        IdentityDefaults(),
    )[0]
    alone = records_from_points([point(name=sc.STS_INPUT_TEXT_TOKENS)], IdentityDefaults())[0]
    assert joined[0].idempotency_key != alone[0].idempotency_key  # the instrument set counts


def test_shutdown_in_the_middle_of_an_interval_exports_the_partial_interval(
    route: Callable[..., Route], sandbox: SandboxServer
) -> None:
    usage, provider, exporter = instruments(route)
    assert usage.add_tts(characters=11, identity=PAYER)
    provider.force_flush()
    assert usage.add_tts(characters=13, identity=PAYER)
    provider.shutdown()  # the interval (1 hour) is far from over

    assert [p["rawUsage"]["characterCount"] for p in _payloads(sandbox)] == [11, 13]
    assert exporter.stats["delivered"] == 2


# ------------------------------------------------------------------ instruments and config


def test_usage_counters_carry_the_convention_names_and_units() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counters = create_usage_counters(provider.get_meter("app"))
    assert sorted(counters) == sorted(sc.QUANTITIES)
    for counter in counters.values():
        counter.add(1, {sc.CUSTOMER_ID: "c"})
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    units = {m.name: m.unit for m in data.resource_metrics[0].scope_metrics[0].metrics}
    assert units == {q.name: q.unit.value for q in sc.QUANTITIES.values()}


def test_every_quantity_has_a_helper_argument_and_a_row_in_the_docs() -> None:
    arguments = {
        name
        for method in (UsageInstruments.add_stt, UsageInstruments.add_tts, UsageInstruments.add_sts)
        for name in inspect.signature(method).parameters
    }
    rows = re.findall(
        r"^\| `(paygent\.[a-z.]+)` \| (\w+) \| `([^`]+)` \| `(\w+)\((\w+)=\)` \|$",
        DOC.read_text(),
        re.MULTILINE,
    )
    assert {name: (kind, unit) for name, kind, unit, _, _ in rows} == {
        q.name: (q.kind.value.upper(), q.unit.value) for q in sc.QUANTITIES.values()
    }
    for name, kind, _, method, argument in rows:
        assert method == f"add_{kind.lower()}" and argument in arguments, name
        assert name.replace(".", "_").endswith(argument), name


def test_zero_code_entry_point_configures_itself_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (entry_point,) = entry_points(group="opentelemetry_metrics_exporter", name="paygent")
    assert entry_point.load() is PaygentMetricExporter
    monkeypatch.setenv("PAYGENT_API_KEY", "env-key-0123456789")
    monkeypatch.setenv("PAYGENT_CUSTOMER_ID", "env-customer")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_ENDPOINT", "http://generic.invalid")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_METRICS_ENDPOINT", "http://metrics.invalid/")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_METRICS_SPOOL_PATH", ":memory:")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TRACES_SPOOL_PATH", "/nonexistent/traces.sqlite3")
    exporter = PaygentMetricExporter(meter_provider=NoOpMeterProvider())
    try:
        assert exporter.config.endpoint == "http://metrics.invalid"
        assert exporter.config.api_key == "env-key-0123456789"
        assert exporter.config.customer_id == "env-customer"
        assert exporter.config.spool_path == ":memory:"
        assert "env-key-0123456789" not in repr(exporter)
    finally:
        exporter.shutdown()
