"""The one mapping, case by case: what each record becomes, to the byte.

Written from the survivors of ``make mutate`` (see ``docs/testing.md``): every test here
asserts something a user or Paygent sees through :func:`paygent_otel.map_usage` or the
other public functions of ``paygent_otel.convention.mapping`` -- the JSON sent, the
``Idempotency-Key`` (pinned: a key that changed between versions would bill a re-sent
record twice), the rejection, its reason, key and message (the dead-letter reason).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from paygent_otel import Rejection, RejectReason, UsageRecord, map_usage
from paygent_otel import semconv as sc
from paygent_otel.convention.mapping import (
    MAX_META_TAGS,
    MAX_MINUTES,
    MAX_USAGE_ID_LENGTH,
    IdentityDefaults,
    conflict_rejection,
    idempotency_key,
    rejection_key,
    validate_quantities,
)

REF = "span:0af7651916cd43dd8448eb211c80319c:b7ad6b7169203331:0"
ORIGIN = "span 'voice-turn'"
TRACE_IDS = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
IDENTITY = {
    sc.AGENT_ID: "agent-élan",
    sc.CUSTOMER_ID: "cust_8812",
    sc.PROVIDER: "openai",
    sc.MODEL: "gpt-realtime",
}
STT = {**IDENTITY, sc.USAGE_KIND: "stt", sc.STT_AUDIO_MINUTES: 0.45}
TTS = {**IDENTITY, sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 1200}
STS = {**IDENTITY, sc.USAGE_KIND: "sts", sc.STS_INPUT_TEXT_TOKENS: 120}
NO_TRACE_TAGS = IdentityDefaults(trace_tags=False)


def mapped(attributes: dict[str, Any], **kwargs: Any) -> UsageRecord | Rejection:
    kwargs.setdefault("ref", REF)
    kwargs.setdefault("origin", ORIGIN)
    kwargs.setdefault("defaults", NO_TRACE_TAGS)
    return map_usage(attributes, **kwargs)


def accepted(attributes: dict[str, Any], **kwargs: Any) -> UsageRecord:
    result = mapped(attributes, **kwargs)
    assert isinstance(result, UsageRecord), result
    return result


def rejected(attributes: dict[str, Any], **kwargs: Any) -> Rejection:
    result = mapped(attributes, **kwargs)
    assert isinstance(result, Rejection), result
    return result


def without(attributes: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if k not in names}


def expected_key(ref: str, usage: dict[str, Any]) -> str:
    """The documented key: a digest of the ref, then a digest of the ref and the usage."""

    def digest(*parts: str) -> str:
        data = "\x1f".join(parts).encode("utf-8", "surrogatepass")
        return hashlib.sha256(data).hexdigest()

    canonical = json.dumps(usage, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return digest("ref", ref)[:20] + digest(ref, canonical)[20:40]


# --------------------------------------------------------------------------- keys


def test_key_is_pinned_and_follows_the_documented_digests() -> None:
    record = accepted(
        {
            **STS,
            sc.STS_OUTPUT_AUDIO_SECONDS: 30.0,
            sc.CUSTOMER_ID: "客户-Zoë",
            sc.META_PREFIX + "team": "voice",
        },
        defaults=IdentityDefaults(),
        trace_ids=TRACE_IDS,
    )
    usage = {**record.payload, "metaTags": {"team": "voice"}}
    assert record.idempotency_key == expected_key(REF, usage)
    # Pinned: the same record must keep its key across versions (a re-sent record with a
    # new key is billed twice).
    assert record.idempotency_key == "b9988c7cab50ea539cdac89ad09bd3259c451cfa"
    assert record.ref == REF and record.ref_key == record.idempotency_key[:20]


def test_trace_links_are_not_part_of_the_usage_in_the_key() -> None:
    linked = accepted(STT, defaults=IdentityDefaults(), trace_ids=TRACE_IDS)
    unlinked = accepted(STT)
    assert linked.idempotency_key == unlinked.idempotency_key == expected_key(REF, unlinked.payload)
    assert "metaTags" not in unlinked.payload
    assert "metaTags" not in accepted(STT, defaults=IdentityDefaults()).payload


def test_a_lone_surrogate_still_makes_a_key() -> None:
    # Surrogates reach attributes from some SDKs; the key must not raise on them.
    record = accepted({**TTS, sc.CUSTOMER_ID: "cust\ud800"})
    assert record.idempotency_key == expected_key(REF, record.payload)
    assert idempotency_key("a\ud800", 1) == "3ee1131fc9aac10c00fcebe9676f05956bd81eb0"


def test_idempotency_key_is_40_hex_digits_of_the_joined_parts() -> None:
    key = idempotency_key("ref", REF)
    assert key == hashlib.sha256(f"ref\x1f{REF}".encode()).hexdigest()[:40]


def test_rejection_key_is_pinned_and_uses_the_ref() -> None:
    bad = {**TTS, sc.TTS_CHARACTERS: -1}
    rejection = rejected(bad)
    canonical = json.dumps(bad, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256("\x1f".join(("invalid", REF, canonical)).encode()).hexdigest()
    assert rejection.idempotency_key == rejection_key(REF, bad) == digest[:40]
    assert rejection.idempotency_key == "504ea6455ce20d0d7032cbe58b4710209a38bb90"
    assert rejection_key("another ref", bad) != rejection.idempotency_key


def test_rejection_key_of_a_value_that_is_not_json_uses_its_repr() -> None:
    bad = {**TTS, sc.TTS_CHARACTERS: b"12"}
    rejection = rejected(bad)
    assert rejection.message == (
        f"usage record from {ORIGIN} rejected: paygent.tts.characters must be a number, "
        "got bytes b'12'"
    )
    as_repr = {**bad, sc.TTS_CHARACTERS: "b'12'"}
    assert rejection.idempotency_key == rejection_key(REF, as_repr)
    assert rejection.idempotency_key == "efc193fb95fdd00378267cde1148dc9e38d9aeb7"


# --------------------------------------------------------------------------- payloads


def test_sts_payload_has_schema_version_and_minutes_from_seconds() -> None:
    record = accepted({**STS, sc.STS_OUTPUT_AUDIO_SECONDS: 30.0, sc.STS_CONNECTION_SECONDS: 90})
    assert record.payload == {
        "agentId": "agent-élan",
        "customerId": "cust_8812",
        "indicator": "",
        "rawUsage": {
            "provider": "openai",
            "model": "gpt-realtime",
            "plan": "default",
            "usageMetadata": {
                "schemaVersion": 1,
                "input": {"text": {"tokens": 120}},
                "output": {"audio": {"minutes": 0.5}},
                "connection": {"minutes": 1.5},
            },
        },
    }
    assert record.origin == ORIGIN and record.warnings == () and record.aliases == ()


def test_stt_seconds_become_minutes() -> None:
    record = accepted({**without(STT, sc.STT_AUDIO_MINUTES), sc.STT_AUDIO_SECONDS: 27.0})
    assert record.payload["rawUsage"]["audioDuration"] == 0.45


@pytest.mark.parametrize(
    ("cached", "sent"),
    [
        ({sc.STS_CACHED_TOKENS: 50}, {"tokens": 50}),
        (
            {sc.STS_CACHED_TEXT_TOKENS: 10, sc.STS_CACHED_AUDIO_TOKENS: 20},
            {"text": {"tokens": 10}, "audio": {"tokens": 20}},
        ),
    ],
    ids=["undivided-alone", "two-modalities"],
)
def test_cached_counts_alone_are_sent(cached: dict[str, int], sent: dict[str, Any]) -> None:
    record = accepted({**STS, **cached})
    assert record.payload["rawUsage"]["usageMetadata"]["cached"] == sent


def test_identity_falls_back_to_inherited_layers_then_defaults() -> None:
    record = accepted(
        {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 10, sc.MODEL: "sonic"},
        inherited=({sc.PROVIDER: "cartesia"}, {sc.MODEL: "not-this", sc.PLAN: " pro "}),
        defaults=IdentityDefaults(agent_id="agent-d", customer_id="cust-d", indicator="chars"),
    )
    assert record.payload == {
        "agentId": "agent-d",
        "customerId": "cust-d",
        "indicator": "chars",
        "rawUsage": {"provider": "cartesia", "model": "sonic", "plan": "pro", "characterCount": 10},
    }


def test_missing_indicator_and_plan_are_sent_empty_and_default() -> None:
    raw = accepted(TTS).payload
    assert raw["indicator"] == "" and raw["rawUsage"]["plan"] == "default"


# --------------------------------------------------------------------------- meta tags


def test_meta_tags_at_their_limits_are_sent() -> None:
    tags = {f"{sc.META_PREFIX}t{i}": f" v{i} " for i in range(MAX_META_TAGS - 1)}
    tags[sc.META_PREFIX + "k" * 64] = "v" * 256
    record = accepted({**STT, **tags})
    expected = {f"t{i}": f"v{i}" for i in range(MAX_META_TAGS - 1)}
    expected["k" * 64] = "v" * 256
    assert record.payload["metaTags"] == expected
    assert record.warnings == ()


def test_trace_tags_fill_only_free_places_and_never_replace_a_users_tag() -> None:
    nineteen = {f"{sc.META_PREFIX}t{i}": "x" for i in range(MAX_META_TAGS - 1)}
    tags = accepted({**STT, **nineteen}, defaults=IdentityDefaults(), trace_ids=TRACE_IDS)
    assert len(tags.payload["metaTags"]) == MAX_META_TAGS
    assert tags.payload["metaTags"]["otel_trace_id"] == TRACE_IDS[0]
    assert "otel_span_id" not in tags.payload["metaTags"]
    twenty = {**nineteen, sc.META_PREFIX + "t19": "x"}
    full = accepted({**STT, **twenty}, defaults=IdentityDefaults(), trace_ids=TRACE_IDS)
    assert len(full.payload["metaTags"]) == MAX_META_TAGS
    assert "otel_trace_id" not in full.payload["metaTags"]
    own = accepted(
        {**STT, sc.META_PREFIX + "otel_trace_id": "mine"},
        defaults=IdentityDefaults(),
        trace_ids=TRACE_IDS,
    )
    assert own.payload["metaTags"] == {"otel_trace_id": "mine", "otel_span_id": TRACE_IDS[1]}


# --------------------------------------------------------------------------- usage ids


def test_usage_id_replaces_the_ref_and_keeps_the_old_one_as_an_alias() -> None:
    record = accepted(
        {**TTS, sc.USAGE_ID: " job-42 "}, aliases=("0123456789abcdef0123456789abcdef01234567",)
    )
    assert record.ref == "usage-id:job-42"
    assert record.aliases == (REF, "0123456789abcdef0123456789abcdef01234567")
    assert record.idempotency_key == expected_key("usage-id:job-42", record.payload)


def test_usage_id_of_the_longest_length_is_accepted() -> None:
    usage_id = "u" * MAX_USAGE_ID_LENGTH
    assert accepted({**TTS, sc.USAGE_ID: usage_id}).ref == "usage-id:" + usage_id


@pytest.mark.parametrize(
    "usage_id", ["  ", "u" * (MAX_USAGE_ID_LENGTH + 1)], ids=["blank", "too-long"]
)
def test_blank_or_long_usage_id_is_rejected(usage_id: str) -> None:
    bad = {**TTS, sc.USAGE_ID: usage_id}
    rejection = rejected(bad)
    assert rejection.reason is RejectReason.INVALID
    assert rejection.message == (
        f"usage record from {ORIGIN} rejected: paygent.usage.id must be a non-blank string "
        "of at most 256 characters"
    )
    assert rejection.idempotency_key == rejection_key(REF, bad)
    assert rejection.attributes == bad and rejection.origin == ORIGIN


def test_invalid_record_with_a_usage_id_is_keyed_by_the_usage_id() -> None:
    bad = {**TTS, sc.USAGE_ID: "job-42", sc.TTS_CHARACTERS: -1}
    assert rejected(bad).idempotency_key == rejection_key("usage-id:job-42", bad)


# --------------------------------------------------------------------------- rejections

INVALID_MESSAGES = [
    ("number-as-str", {**TTS, sc.TTS_CHARACTERS: "1200"},
     "paygent.tts.characters must be a number, got str '1200'"),
    # A value's repr is cut at 40 characters: 40 kept whole, 41 cut to 37 and "...".
    ("repr-of-40", {**TTS, sc.TTS_CHARACTERS: "x" * 38},
     "paygent.tts.characters must be a number, got str '" + "x" * 38 + "'"),
    ("repr-of-41", {**TTS, sc.TTS_CHARACTERS: "x" * 39},
     "paygent.tts.characters must be a number, got str '" + "x" * 36 + "..."),
    ("negative", {**STT, sc.STT_AUDIO_MINUTES: -0.5},
     "paygent.stt.audio.minutes must not be negative, got -0.5"),
    ("count-over-limit", {**TTS, sc.TTS_CHARACTERS: 10_000_000_001},
     "paygent.tts.characters 10000000001 exceeds the limit of 10000000000"),
    ("minutes-over-limit", {**STT, sc.STT_AUDIO_MINUTES: MAX_MINUTES + 0.5},
     "paygent.stt.audio.minutes 100000.5 min exceeds the limit of 100000 minutes"),
    ("seconds-over-limit",
     {**without(STT, sc.STT_AUDIO_MINUTES), sc.STT_AUDIO_SECONDS: MAX_MINUTES * 60 + 1},
     "paygent.stt.audio.seconds 6000001.0 s exceeds the limit of 100000 minutes"),
    ("conflicting-units", {**STT, sc.STT_AUDIO_SECONDS: 27.0},
     "paygent.stt.audio.seconds conflicting units: paygent.stt.audio.minutes is set too; "
     "set only one"),
    ("stt-without-quantity", without(STT, sc.STT_AUDIO_MINUTES),
     "paygent.usage.kind a stt record needs a quantity "
     "(one of paygent.stt.audio.minutes, paygent.stt.audio.seconds)"),
    ("tts-without-quantity", without(TTS, sc.TTS_CHARACTERS),
     "paygent.usage.kind a tts record needs a quantity (one of paygent.tts.characters)"),
    ("sts-without-quantity", without(STS, sc.STS_INPUT_TEXT_TOKENS),
     "paygent.usage.kind a sts record needs a quantity (a paygent.sts.* attribute)"),
    ("cached-both", {**STS, sc.STS_CACHED_TOKENS: 5, sc.STS_CACHED_TEXT_TOKENS: 5},
     "paygent.sts.cached.tokens the undivided cached count and per-modality cached counts "
     "are never sent together"),
    ("agent-not-str", {**STT, sc.AGENT_ID: 7}, "paygent.agent.id must be a string, got int 7"),
    ("customer-not-str", {**STT, sc.CUSTOMER_ID: 8812},
     "paygent.customer.id must be a string, got int 8812"),
    ("indicator-not-str", {**STT, sc.INDICATOR: 1.5},
     "paygent.indicator must be a string, got float 1.5"),
    ("provider-not-str", {**STT, sc.PROVIDER: ["a"]},
     "paygent.provider must be a string, got list ['a']"),
    ("model-not-str", {**STT, sc.MODEL: 2}, "paygent.model must be a string, got int 2"),
    ("plan-not-str", {**STT, sc.PLAN: 3}, "paygent.plan must be a string, got int 3"),
    ("usage-id-not-str", {**STT, sc.USAGE_ID: 5},
     "paygent.usage.id must be a string, got int 5"),
    ("agent-missing", without(STT, sc.AGENT_ID),
     "paygent.agent.id is missing or blank "
     "(set it on the record, span, resource or PAYGENT_AGENT_ID)"),
    ("customer-missing", without(STT, sc.CUSTOMER_ID),
     "paygent.customer.id is missing or blank (set it on the record, span, resource or baggage)"),
    ("provider-missing", without(STT, sc.PROVIDER),
     "paygent.provider is missing or blank (Paygent cannot price the record)"),
    ("model-missing", without(STT, sc.MODEL),
     "paygent.model is missing or blank (Paygent cannot price the record)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attributes", "rule"), [c[1:] for c in INVALID_MESSAGES], ids=[c[0] for c in INVALID_MESSAGES]
)
def test_invalid_record_rejection_names_attribute_and_rule(
    attributes: dict[str, Any], rule: str
) -> None:
    rejection = rejected(attributes)
    assert rejection.reason is RejectReason.INVALID
    assert rejection.message == f"usage record from {ORIGIN} rejected: {rule}"
    assert rejection.origin == ORIGIN
    assert rejection.idempotency_key == rejection_key(REF, attributes)
    assert rejection.attributes == attributes


def test_quantity_limits_are_inclusive_for_seconds() -> None:
    record = accepted({**without(STT, sc.STT_AUDIO_MINUTES), sc.STT_AUDIO_SECONDS: 6_000_000})
    assert record.payload["rawUsage"]["audioDuration"] == MAX_MINUTES


def test_zero_record_is_skipped_with_its_key_and_attributes() -> None:
    zero = {**TTS, sc.TTS_CHARACTERS: 0}
    rejection = rejected(zero)
    assert rejection == Rejection(
        RejectReason.ZERO,
        f"usage record from {ORIGIN} skipped: every quantity is zero",
        ORIGIN,
        rejection_key(REF, zero),
        zero,
    )


@pytest.mark.parametrize(
    ("kind", "attributes", "message"),
    [
        (sc.UsageKind.STT, {sc.STT_AUDIO_SECONDS: 90}, None),
        (
            sc.UsageKind.STT,
            {sc.STT_AUDIO_MINUTES: -1},
            "paygent.stt.audio.minutes: must not be negative, got -1",
        ),
        (
            sc.UsageKind.TTS,
            {},
            "paygent.usage.kind: a tts record needs a quantity (one of paygent.tts.characters)",
        ),
    ],
    ids=["valid", "negative", "none"],
)
def test_validate_quantities_returns_raw_usage_or_names_the_rule(
    kind: sc.UsageKind, attributes: dict[str, Any], message: str | None
) -> None:
    if message is None:
        assert validate_quantities(kind, attributes) == {"audioDuration": 1.5}
        return
    with pytest.raises(ValueError) as caught:
        validate_quantities(kind, attributes)
    assert str(caught.value) == message


# --------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize(
    ("attributes", "held", "explained"),
    [
        (
            {**TTS, sc.USAGE_ID: "job-42"},
            "pending",
            "a record with paygent.usage.id 'job-42' is waiting for delivery with different "
            "usage, so this one is not billed: give separate usages separate ids",
        ),
        (
            TTS,
            "delivered",
            "a record with the same telemetry (trace, span and position, log record or metric "
            "interval) was billed with different usage, so this one is not billed: was it sent "
            "again after its attributes or the exporter's defaults changed?",
        ),
    ],
    ids=["pending-usage-id", "delivered-telemetry"],
)
def test_conflict_rejection_names_what_is_held_and_what_to_do(
    attributes: dict[str, Any], held: str, explained: str
) -> None:
    record = accepted(attributes)
    assert conflict_rejection(record, held) == Rejection(
        RejectReason.INVALID,
        f"usage record from {ORIGIN} refused: {explained}",
        ORIGIN,
        record.idempotency_key,
        record.payload,
    )
