"""Bad values never crash anything and never send a wrong bill.

Every case ends as a correct payload, a skipped zero, or an invalid record whose message
names the span, the attribute and the rule. The per-case tests run the span front end
(``records_from_span``, what the exporter calls); the end-to-end test sends all of them
through a real ``TracerProvider`` to the sandbox and checks the ledger, counters, log and
dead letters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import STT_ATTRIBUTES as STT
from conftest import USAGE_IDENTITY as IDENTITY
from conftest import Tracing

from paygent_otel import Rejection, RejectReason, UsageRecord
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import MAX_COUNT, MAX_MINUTES, IdentityDefaults
from paygent_otel.exporters.spans import records_from_span
from paygent_otel.sandbox import SandboxServer

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"

TTS = {**IDENTITY, sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 1200}
STS = {**IDENTITY, sc.USAGE_KIND: "sts", sc.STS_INPUT_TEXT_TOKENS: 100}
DROP = object()
"""Marks an attribute the case removes from its base record."""


@dataclass
class Invalid:
    id: str
    base: dict[str, Any]
    changes: dict[str, Any]
    attribute: str
    rule: str

    def attributes(self) -> dict[str, Any]:
        return apply(self.base, self.changes)


def apply(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **changes}
    return {k: v for k, v in merged.items() if v is not DROP}


INVALID = [
    # quantities
    Invalid(
        "negative-minutes",
        STT,
        {sc.STT_AUDIO_MINUTES: -0.5},
        sc.STT_AUDIO_MINUTES,
        "must not be negative",
    ),
    Invalid(
        "negative-tokens",
        STS,
        {sc.STS_INPUT_TEXT_TOKENS: -1},
        sc.STS_INPUT_TEXT_TOKENS,
        "must not be negative",
    ),
    Invalid("nan", STT, {sc.STT_AUDIO_MINUTES: math.nan}, sc.STT_AUDIO_MINUTES, "must be finite"),
    Invalid(
        "infinite", STT, {sc.STT_AUDIO_MINUTES: math.inf}, sc.STT_AUDIO_MINUTES, "must be finite"
    ),
    Invalid(
        "minus-infinite", TTS, {sc.TTS_CHARACTERS: -math.inf}, sc.TTS_CHARACTERS, "must be finite"
    ),
    Invalid(
        "absurd-minutes",
        STT,
        {sc.STT_AUDIO_MINUTES: 1e9},
        sc.STT_AUDIO_MINUTES,
        "exceeds the limit",
    ),
    Invalid(
        "absurd-seconds",
        STT,
        {sc.STT_AUDIO_MINUTES: DROP, sc.STT_AUDIO_SECONDS: 1e12},
        sc.STT_AUDIO_SECONDS,
        "exceeds the limit",
    ),
    Invalid(
        "absurd-characters",
        TTS,
        {sc.TTS_CHARACTERS: MAX_COUNT + 1},
        sc.TTS_CHARACTERS,
        "exceeds the limit",
    ),
    # A Python int beyond any float: float() of it raises OverflowError.
    Invalid(
        "int-beyond-float",
        TTS,
        {sc.TTS_CHARACTERS: 10**400},
        sc.TTS_CHARACTERS,
        "exceeds the limit",
    ),
    Invalid(
        "int-beyond-float-seconds",
        STT,
        {sc.STT_AUDIO_MINUTES: DROP, sc.STT_AUDIO_SECONDS: 10**400},
        sc.STT_AUDIO_SECONDS,
        "exceeds the limit",
    ),
    Invalid(
        "float-beyond-count",
        STS,
        {sc.STS_INPUT_TEXT_TOKENS: 1e300},
        sc.STS_INPUT_TEXT_TOKENS,
        "exceeds the limit",
    ),
    Invalid(
        "fractional-characters", TTS, {sc.TTS_CHARACTERS: 12.5}, sc.TTS_CHARACTERS, "whole number"
    ),
    Invalid(
        "number-as-string",
        TTS,
        {sc.TTS_CHARACTERS: "1200"},
        sc.TTS_CHARACTERS,
        "must be a number, got str",
    ),
    Invalid(
        "minutes-as-string",
        STT,
        {sc.STT_AUDIO_MINUTES: "0.45"},
        sc.STT_AUDIO_MINUTES,
        "must be a number, got str",
    ),
    Invalid(
        "number-as-bool",
        TTS,
        {sc.TTS_CHARACTERS: True},
        sc.TTS_CHARACTERS,
        "must be a number, got bool",
    ),
    Invalid(
        "tokens-as-bool",
        STS,
        {sc.STS_INPUT_TEXT_TOKENS: False},
        sc.STS_INPUT_TEXT_TOKENS,
        "must be a number, got bool",
    ),
    Invalid(
        "number-as-list",
        TTS,
        {sc.TTS_CHARACTERS: [600, 600]},
        sc.TTS_CHARACTERS,
        "must be a number",
    ),
    # identity
    Invalid("missing-customer", STT, {sc.CUSTOMER_ID: DROP}, sc.CUSTOMER_ID, "missing or blank"),
    Invalid("blank-customer", STT, {sc.CUSTOMER_ID: " \t "}, sc.CUSTOMER_ID, "missing or blank"),
    Invalid("empty-customer", TTS, {sc.CUSTOMER_ID: ""}, sc.CUSTOMER_ID, "missing or blank"),
    Invalid("missing-agent", STT, {sc.AGENT_ID: DROP}, sc.AGENT_ID, "missing or blank"),
    Invalid("blank-agent", STS, {sc.AGENT_ID: "   "}, sc.AGENT_ID, "missing or blank"),
    Invalid(
        "customer-not-a-string", STT, {sc.CUSTOMER_ID: 8812}, sc.CUSTOMER_ID, "must be a string"
    ),
    Invalid("missing-provider", STT, {sc.PROVIDER: DROP}, sc.PROVIDER, "missing or blank"),
    Invalid("blank-model", TTS, {sc.MODEL: "  "}, sc.MODEL, "missing or blank"),
    # kinds and shapes
    Invalid("unknown-kind", STT, {sc.USAGE_KIND: "asr"}, sc.USAGE_KIND, "unknown usage kind"),
    Invalid("empty-kind", STT, {sc.USAGE_KIND: ""}, sc.USAGE_KIND, "unknown usage kind"),
    Invalid("kind-not-a-string", STT, {sc.USAGE_KIND: 1}, sc.USAGE_KIND, "must be a string"),
    Invalid(
        "conflicting-stt-units",
        STT,
        {sc.STT_AUDIO_SECONDS: 27.0},
        sc.STT_AUDIO_SECONDS,
        "conflicting units",
    ),
    Invalid(
        "conflicting-sts-units",
        STS,
        {sc.STS_INPUT_AUDIO_MINUTES: 1.0, sc.STS_INPUT_AUDIO_SECONDS: 60.0},
        sc.STS_INPUT_AUDIO_SECONDS,
        "conflicting units",
    ),
    Invalid(
        "quantity-of-another-kind",
        STT,
        {sc.TTS_CHARACTERS: 10},
        sc.TTS_CHARACTERS,
        "not allowed on a stt record",
    ),
    Invalid(
        "sts-without-quantities",
        STS,
        {sc.STS_INPUT_TEXT_TOKENS: DROP},
        sc.USAGE_KIND,
        "needs a quantity",
    ),
    Invalid(
        "stt-without-quantity", STT, {sc.STT_AUDIO_MINUTES: DROP}, sc.USAGE_KIND, "needs a quantity"
    ),
    Invalid(
        "cached-split-and-undivided",
        STS,
        {sc.STS_CACHED_TEXT_TOKENS: 10, sc.STS_CACHED_TOKENS: 50},
        sc.STS_CACHED_TOKENS,
        "never sent together",
    ),
]


def run(
    attributes: dict[str, Any], name: str = "voice-turn", **kwargs: Any
) -> tuple[list[UsageRecord], list[Rejection]]:
    return records_from_span(
        trace_id=TRACE_ID,
        span_id=SPAN_ID,
        name=name,
        attributes=attributes,
        events=kwargs.pop("events", ()),
        resource=kwargs.pop("resource", {}),
        defaults=kwargs.pop("defaults", IdentityDefaults(trace_tags=False)),
    )


def only_payload(
    attributes: dict[str, Any], **kwargs: Any
) -> tuple[dict[str, Any], tuple[str, ...]]:
    records, rejections = run(attributes, **kwargs)
    assert rejections == []
    (record,) = records
    return record.payload, record.warnings


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_record_is_refused_naming_span_attribute_and_rule(case: Invalid) -> None:
    records, rejections = run(case.attributes())
    assert records == []
    (rejection,) = rejections
    assert rejection.reason is RejectReason.INVALID
    message = rejection.message
    for part in ("'voice-turn'", TRACE_ID, SPAN_ID, case.attribute, case.rule):
        assert part in message, f"{part!r} missing from {message!r}"


@pytest.mark.parametrize(
    "attributes",
    [
        apply(STT, {sc.STT_AUDIO_MINUTES: 0}),
        apply(STT, {sc.STT_AUDIO_MINUTES: DROP, sc.STT_AUDIO_SECONDS: 0.0}),
        apply(STT, {sc.STT_AUDIO_MINUTES: -0.0}),
        apply(TTS, {sc.TTS_CHARACTERS: 0}),
        apply(STS, {sc.STS_INPUT_TEXT_TOKENS: 0, sc.STS_CONNECTION_MINUTES: 0.0}),
        # A zero record needs no identity: it is skipped before anything else is checked.
        apply(TTS, {sc.TTS_CHARACTERS: 0, sc.CUSTOMER_ID: DROP}),
    ],
    ids=["stt", "stt-seconds", "negative-zero", "tts", "sts-all-zero", "zero-without-customer"],
)
def test_zero_quantities_are_skipped_like_the_sdk(attributes: dict[str, Any]) -> None:
    records, rejections = run(attributes)
    assert records == []
    (rejection,) = rejections
    assert rejection.reason is RejectReason.ZERO
    assert "'voice-turn'" in rejection.message and "zero" in rejection.message


def test_non_ascii_and_padded_ids_are_stripped_and_kept_as_unicode() -> None:
    payload, warnings = only_payload(
        apply(
            STT,
            {
                sc.AGENT_ID: "  agent-élan\t",
                sc.CUSTOMER_ID: "\n客户-Zoë ",
                sc.INDICATOR: " minutes ",
                sc.PROVIDER: " deepgram ",
                sc.MODEL: " nova-2 ",
                sc.PLAN: " growth ",
            },
        )
    )
    assert warnings == ()
    assert payload == {
        "agentId": "agent-élan",
        "customerId": "客户-Zoë",
        "indicator": "minutes",
        "rawUsage": {
            "provider": "deepgram",
            "model": "nova-2",
            "plan": "growth",
            "audioDuration": 0.45,
        },
    }


def test_whole_float_counts_become_ints_and_limits_are_inclusive() -> None:
    payload, _ = only_payload(apply(TTS, {sc.TTS_CHARACTERS: 1200.0}))
    assert type(payload["rawUsage"]["characterCount"]) is int
    payload, _ = only_payload(apply(TTS, {sc.TTS_CHARACTERS: MAX_COUNT}))
    assert payload["rawUsage"]["characterCount"] == MAX_COUNT
    payload, _ = only_payload(apply(STT, {sc.STT_AUDIO_MINUTES: MAX_MINUTES}))
    assert payload["rawUsage"]["audioDuration"] == MAX_MINUTES


def test_kind_is_case_and_space_insensitive() -> None:
    payload, _ = only_payload(apply(STT, {sc.USAGE_KIND: " STT "}))
    assert payload["rawUsage"]["audioDuration"] == 0.45


TWENTY_ONE = {f"{sc.META_PREFIX}t{i}": str(i) for i in range(21)}


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        (TWENTY_ONE, "21 meta tags exceed the limit of 20"),
        (
            {f"{sc.META_PREFIX}bad key": "x", f"{sc.META_PREFIX}ok": "y"},
            f"{sc.META_PREFIX}bad key: key must be",
        ),
        ({f"{sc.META_PREFIX}{'k' * 65}": "x"}, "key must be 1-64 characters"),
        (
            {f"{sc.META_PREFIX}note": "v" * 257, f"{sc.META_PREFIX}ok": "y"},
            f"{sc.META_PREFIX}note: value longer than 256",
        ),
        (
            {f"{sc.META_PREFIX}ids": ("a", "b")},
            f"{sc.META_PREFIX}ids: value must be a single value",
        ),
        ({sc.META_PREFIX: "no key"}, "key must be"),
    ],
    ids=["over-20", "bad-key", "long-key", "long-value", "list-value", "empty-key"],
)
def test_invalid_meta_tags_are_dropped_whole_and_the_usage_still_sent(
    tags: dict[str, Any], problem: str
) -> None:
    payload, warnings = only_payload({**STT, **tags})
    assert "metaTags" not in payload
    assert payload["rawUsage"]["audioDuration"] == 0.45
    (warning,) = warnings
    assert "'voice-turn'" in warning and "metaTags dropped" in warning and problem in warning


def test_meta_tags_from_every_layer_count_toward_the_limit_together() -> None:
    span_tags = {f"{sc.META_PREFIX}s{i}": "x" for i in range(10)}
    resource_tags = {f"{sc.META_PREFIX}r{i}": "x" for i in range(11)}
    payload, warnings = only_payload({**STT, **span_tags}, resource=resource_tags)
    assert "metaTags" not in payload
    assert "21 meta tags" in warnings[0]


def test_a_bad_record_does_not_spoil_the_other_records_of_its_span() -> None:
    events = [
        (sc.USAGE_EVENT_NAME, {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: "12"}),
        (sc.USAGE_EVENT_NAME, {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 12}),
    ]
    records, rejections = run(STT, events=events)
    assert [r.payload["rawUsage"].get("characterCount") for r in records] == [None, 12]
    (rejection,) = rejections
    assert "event #1" in rejection.message and sc.TTS_CHARACTERS in rejection.message


def test_every_bad_value_end_to_end(
    sandbox: SandboxServer, tracing: Callable[..., Tracing], caplog: pytest.LogCaptureFixture
) -> None:
    """One batch holding every invalid case, the zeros and one good record, through a real
    provider: only the good record reaches Paygent; each bad one is counted, logged with
    its span, attribute and rule, and kept as a dead letter."""
    pipeline = tracing()
    for case in INVALID:
        with pipeline.tracer.start_as_current_span(case.id) as span:
            span.set_attributes(case.attributes())
    with pipeline.tracer.start_as_current_span("zero") as span:
        span.set_attributes(apply(STT, {sc.STT_AUDIO_MINUTES: 0.0}))
    with pipeline.tracer.start_as_current_span("good") as span:
        span.set_attributes(STT)
    pipeline.flush()

    rows = sandbox.ledger.rows()
    assert [row["customer_id"] for row in rows] == ["cust_8812"]
    assert rows[0]["audio_minutes"] == 0.45
    assert len(sandbox.ledger.request_log()) == 1
    stats = pipeline.exporter.stats
    assert stats["invalid"] == len(INVALID)
    assert stats["skipped_zero"] == 1
    assert stats["delivered"] == 1

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for case in INVALID:
        assert any(
            f"'{case.id}'" in w and case.attribute in w and case.rule in w for w in warnings
        ), f"no warning for {case.id}"
    dead = pipeline.exporter.pipeline.spool.dead_letters(limit=1000, status="invalid")
    assert sorted(d.origin.split("'")[1] for d in dead) == sorted(c.id for c in INVALID)
