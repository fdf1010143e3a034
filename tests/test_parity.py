"""Wire parity: the exporter sends the very document paygent-sdk 4.9.7 sends for the same usage.

Each case drives the real SDK (``track_stt``/``track_tts``/``track_sts``, or ``send_usage_v2``
for metaTags, which the ``track_*`` calls cannot carry) and the exporter (a span with the
convention's attributes, through a real ``BatchSpanProcessor``) against the same sandbox,
then compares the two request bodies the sandbox stored, after parsing, with JSON types
(``1`` and ``1.0`` differ). Trace tags are off here: they are the exporter's addition.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paygent_sdk
import pytest
from conftest import Tracing, ledger_bodies, sent_by_sdk
from paygent_sdk import (
    RawUsageData,
    SpeechToSpeechUsageMetadata,
    StsCachedBreakdown,
    StsInputSide,
    StsModalityUsage,
    StsOutputSide,
)

from paygent_otel.convention import semconv as sc
from paygent_otel.sandbox import SandboxServer

AGENT = "agent-support-voice"
CUSTOMER = "cust_8812"

SdkCall = Callable[[paygent_sdk.Client], object]


@dataclass
class Case:
    """One usage, written for the SDK and as span attributes."""

    id: str
    sdk: SdkCall
    attributes: dict[str, Any]
    identity: dict[str, Any] = field(
        default_factory=lambda: {sc.AGENT_ID: AGENT, sc.CUSTOMER_ID: CUSTOMER}
    )


def stt(
    indicator: str, data: dict[str, Any], agent: str = AGENT, customer: str = CUSTOMER
) -> SdkCall:
    return lambda client: client.track_stt(agent, customer, indicator, data)


def tts(
    indicator: str, data: dict[str, Any], agent: str = AGENT, customer: str = CUSTOMER
) -> SdkCall:
    return lambda client: client.track_tts(agent, customer, indicator, data)


def sts(indicator: str, metadata: SpeechToSpeechUsageMetadata, **kwargs: Any) -> SdkCall:
    return lambda client: client.track_sts(AGENT, CUSTOMER, indicator, metadata, **kwargs)


def v2_stt(meta_tags: dict[str, Any]) -> SdkCall:
    """send_usage_v2 with RawUsageData(meta_tags=...), the SDK's only way to send metaTags."""
    raw = RawUsageData(
        provider="deepgram", model="nova-2", audio_duration=0.45, meta_tags=meta_tags
    )
    return lambda client: client.send_usage_v2(AGENT, CUSTOMER, "voice-minutes", raw)


