"""record_stt / record_tts / record_sts: porting from paygent-sdk is mechanical, and a bad
value never reaches the application (a warning, nothing recorded)."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Tracing, ledger_bodies, sent_by_sdk
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from paygent_sdk import (
    SpeechToSpeechUsageMetadata,
    StsCachedBreakdown,
    StsInputSide,
    StsModalityUsage,
    StsOutputSide,
)

from paygent_otel import Identity, record_sts, record_stt, record_tts
from paygent_otel.convention import semconv as sc
from paygent_otel.recording import helpers as recording_module
from paygent_otel.sandbox import SandboxServer

AGENT, CUSTOMER = "agent-support-voice", "cust_8812"
STT_DATA = {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 0.45}
TTS_DATA = {
    "serviceProvider": "elevenlabs",
    "model": "eleven_turbo_v2_5",
    "plan": "creator",
    "characterCount": 1200,
}
STS_METADATA = SpeechToSpeechUsageMetadata(
    input=StsInputSide(
        text=StsModalityUsage(tokens=120), audio=StsModalityUsage(tokens=900, minutes=0.75)
    ),
    output=StsOutputSide(audio=StsModalityUsage(tokens=1400, minutes=1.2)),
    cached=StsCachedBreakdown(text_tokens=64),
    connection_minutes=2.5,
)
OPENAI = {"service_provider": "openai", "model": "gpt-4o-realtime-preview"}
_PRICING = {"service_provider": "deepgram", "model": "nova-2"}
_IDENTITY_PRICING = {"provider": "deepgram", "model": "nova-2"}
_STT_ONLY: dict[str, Any] = {"stt_usage_data": STT_DATA}

PORTS: list[tuple[str, Callable[[Any], object], Callable[[], bool]]] = [
    (
        "stt",
        lambda c: c.track_stt(AGENT, CUSTOMER, "voice-minutes", STT_DATA),
        lambda: record_stt(AGENT, CUSTOMER, "voice-minutes", STT_DATA),
    ),
    (
        "stt-keywords-in-seconds",
        lambda c: c.track_stt(AGENT, CUSTOMER, "voice-minutes", STT_DATA),
        lambda: record_stt(
            AGENT,
            CUSTOMER,
            "voice-minutes",
            service_provider="deepgram",
            model="nova-2",
            audio_seconds=27.0,
        ),
    ),
    (
        "tts",
        lambda c: c.track_tts(AGENT, CUSTOMER, "voice-characters", TTS_DATA),
        lambda: record_tts(AGENT, CUSTOMER, "voice-characters", TTS_DATA),
    ),
    (
        "tts-keywords",
        lambda c: c.track_tts(AGENT, CUSTOMER, "voice-characters", TTS_DATA),
        lambda: record_tts(
            AGENT,
            CUSTOMER,
            "voice-characters",
            service_provider="elevenlabs",
            model="eleven_turbo_v2_5",
            plan="creator",
            characters=1200,
        ),
    ),
    (
        "sts-typed-metadata",
        lambda c: c.track_sts(AGENT, CUSTOMER, "rt", STS_METADATA, **OPENAI),
        lambda: record_sts(AGENT, CUSTOMER, "rt", STS_METADATA, **OPENAI),
    ),
    (
        "sts-api-dict",
        lambda c: c.track_sts(AGENT, CUSTOMER, "rt", STS_METADATA, **OPENAI),
        lambda: record_sts(AGENT, CUSTOMER, "rt", STS_METADATA.to_api_dict(), **OPENAI),
    ),
    (
        "stt-identity",
        lambda c: c.track_stt(AGENT, CUSTOMER, "voice-minutes", STT_DATA),
        lambda: record_stt(identity=Identity(AGENT, CUSTOMER, "voice-minutes"), **_STT_ONLY),
    ),
    (
        "sts-identity-and-metadata",
        lambda c: c.track_sts(AGENT, CUSTOMER, "rt", STS_METADATA, **OPENAI),
        lambda: record_sts(
            usage_metadata=STS_METADATA,
            identity=Identity(AGENT, CUSTOMER, "rt", "openai", "gpt-4o-realtime-preview"),
        ),
    ),
    (
        "sts-keywords",
        lambda c: c.track_sts(AGENT, CUSTOMER, "rt", STS_METADATA, **OPENAI),
        lambda: record_sts(
            AGENT,
            CUSTOMER,
            "rt",
            input_text_tokens=120,
            input_audio_tokens=900,
            input_audio_minutes=0.75,
            output_audio_tokens=1400,
            output_audio_minutes=1.2,
            cached_text_tokens=64,
            connection_minutes=2.5,
            **OPENAI,
        ),
    ),
]


@pytest.mark.parametrize(("sdk", "helper"), [p[1:] for p in PORTS], ids=[p[0] for p in PORTS])
def test_a_ported_call_sends_the_sdks_document(
    sandbox: SandboxServer,
    tracing: Callable[..., Tracing],
    sdk: Callable[[Any], object],
    helper: Callable[[], bool],
) -> None:
    (expected,) = sent_by_sdk(sandbox, sdk)
    pipeline = tracing(trace_tags=False)
    with pipeline.tracer.start_as_current_span("turn"):
        assert helper() is True
    pipeline.flush()
    assert ledger_bodies(sandbox, keyed=True) == [expected]
    # Same JSON types too (a 1200 sent as 1200.0 would compare equal above).
    assert repr(ledger_bodies(sandbox, keyed=True)) == repr([expected])


def test_several_records_on_one_span_and_meta_tags(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(trace_tags=False)
    with pipeline.tracer.start_as_current_span("call") as span:
        assert record_stt(AGENT, CUSTOMER, "m", STT_DATA, meta_tags={"region": "eu", "n": 5})
        assert record_tts(AGENT, CUSTOMER, "c", TTS_DATA)
        assert record_tts(AGENT, CUSTOMER, "c", {**TTS_DATA, "characterCount": 30})
    assert span.attributes[sc.USAGE_KIND] == "stt"
    assert [e.name for e in span.events] == [sc.USAGE_EVENT_NAME] * 2
    pipeline.flush()
    rows = sandbox.ledger.rows()
    assert sorted((r["kind"], r["audio_minutes"] or r["characters"]) for r in rows) == [
        ("stt", 0.45),
        ("tts", 30),
        ("tts", 1200),
    ]
    assert [r["meta_tags"] for r in rows if r["kind"] == "stt"] == [{"region": "eu", "n": "5"}]


def test_records_on_a_given_span_that_is_not_current(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing()
    target = pipeline.tracer.start_span("background")
    with pipeline.tracer.start_as_current_span("other") as current:
        assert record_tts(AGENT, CUSTOMER, "c", TTS_DATA, span=target)
    target.end()
    assert sc.USAGE_KIND not in (current.attributes or {})
    pipeline.flush()
    assert sandbox.ledger.count() == 1


BAD_CALLS: list[tuple[str, Callable[[], bool], str]] = [
    (
        "duration-as-string",
        lambda: record_stt(AGENT, CUSTOMER, "m", {**STT_DATA, "audioDuration": "0.45"}),
        f"{sc.STT_AUDIO_MINUTES}: must be a number",
    ),
    (
        "nan-minutes",
        lambda: record_stt(AGENT, CUSTOMER, audio_minutes=math.nan, **_PRICING),
        "must be finite",
    ),
    (
        "infinite-seconds",
        lambda: record_stt(AGENT, CUSTOMER, audio_seconds=math.inf, **_PRICING),
        "must be finite",
    ),
    (
        "negative-minutes",
        lambda: record_stt(AGENT, CUSTOMER, audio_minutes=-1.0, **_PRICING),
        "must not be negative",
    ),
    (
        "both-units",
        lambda: record_stt(AGENT, CUSTOMER, audio_minutes=1.0, audio_seconds=60.0, **_PRICING),
        "conflicting units",
    ),
    (
        "characters-as-bool",
        lambda: record_tts(AGENT, CUSTOMER, characters=True, **_PRICING),  # type: ignore[arg-type]
        f"{sc.TTS_CHARACTERS}: must be a number, got bool",
    ),
    (
        "fractional-characters",
        lambda: record_tts(AGENT, CUSTOMER, characters=12.5, **_PRICING),  # type: ignore[arg-type]
        "whole number",
    ),
    (
        "absurd-characters",
        lambda: record_tts(AGENT, CUSTOMER, characters=10**400, **_PRICING),
        "exceeds the limit",
    ),
    (
        "sts-without-quantities",
        lambda: record_sts(AGENT, CUSTOMER, "rt", **OPENAI),
        "needs a quantity",
    ),
    (
        "sts-cached-split-and-undivided",
        lambda: record_sts(
            AGENT, CUSTOMER, input_text_tokens=5, cached_text_tokens=1, cached_tokens=2, **OPENAI
        ),
        "never sent together",
    ),
    (
        "sts-metadata-not-a-mapping",
        lambda: record_sts(AGENT, CUSTOMER, "rt", "lots of tokens", **OPENAI),
        "usage_metadata must be a mapping",
    ),
    (
        "sts-metadata-unknown-field",
        lambda: record_sts(AGENT, CUSTOMER, "rt", {"input": {"smell": {"tokens": 1}}}, **OPENAI),
        "unknown field 'input.smell.tokens'",
    ),
    (
        "sts-given-twice",
        lambda: record_sts(
            AGENT, CUSTOMER, "rt", STS_METADATA.to_api_dict(), input_text_tokens=1, **OPENAI
        ),
        "given both in usage_metadata and as an argument",
    ),
    (
        "agent-not-a-string",
        lambda: record_stt(42, CUSTOMER, "m", STT_DATA),  # type: ignore[arg-type]
        f"{sc.AGENT_ID}: must be a string",
    ),
    (
        "blank-customer",
        lambda: record_stt(AGENT, "   ", "m", STT_DATA),
        f"{sc.CUSTOMER_ID}: must not be blank",
    ),
    (
        "usage-data-not-a-mapping",
        lambda: record_tts(AGENT, CUSTOMER, "c", [("characterCount", 5)]),  # type: ignore[arg-type]
        "tts_usage_data: must be a mapping",
    ),
    (
        "identity-not-an-identity",
        lambda: record_stt(stt_usage_data=STT_DATA, identity={"agent_id": AGENT}),  # type: ignore[arg-type]
        "identity: must be an Identity, got dict",
    ),
    (
        "identity-with-a-blank-customer",
        lambda: record_tts(characters=5, identity=Identity(AGENT, " ", **_IDENTITY_PRICING)),
        f"{sc.CUSTOMER_ID}: must not be blank",
    ),
    (
        "identity-meta-tags-not-a-mapping",
        lambda: record_stt(
            stt_usage_data=STT_DATA,
            identity=Identity(AGENT, CUSTOMER, meta_tags=["eu"]),  # type: ignore[arg-type]
        ),
        "meta_tags: must be a mapping",
    ),
    (
        "meta-tags-not-a-mapping",
        lambda: record_stt(AGENT, CUSTOMER, "m", STT_DATA, meta_tags=["eu"]),  # type: ignore[arg-type]
        "meta_tags: must be a mapping",
    ),
]


@pytest.mark.parametrize(
    ("call", "rule"), [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS]
)
def test_a_bad_value_logs_a_warning_and_records_nothing(
    caplog: pytest.LogCaptureFixture, call: Callable[[], bool], rule: str
) -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("turn") as span:
        assert call() is False  # and above all: no exception
    assert span.attributes == {} and span.events == ()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "paygent_otel.recording" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and rule in warnings[0] and "nothing recorded" in warnings[0]


def test_zero_usage_records_nothing_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with TracerProvider().get_tracer("t").start_as_current_span("turn") as span:
        assert record_stt(AGENT, CUSTOMER, "m", {**STT_DATA, "audioDuration": 0}) is False
        assert record_tts(AGENT, CUSTOMER, characters=0, **_PRICING) is False
        assert record_sts(AGENT, CUSTOMER, input_text_tokens=0, **OPENAI) is False
    assert span.attributes == {} and span.events == ()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("where", ["no-span", "unsampled-span"])
def test_usage_outside_a_recording_span_is_lost_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    monkeypatch.setattr(recording_module, "_warned", set())
    if where == "no-span":
        assert record_stt(AGENT, CUSTOMER, "m", STT_DATA) is False
    else:
        tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("t")
        with tracer.start_as_current_span("turn"):
            assert record_stt(AGENT, CUSTOMER, "m", STT_DATA) is False
            assert record_stt(AGENT, CUSTOMER, "m", STT_DATA) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not recording" in warnings[0]
    assert "Install paygent_otel.UsageSampler " in warnings[0]  # a public name that imports


def test_a_full_event_list_refuses_the_record_instead_of_evicting_one(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing(span_limits=SpanLimits(max_events=2))
    with pipeline.tracer.start_as_current_span("long-call"):
        results = [record_tts(AGENT, CUSTOMER, characters=n, **_PRICING) for n in (10, 20, 30, 40)]
    pipeline.flush()
    assert results == [True, True, True, False]
    assert sorted(r["characters"] for r in sandbox.ledger.rows()) == [10, 20, 30]
    assert "span event limit" in caplog.text


def test_a_full_attribute_map_gets_an_event_and_keeps_the_users_attributes(
    sandbox: SandboxServer, tracing: Callable[..., Tracing]
) -> None:
    pipeline = tracing(span_limits=SpanLimits(max_span_attributes=10))
    own = {f"app.{i}": i for i in range(8)}
    with pipeline.tracer.start_as_current_span("busy", attributes=own) as span:
        assert record_tts(AGENT, CUSTOMER, characters=7, **_PRICING)
    pipeline.flush()
    assert dict(span.attributes or {}) == own
    assert [e.name for e in span.events] == [sc.USAGE_EVENT_NAME]
    assert [r["characters"] for r in sandbox.ledger.rows()] == [7]


def test_a_value_the_span_limits_would_truncate_is_refused(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing(span_limits=SpanLimits(max_span_attribute_length=12))
    with pipeline.tracer.start_as_current_span("turn") as span:
        assert record_tts(AGENT, CUSTOMER, characters=7, **_PRICING) is False
    pipeline.flush()
    assert sc.USAGE_KIND not in (span.attributes or {})
    assert sandbox.ledger.count() == 0
    assert "would be truncated" in caplog.text and sc.AGENT_ID in caplog.text


def test_a_calls_own_arguments_win_over_its_identity_field_by_field() -> None:
    conversation = Identity(
        AGENT, CUSTOMER, "voice", "openai", "gpt-4o", "pro", {"region": "eu", "tier": "a"}
    )
    with TracerProvider().get_tracer("t").start_as_current_span("turn") as span:
        assert record_tts(
            customer_id="cust_other",
            characters=3,
            service_provider="elevenlabs",
            meta_tags={"tier": "b"},
            identity=conversation,
        )
        # The SDK dict's pricing fields win too, as they win over the keywords.
        assert record_stt(
            stt_usage_data={"model": "nova-2", "audioDuration": 0.5}, identity=conversation
        )
    tts = dict(span.attributes or {})
    (stt,) = [dict(e.attributes or {}) for e in span.events]
    assert {k: v for k, v in tts.items() if k != sc.TTS_CHARACTERS} == {
        sc.AGENT_ID: AGENT,
        sc.CUSTOMER_ID: "cust_other",
        sc.INDICATOR: "voice",
        sc.PROVIDER: "elevenlabs",
        sc.MODEL: "gpt-4o",
        sc.PLAN: "pro",
        sc.META_PREFIX + "region": "eu",
        sc.META_PREFIX + "tier": "b",
        sc.USAGE_KIND: "tts",
    }
    assert (stt[sc.CUSTOMER_ID], stt[sc.PROVIDER], stt[sc.MODEL]) == (CUSTOMER, "openai", "nova-2")
    assert conversation.meta_tags == {"region": "eu", "tier": "a"}  # never changed by a call


def test_identity_gives_the_attributes_it_names() -> None:
    identity = Identity(agent_id=AGENT, provider="deepgram", meta_tags={"n": 5, "x": [1]})
    assert identity.attributes() == {
        sc.AGENT_ID: AGENT,
        sc.PROVIDER: "deepgram",
        sc.META_PREFIX + "n": 5,
        sc.META_PREFIX + "x": "[1]",
    }
    assert Identity() == Identity(None, None, None, None, None, None, None)
    with pytest.raises(ValueError, match=f"{sc.MODEL}: must not be blank") as raised:
        Identity(model="").attributes()
    assert getattr(raised.value, "field", None) == "model"


@pytest.mark.parametrize("function", ["record_sts", "add_sts"])
def test_every_sts_quantity_argument_is_read(function: str) -> None:
    """The STS helpers read their quantity keywords by name: each must name a quantity."""
    from paygent_otel.recording.instruments import UsageInstruments

    helper = record_sts if function == "record_sts" else UsageInstruments.add_sts
    not_quantities = {"self", "agent_id", "customer_id", "indicator", "usage_metadata", "span"}
    not_quantities |= {"service_provider", "provider", "model", "plan", "meta_tags", "identity"}
    arguments = set(inspect.signature(helper).parameters) - not_quantities
    assert arguments <= set(recording_module._STS_ARGUMENTS), function
    if function == "add_sts":
        assert arguments == set(recording_module._STS_ARGUMENTS)
    for argument in arguments:
        assert recording_module._STS_ARGUMENTS[argument].replace(".", "_").endswith(argument)