def nova(minutes: float) -> dict[str, Any]:
    """The SDK's ``stt_usage_data`` for ``minutes`` of Deepgram nova-2."""
    return {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": minutes}


def stt_attrs(**extra: Any) -> dict[str, Any]:
    return {
        sc.USAGE_KIND: "stt",
        sc.INDICATOR: "voice-minutes",
        sc.PROVIDER: "deepgram",
        sc.MODEL: "nova-2",
        sc.STT_AUDIO_MINUTES: 0.45,
        **extra,
    }


def meta(tags: dict[str, Any]) -> dict[str, Any]:
    return {sc.META_PREFIX + key: value for key, value in tags.items()}


EVERY_MODALITY = (
    sc.STS_INPUT_TEXT_TOKENS,
    sc.STS_INPUT_AUDIO_TOKENS,
    sc.STS_INPUT_AUDIO_MINUTES,
    sc.STS_OUTPUT_TEXT_TOKENS,
    sc.STS_OUTPUT_AUDIO_TOKENS,
    sc.STS_OUTPUT_AUDIO_MINUTES,
    sc.STS_CACHED_TEXT_TOKENS,
    sc.STS_CACHED_AUDIO_TOKENS,
    sc.STS_CONNECTION_MINUTES,
)


def every_modality(*values: Any) -> tuple[SpeechToSpeechUsageMetadata, dict[str, Any]]:
    """The SDK's metadata with every modality the seed uses, and the same usage as
    attributes, from ``values`` in :data:`EVERY_MODALITY`'s order (types kept: 0 is not 0.0)."""
    (
        text_in,
        audio_in,
        audio_in_min,
        text_out,
        audio_out,
        audio_out_min,
        cached_text,
        cached_audio,
        connection,
    ) = values
    metadata = SpeechToSpeechUsageMetadata(
        input=StsInputSide(
            text=StsModalityUsage(tokens=text_in),
            audio=StsModalityUsage(tokens=audio_in, minutes=audio_in_min),
        ),
        output=StsOutputSide(
            text=StsModalityUsage(tokens=text_out),
            audio=StsModalityUsage(tokens=audio_out, minutes=audio_out_min),
        ),
        cached=StsCachedBreakdown(text_tokens=cached_text, audio_tokens=cached_audio),
        connection_minutes=connection,
    )
    return metadata, dict(zip(EVERY_MODALITY, values, strict=True))


SEED_STS, _SEED_QUANTITIES = every_modality(120, 900, 0.75, 80, 1400, 1.2, 64, 256, 2.5)
SEED_STS_ATTRIBUTES = {
    sc.USAGE_KIND: "sts",
    sc.INDICATOR: "realtime-minutes",
    sc.PROVIDER: "openai",
    sc.MODEL: "gpt-4o-realtime-preview",
    **_SEED_QUANTITIES,
}
ZERO_STS, _ZERO_QUANTITIES = every_modality(0, 500, 0.0, 0, 0, 0.4, 0, 0, 0.0)
OPENAI = {"service_provider": "openai", "model": "gpt-4o-realtime-preview"}
STS_BASE = {
    sc.USAGE_KIND: "sts",
    sc.INDICATOR: "rt",
    sc.PROVIDER: "openai",
    sc.MODEL: "gpt-4o-realtime-preview",
}

TWENTY_TAGS = {f"tag_{i:02d}": f"value-{i}" for i in range(20)}

SAME_BODY = [
    # The seed's three calls.
    Case(
        "seed-stt",
        stt("voice-minutes", nova(0.45)),
        stt_attrs(),
    ),
    Case(
        "seed-tts",
        tts(
            "voice-characters",
            {
                "serviceProvider": "elevenlabs",
                "model": "eleven_turbo_v2_5",
                "plan": "creator",
                "characterCount": 1200,
            },
        ),
        {
            sc.USAGE_KIND: "tts",
            sc.INDICATOR: "voice-characters",
            sc.PROVIDER: "elevenlabs",
            sc.MODEL: "eleven_turbo_v2_5",
            sc.PLAN: "creator",
            sc.TTS_CHARACTERS: 1200,
        },
    ),
    Case(
        "seed-sts",
        sts("realtime-minutes", SEED_STS, **OPENAI),
        SEED_STS_ATTRIBUTES,
    ),
    # Units and JSON number types.
    Case(
        "stt-seconds-become-minutes",
        stt(
            "voice-minutes",
            {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 27 / 60},
        ),
        {**stt_attrs(), sc.STT_AUDIO_MINUTES: None, sc.STT_AUDIO_SECONDS: 27.0},
    ),
    Case(
        "stt-int-minutes-sent-as-float",
        stt("voice-minutes", nova(2)),
        stt_attrs(**{sc.STT_AUDIO_MINUTES: 2}),
    ),
    Case(
        "tts-float-count-sent-as-int",
        tts("c", {"serviceProvider": "azure", "model": "neural", "characterCount": 1200.0}),
        {
            sc.USAGE_KIND: "tts",
            sc.INDICATOR: "c",
            sc.PROVIDER: "azure",
            sc.MODEL: "neural",
            sc.TTS_CHARACTERS: 1200.0,
        },
    ),
    # Stripping, defaults, non-ASCII.
    Case(
        "stt-whitespace-stripped",
        stt(
            "  voice-minutes \t",
            {
                "serviceProvider": " deepgram ",
                "model": "\tnova-2 ",
                "plan": "  growth  ",
                "audioDuration": 0.45,
            },
            agent=f"  {AGENT}  ",
            customer=f"\t{CUSTOMER}\n",
        ),
        stt_attrs(
            **{
                sc.INDICATOR: "  voice-minutes \t",
                sc.PROVIDER: " deepgram ",
                sc.MODEL: "\tnova-2 ",
                sc.PLAN: "  growth  ",
            }
        ),
        identity={sc.AGENT_ID: f"  {AGENT}  ", sc.CUSTOMER_ID: f"\t{CUSTOMER}\n"},
    ),
    Case(
        "tts-whitespace-stripped",
        tts(
            " c ",
            {"serviceProvider": " eleven ", "model": " v2 ", "plan": " p ", "characterCount": 5},
            agent=" a ",
            customer=" c ",
        ),
        {
            sc.USAGE_KIND: "tts",
            sc.INDICATOR: " c ",
            sc.PROVIDER: " eleven ",
            sc.MODEL: " v2 ",
            sc.PLAN: " p ",
            sc.TTS_CHARACTERS: 5,
        },
        identity={sc.AGENT_ID: " a ", sc.CUSTOMER_ID: " c "},
    ),
    Case(
        "non-ascii-ids",
        stt(
            "minutes-ü",
            {"serviceProvider": "deepgram", "model": "nova-2-ß", "audioDuration": 0.45},
            agent="agent-élan",
            customer="客户-Zoë",
        ),
        stt_attrs(**{sc.INDICATOR: "minutes-ü", sc.MODEL: "nova-2-ß"}),
        identity={sc.AGENT_ID: "agent-élan", sc.CUSTOMER_ID: "客户-Zoë"},
    ),
    Case(
        "empty-plan-is-default",
        stt(
            "voice-minutes",
            {"serviceProvider": "deepgram", "model": "nova-2", "plan": "", "audioDuration": 0.45},
        ),
        stt_attrs(**{sc.PLAN: ""}),
    ),
    Case(
        "blank-plan-is-default",
        stt(
            "voice-minutes",
            {
                "serviceProvider": "deepgram",
                "model": "nova-2",
                "plan": "   ",
                "audioDuration": 0.45,
            },
        ),
        stt_attrs(**{sc.PLAN: "   "}),
    ),
    Case(
        "no-indicator-is-empty",
        stt("", nova(0.45)),
        stt_attrs(**{sc.INDICATOR: None}),
    ),
    # STS zero-omission and shapes.
    Case(
        "sts-zero-values-omitted",
        sts("rt", ZERO_STS, **OPENAI),
        {**STS_BASE, **_ZERO_QUANTITIES},
    ),
    Case(
        "sts-undivided-cached-count",
        sts(
            "rt",
            SpeechToSpeechUsageMetadata(
                input=StsInputSide(text=StsModalityUsage(tokens=1000)),
                cached=StsCachedBreakdown(legacy_tokens=300),
            ),
            **OPENAI,
        ),
        {**STS_BASE, sc.STS_INPUT_TEXT_TOKENS: 1000, sc.STS_CACHED_TOKENS: 300},
    ),
    Case(
        "sts-connection-minutes-only-int",
        sts(
            "rt",
            SpeechToSpeechUsageMetadata(connection_minutes=3),
            service_provider="hume",
            model="evi-3",
        ),
        {**STS_BASE, sc.PROVIDER: "hume", sc.MODEL: "evi-3", sc.STS_CONNECTION_MINUTES: 3},
    ),
    Case(
        "sts-seconds-become-minutes",
        sts(
            "rt",
            SpeechToSpeechUsageMetadata(
                input=StsInputSide(audio=StsModalityUsage(minutes=45 / 60)),
                output=StsOutputSide(audio=StsModalityUsage(minutes=90 / 60)),
                connection_minutes=150 / 60,
            ),
            **OPENAI,
        ),
        {
            **STS_BASE,
            sc.STS_INPUT_AUDIO_SECONDS: 45,
            sc.STS_OUTPUT_AUDIO_SECONDS: 90.0,
            sc.STS_CONNECTION_SECONDS: 150,
        },
    ),
    Case(
        "sts-image-and-video",
        sts(
            "rt",
            SpeechToSpeechUsageMetadata(
                input=StsInputSide(
                    image=StsModalityUsage(tokens=10),
                    video=StsModalityUsage(tokens=20, minutes=0.1),
                ),
                cached=StsCachedBreakdown(image_tokens=4),
            ),
            service_provider="google",
            model="gemini-live",
        ),
        {
            **STS_BASE,
            sc.PROVIDER: "google",
            sc.MODEL: "gemini-live",
            sc.STS_INPUT_IMAGE_TOKENS: 10,
            sc.STS_INPUT_VIDEO_TOKENS: 20,
            sc.STS_INPUT_VIDEO_MINUTES: 0.1,
            sc.STS_CACHED_IMAGE_TOKENS: 4,
        },
    ),
    # metaTags: the SDK's rules (stringify, strip, limits; invalid -> whole object dropped).
    Case(
        "meta-tags-stringified-and-stripped",
        v2_stt(
            {
                "region": " eu ",
                "tier": 2,
                "beta": True,
                "ratio": 1.5,
                "empty": "",
                "k" * 64: "v" * 256,
            }
        ),
        stt_attrs(
            **meta(
                {
                    "region": " eu ",
                    "tier": 2,
                    "beta": True,
                    "ratio": 1.5,
                    "empty": "",
                    "k" * 64: "v" * 256,
                }
            )
        ),
    ),
    Case(
        "meta-tags-key-stripped",
        v2_stt({" region ": "eu"}),
        stt_attrs(**meta({" region ": "eu"})),
    ),
    Case("meta-tags-exactly-20", v2_stt(TWENTY_TAGS), stt_attrs(**meta(TWENTY_TAGS))),
    Case(
        "meta-tags-over-20-dropped",
        v2_stt({**TWENTY_TAGS, "one_more": "x"}),
        stt_attrs(**meta({**TWENTY_TAGS, "one_more": "x"})),
    ),
    Case(
        "meta-tags-bad-key-dropped",
        v2_stt({"bad key!": "x", "ok": "y"}),
        stt_attrs(**meta({"bad key!": "x", "ok": "y"})),
    ),
    Case(
        "meta-tags-long-key-dropped",
        v2_stt({"k" * 65: "x", "ok": "y"}),
        stt_attrs(**meta({"k" * 65: "x", "ok": "y"})),
    ),
    Case(
        "meta-tags-long-value-dropped",
        v2_stt({"note": "v" * 257, "ok": "y"}),
        stt_attrs(**meta({"note": "v" * 257, "ok": "y"})),
    ),
    Case(
        "meta-tags-non-ascii-key-dropped",
        v2_stt({"région": "eu"}),
        stt_attrs(**meta({"région": "eu"})),
    ),
]

NOTHING_SENT = [
    Case(
        "stt-zero",
        stt("m", nova(0)),
        stt_attrs(**{sc.STT_AUDIO_MINUTES: 0}),
    ),
    Case(
        "tts-zero",
        tts("c", {"serviceProvider": "azure", "model": "neural", "characterCount": 0}),
        {sc.USAGE_KIND: "tts", sc.PROVIDER: "azure", sc.MODEL: "neural", sc.TTS_CHARACTERS: 0},
    ),
    Case(
        "stt-negative",
        stt("m", nova(-1.0)),
        stt_attrs(**{sc.STT_AUDIO_MINUTES: -1.0}),
    ),
    Case(
        "missing-customer",
        stt("m", nova(0.45), customer=""),
        stt_attrs(),
        identity={sc.AGENT_ID: AGENT},
    ),
    Case(
        "blank-agent",
        stt("m", nova(0.45), agent="   "),
        stt_attrs(),
        identity={sc.AGENT_ID: "   ", sc.CUSTOMER_ID: CUSTOMER},
    ),
]


@pytest.fixture
def parity(sandbox: SandboxServer, tracing: Callable[..., Tracing]) -> Iterator[Parity]:
    yield Parity(sandbox, tracing(trace_tags=False))


@dataclass
class Parity:
    """Sends one usage both ways to one sandbox; returns each side's parsed bodies."""

    sandbox: SandboxServer
    pipeline: Tracing

    def sdk(self, call: SdkCall) -> list[dict[str, Any]]:
        return sent_by_sdk(self.sandbox, call)

    def exporter(self, case: Case) -> list[dict[str, Any]]:
        attributes = {
            k: v for k, v in {**case.identity, **case.attributes}.items() if v is not None
        }
        with self.pipeline.tracer.start_as_current_span("usage") as span:
            span.set_attributes(attributes)
        self.pipeline.flush()
        return ledger_bodies(self.sandbox, keyed=True)


def typed(document: object) -> str:
    """Canonical JSON text: key order ignored, ``1`` and ``1.0`` kept apart."""
    return json.dumps(document, sort_keys=True, ensure_ascii=False, allow_nan=False)


@pytest.mark.parametrize("case", SAME_BODY, ids=lambda c: c.id)
def test_exporter_sends_the_sdks_document(parity: Parity, case: Case) -> None:
    (sdk_body,) = parity.sdk(case.sdk)
    (exporter_body,) = parity.exporter(case)
    assert typed(exporter_body) == typed(sdk_body)


@pytest.mark.parametrize("case", NOTHING_SENT, ids=lambda c: c.id)
def test_exporter_skips_what_the_sdk_skips(parity: Parity, case: Case) -> None:
    assert parity.sdk(case.sdk) == []
    assert parity.exporter(case) == []
    stats = parity.pipeline.exporter.stats
    # Never silent: a zero is counted as skipped, anything else as invalid.
    assert stats.get("skipped_zero", 0) + stats.get("invalid", 0) == 1, stats
    assert parity.sandbox.ledger.request_log() == []


def test_seed_examples_carry_their_kind_in_the_ledger(parity: Parity) -> None:
    """The three seed records land as one STT, one TTS and one STS row, like the SDK's."""
    for case in SAME_BODY[:3]:
        parity.sdk(case.sdk)
        parity.exporter(case)
    rows = parity.sandbox.ledger.rows()
    kinds = [(row["kind"], row["idempotency_key"] is not None) for row in rows]
    assert sorted(kinds) == sorted(
        (kind, keyed) for kind in ("stt", "tts", "sts") for keyed in (False, True)
    )


# ----------------------------------------------------------------- deliberate divergences


def test_sts_plan_is_stripped_unlike_the_sdk(parity: Parity) -> None:
    """Decision: the STS plan is stripped like STT/TTS plans; the SDK sends it as given."""
    metadata = SpeechToSpeechUsageMetadata(input=StsInputSide(text=StsModalityUsage(tokens=10)))
    (sdk_body,) = parity.sdk(sts("rt", metadata, plan="  pro  ", **OPENAI))
    case = Case("", lambda c: None, {**STS_BASE, sc.PLAN: "  pro  ", sc.STS_INPUT_TEXT_TOKENS: 10})
    (exporter_body,) = parity.exporter(case)
    assert sdk_body["rawUsage"]["plan"] == "  pro  "
    assert exporter_body["rawUsage"]["plan"] == "pro"
    sdk_body["rawUsage"]["plan"] = "pro"
    assert typed(exporter_body) == typed(sdk_body)


def test_missing_provider_is_refused_unlike_the_sdk(
    parity: Parity, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: Paygent cannot price a record without provider; the SDK sends it anyway."""
    (sdk_body,) = parity.sdk(
        stt("m", {"serviceProvider": "", "model": "nova-2", "audioDuration": 0.45})
    )
    assert sdk_body["rawUsage"]["provider"] == ""
    assert parity.exporter(Case("", lambda c: None, stt_attrs(**{sc.PROVIDER: ""}))) == []
    assert parity.pipeline.exporter.stats.get("invalid") == 1
    assert any(
        sc.PROVIDER in r.getMessage() and "missing or blank" in r.getMessage()
        for r in caplog.records
    )


def test_all_zero_sts_is_skipped_unlike_the_sdk(parity: Parity) -> None:
    """Decision: an STS record whose quantities are all zero is skipped (the SDK sends
    ``{"schemaVersion": 1}``, a call that bills nothing)."""
    metadata = SpeechToSpeechUsageMetadata(input=StsInputSide(text=StsModalityUsage(tokens=0)))
    (sdk_body,) = parity.sdk(sts("rt", metadata, **OPENAI))
    assert sdk_body["rawUsage"]["usageMetadata"] == {"schemaVersion": 1}
    assert (
        parity.exporter(Case("", lambda c: None, {**STS_BASE, sc.STS_INPUT_TEXT_TOKENS: 0})) == []
    )
    assert parity.pipeline.exporter.stats.get("skipped_zero") == 1


def test_cached_split_with_undivided_count_is_refused_unlike_the_sdk(parity: Parity) -> None:
    """The SDK silently keeps the split and drops the undivided count; which one the user
    meant is unknowable, so the exporter refuses the record instead of guessing a bill."""
    metadata = SpeechToSpeechUsageMetadata(
        input=StsInputSide(text=StsModalityUsage(tokens=100)),
        cached=StsCachedBreakdown(text_tokens=10, legacy_tokens=50),
    )
    (sdk_body,) = parity.sdk(sts("rt", metadata, **OPENAI))
    assert sdk_body["rawUsage"]["usageMetadata"]["cached"] == {"text": {"tokens": 10}}
    case = Case(
        "",
        lambda c: None,
        {
            **STS_BASE,
            sc.STS_INPUT_TEXT_TOKENS: 100,
            sc.STS_CACHED_TEXT_TOKENS: 10,
            sc.STS_CACHED_TOKENS: 50,
        },
    )
    assert parity.exporter(case) == []
    assert parity.pipeline.exporter.stats.get("invalid") == 1


def test_bodies_are_compared_with_json_types() -> None:
    """The comparison itself must tell an int from a float, or parity proves nothing."""
    assert typed({"a": 1}) != typed({"a": 1.0})
    assert typed({"a": 1, "b": 2}) == typed({"b": 2, "a": 1})
