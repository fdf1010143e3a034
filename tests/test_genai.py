"""GenAI semantic conventions: spans of existing instrumentations billed as STS records.

The arithmetic is checked through the real mapping (``records_from_span`` -> the JSON body);
parity cases compare with ``paygent-sdk``'s own OpenAI Realtime mapping; the end-to-end
test runs a real TracerProvider, the baggage processor and the exporter against the sandbox.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import Tracing, wait_for
from opentelemetry import baggage, context
from paygent_sdk.openai_realtime_sts import speech_to_speech_metadata_from_openai_realtime_usage

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.genai import genai_record, has_genai_usage
from paygent_otel.convention.mapping import IdentityDefaults, RejectReason
from paygent_otel.exporters.spans import has_usage, records_from_span
from paygent_otel.recording.baggage import PaygentBaggageSpanProcessor
from paygent_otel.sandbox import SandboxServer

AGENT = "agent-realtime"
CUSTOMER = "cust_8812"
U = "gen_ai.usage."
CLIENT = {
    "gen_ai.operation.name": "realtime",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o-realtime-preview",
}
"""What an instrumented realtime client puts on its span besides the counts."""


def map_span(
    attributes: dict[str, Any],
    *,
    resource: dict[str, Any] | None = None,
    events: tuple[tuple[str, dict[str, Any]], ...] = (),
    defaults: IdentityDefaults | None = None,
    genai: bool = True,
) -> tuple[list[Any], list[Any]]:
    return records_from_span(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
        name="realtime.response",
        attributes=attributes,
        events=events,
        resource=resource or {},
        defaults=defaults or IdentityDefaults(agent_id=AGENT, trace_tags=False),
        genai=genai,
    )


def metadata(counts: dict[str, Any]) -> dict[str, Any]:
    """The usageMetadata the span with ``counts`` is billed with (exactly one record)."""
    records, rejections = map_span({**CLIENT, sc.CUSTOMER_ID: CUSTOMER, **counts})
    assert rejections == []
    assert len(records) == 1
    raw = records[0].payload["rawUsage"]
    assert (raw["provider"], raw["model"]) == ("openai", "gpt-4o-realtime-preview")
    return raw["usageMetadata"]  # type: ignore[no-any-return]


def tokens(**sides: dict[str, int]) -> dict[str, Any]:
    """Expected usageMetadata: tokens(input={"text": 1}, cached={"tokens": 2})."""
    body: dict[str, Any] = {"schemaVersion": 1}
    for side, values in sides.items():
        body[side] = {k: v if k == "tokens" else {"tokens": v} for k, v in values.items()}
    return body


# ----------------------------------------------------------------- the arithmetic


def gen_ai(counts: str) -> dict[str, int]:
    """``gen_ai("input_tokens=120 audio.input_tokens=90")``: ``gen_ai.usage.*`` counts."""
    return {U + name: int(value) for name, value in (item.split("=") for item in counts.split())}


ARITHMETIC = [
    pytest.param(
        gen_ai("input_tokens=120 output_tokens=60"),
        tokens(input={"text": 120}, output={"text": 60}),
        id="text-only-totals-are-billed-as-text",
    ),
    pytest.param(
        gen_ai("input_tokens=120 text.input_tokens=120 output_tokens=60 text.output_tokens=60"),
        tokens(input={"text": 120}, output={"text": 60}),
        id="text-only-with-its-modality-counts-is-not-added-to-the-totals",
    ),
    pytest.param(
        gen_ai(
            "input_tokens=900 audio.input_tokens=900 output_tokens=1500 audio.output_tokens=1500"
        ),
        tokens(input={"audio": 900}, output={"audio": 1500}),
        id="audio-only",
    ),
    # Pipecat and others give only the audio subset: the text part must still be billed.
    pytest.param(
        gen_ai(
            "input_tokens=1000 audio.input_tokens=700 output_tokens=500 audio.output_tokens=400"
        ),
        tokens(input={"text": 300, "audio": 700}, output={"text": 100, "audio": 400}),
        id="what-no-modality-claims-of-a-total-is-text",
    ),
    pytest.param(
        gen_ai(
            "input_tokens=1020 text.input_tokens=120 audio.input_tokens=900 output_tokens=1560 "
            "text.output_tokens=60 audio.output_tokens=1500"
        ),
        tokens(input={"text": 120, "audio": 900}, output={"text": 60, "audio": 1500}),
        id="mixed-modalities-are-sent-as-given-and-totals-only-check-them",
    ),
    # As the SDK maps OpenAI Realtime usage: inputs as given, the cache split per modality,
    # the cached total never sent beside its parts.
    pytest.param(
        gen_ai(
            "input_tokens=1020 text.input_tokens=120 audio.input_tokens=900 "
            "cache_read.input_tokens=140 text.cache_read.input_tokens=40 "
            "audio.cache_read.input_tokens=100 output_tokens=60 text.output_tokens=60"
        ),
        tokens(
            input={"text": 120, "audio": 900},
            output={"text": 60},
            cached={"text": 40, "audio": 100},
        ),
        id="cached-split-per-modality",
    ),
    pytest.param(
        gen_ai("input_tokens=1000 cache_read.input_tokens=200 output_tokens=300"),
        tokens(input={"text": 800}, output={"text": 300}, cached={"tokens": 200}),
        id="cached-undivided-without-a-modality-split-bills-the-uncached-input-as-text",
    ),
    pytest.param(
        gen_ai(
            "input_tokens=1000 text.input_tokens=300 audio.input_tokens=700 "
            "cache_read.input_tokens=200"
        ),
        tokens(input={"text": 300, "audio": 700}, cached={"tokens": 200}),
        id="cached-undivided-with-a-modality-split",
    ),
    pytest.param(
        gen_ai("prompt_tokens=100 completion_tokens=50"),
        tokens(input={"text": 100}, output={"text": 50}),
        id="older-total-spellings",
    ),
    pytest.param(
        gen_ai(
            "input_tokens=1020 input_text_tokens=120 input_audio_tokens=900 "
            "input_cached_tokens=140 output_tokens=1560 output_text_tokens=60 "
            "output_audio_tokens=1500"
        ),
        tokens(
            input={"text": 120, "audio": 900},
            output={"text": 60, "audio": 1500},
            cached={"tokens": 140},
        ),
        id="older-per-modality-spellings-livekit-realtime",
    ),
    # Newer instrumentations emit both spellings of the same count: never add them up,
    # and when they disagree the current name is the one read.
    pytest.param(
        gen_ai(
            "input_tokens=900 prompt_tokens=900 audio.input_tokens=900 input_audio_tokens=7 "
            "cache_read.input_tokens=100 cache_read_input_tokens=100 input_cached_tokens=100"
        ),
        tokens(input={"audio": 900}, cached={"tokens": 100}),
        id="older-spellings-are-ignored-when-the-current-names-are-present",
    ),
]
"""Counts on a span, and the usageMetadata they are billed with (current and older names)."""


@pytest.mark.parametrize(("counts", "expected"), ARITHMETIC)
def test_counts_are_billed_as_the_sdk_would(
    counts: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert metadata(counts) == expected


def test_a_span_with_a_convention_record_is_billed_from_the_convention_only() -> None:
    attributes = {
        **CLIENT,
        U + "input_tokens": 1000,
        U + "audio.input_tokens": 1000,
        U + "output_tokens": 500,
        sc.USAGE_KIND: "sts",
        sc.CUSTOMER_ID: CUSTOMER,
        sc.PROVIDER: "openai",
        sc.MODEL: "gpt-realtime",
        sc.STS_INPUT_AUDIO_TOKENS: 1000,
        sc.STS_OUTPUT_AUDIO_TOKENS: 500,
    }
    records, rejections = map_span(attributes)
    assert rejections == []
    assert [r.payload["rawUsage"]["usageMetadata"] for r in records] == [
        tokens(input={"audio": 1000}, output={"audio": 500})
    ]
    assert records[0].payload["rawUsage"]["model"] == "gpt-realtime"


def test_a_span_with_a_convention_event_is_not_billed_from_its_gen_ai_counts() -> None:
    event = {sc.USAGE_KIND: "sts", sc.STS_INPUT_AUDIO_TOKENS: 1000, sc.PROVIDER: "openai"}
    attributes = {**CLIENT, sc.CUSTOMER_ID: CUSTOMER, sc.MODEL: "gpt-realtime"}
    attributes |= {U + "input_tokens": 1000, U + "audio.input_tokens": 1000}
    records, rejections = map_span(attributes, events=((sc.USAGE_EVENT_NAME, event),))
    assert rejections == []
    assert [r.payload["rawUsage"]["usageMetadata"] for r in records] == [
        tokens(input={"audio": 1000})
    ]


def test_convention_provider_and_model_on_the_span_win_over_gen_ai() -> None:
    attributes = {**CLIENT, sc.CUSTOMER_ID: CUSTOMER, sc.PROVIDER: "azure", sc.MODEL: "rt-eu"}
    records, _ = map_span({**attributes, U + "input_tokens": 10})
    assert [
        (r.payload["rawUsage"]["provider"], r.payload["rawUsage"]["model"]) for r in records
    ] == [("azure", "rt-eu")]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"gen_ai.provider.name": "openai", "gen_ai.system": "old"}, "openai"),
        ({"gen_ai.system": "openai"}, "openai"),
    ],
)
def test_provider_falls_back_to_gen_ai_system(names: dict[str, str], expected: str) -> None:
    record = genai_record({**names, U + "input_tokens": 5})
    assert record is not None and record[sc.PROVIDER] == expected


def test_model_prefers_the_response_model() -> None:
    both = {"gen_ai.request.model": "gpt-realtime", "gen_ai.response.model": "gpt-realtime-2025"}
    record = genai_record({**both, U + "input_tokens": 5})
    assert record is not None and record[sc.MODEL] == "gpt-realtime-2025"


# ----------------------------------------------------------------- parity with paygent-sdk


def as_genai_attributes(usage: dict[str, Any]) -> dict[str, Any]:
    """What a GenAI instrumentation puts on the span for one OpenAI Realtime ``usage``."""
    attributes = {
        U + "input_tokens": usage["input_tokens"],
        U + "output_tokens": usage["output_tokens"],
    }
    details = usage.get("input_token_details", {})
    if "cached_tokens" in details:
        attributes[U + "cache_read.input_tokens"] = details["cached_tokens"]
    for modality in ("text", "audio", "image"):
        key = f"{modality}_tokens"
        if key in details:
            attributes[f"{U}{modality}.input_tokens"] = details[key]
        if key in usage.get("output_token_details", {}):
            attributes[f"{U}{modality}.output_tokens"] = usage["output_token_details"][key]
        if key in details.get("cached_tokens_details", {}):
            attributes[f"{U}{modality}.cache_read.input_tokens"] = details["cached_tokens_details"][
                key
            ]
    return attributes


PARITY = {
    "text-only": {
        "input_tokens": 120,
        "output_tokens": 60,
        "input_token_details": {"text_tokens": 120, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 60, "audio_tokens": 0},
    },
    "audio-only": {
        "input_tokens": 900,
        "output_tokens": 1500,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 900, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 0, "audio_tokens": 1500},
    },
    "mixed-cached-split": {
        "input_tokens": 1020,
        "output_tokens": 1560,
        "input_token_details": {
            "text_tokens": 120,
            "audio_tokens": 900,
            "cached_tokens": 140,
            "cached_tokens_details": {"text_tokens": 40, "audio_tokens": 100},
        },
        "output_token_details": {"text_tokens": 60, "audio_tokens": 1500},
    },
    "mixed-cached-undivided": {
        "input_tokens": 1020,
        "output_tokens": 1560,
        "input_token_details": {"text_tokens": 120, "audio_tokens": 900, "cached_tokens": 64},
        "output_token_details": {"text_tokens": 60, "audio_tokens": 1500},
    },
    "no-modality-split": {
        "input_tokens": 1000,
        "output_tokens": 300,
        "input_token_details": {"cached_tokens": 200},
        "output_token_details": {"text_tokens": 300},
    },
}


@pytest.mark.parametrize("case", PARITY)
def test_same_usage_metadata_as_the_sdk_openai_realtime_mapping(case: str) -> None:
    usage = PARITY[case]
    sdk = speech_to_speech_metadata_from_openai_realtime_usage(usage)
    assert sdk is not None
    assert metadata(as_genai_attributes(usage)) == sdk.to_api_dict()


def test_an_output_total_alone_is_billed_as_text_where_the_sdk_drops_it() -> None:
    usage = {"input_tokens": 100, "output_tokens": 40}
    sdk = speech_to_speech_metadata_from_openai_realtime_usage(usage)
    assert sdk is not None and "output" not in sdk.to_api_dict()
    assert metadata(as_genai_attributes(usage))["output"] == {"text": {"tokens": 40}}


# ----------------------------------------------------------------- invalid and ignored spans


@pytest.mark.parametrize(
    ("counts", "named"),
    [
        (
            {U + "input_tokens": 1000, U + "audio.input_tokens": 1200},
            ["gen_ai.usage.audio.input_tokens (1200)", "gen_ai.usage.input_tokens (1000)"],
        ),
        (
            {U + "input_tokens": 1000, U + "text.input_tokens": 600, U + "audio.input_tokens": 600},
            ["gen_ai.usage.text.input_tokens (600)", "= 1200 exceeds"],
        ),
        (
            {U + "output_tokens": 10, U + "output_audio_tokens": 11},
            ["gen_ai.usage.output_audio_tokens (11)", "gen_ai.usage.output_tokens (10)"],
        ),
        (
            {U + "input_tokens": 1000, U + "cache_read.input_tokens": 1001},
            ["gen_ai.usage.cache_read.input_tokens (1001)"],
        ),
        (
            {U + "audio.input_tokens": 200, U + "audio.cache_read.input_tokens": 300},
            ["gen_ai.usage.audio.cache_read.input_tokens (300)"],
        ),
        (
            {
                U + "cache_read.input_tokens": 100,
                U + "text.cache_read.input_tokens": 50,
                U + "audio.cache_read.input_tokens": 60,
            },
            ["= 110 exceeds its total gen_ai.usage.cache_read.input_tokens (100)"],
        ),
        (
            {U + "image.output_tokens": 10},
            ["gen_ai.usage.image.output_tokens (10)", "no output image"],
        ),
        ({U + "input_tokens": -5}, ["gen_ai.usage.input_tokens must not be negative"]),
        ({U + "input_tokens": "12"}, ["gen_ai.usage.input_tokens must be a whole number"]),
        ({U + "output_tokens": 1.5}, ["gen_ai.usage.output_tokens must be a whole number"]),
    ],
)
def test_inconsistent_counts_are_rejected_with_the_attributes_named(
    counts: dict[str, Any], named: list[str]
) -> None:
    records, rejections = map_span({**CLIENT, sc.CUSTOMER_ID: CUSTOMER, **counts})
    assert records == []
    assert [r.reason for r in rejections] == [RejectReason.INVALID]
    message = rejections[0].message
    assert "(gen_ai.* mapping)" in message and "00f067aa0ba902b7" in message
    for text in named:
        assert text in message


def test_no_customer_anywhere_means_no_record_and_no_rejection() -> None:
    assert map_span({**CLIENT, U + "input_tokens": 10}) == ([], [])


@pytest.mark.parametrize(
    ("resource", "defaults"),
    [
        ({sc.CUSTOMER_ID: "cust_resource"}, None),
        ({}, IdentityDefaults(agent_id=AGENT, customer_id="cust_resource", trace_tags=False)),
    ],
)
def test_customer_from_the_resource_or_the_exporter_default(
    resource: dict[str, Any], defaults: IdentityDefaults | None
) -> None:
    records, _ = map_span({**CLIENT, U + "input_tokens": 10}, resource=resource, defaults=defaults)
    assert [r.payload["customerId"] for r in records] == ["cust_resource"]


def test_mapping_is_off_unless_asked_for() -> None:
    attributes = {**CLIENT, sc.CUSTOMER_ID: CUSTOMER, U + "input_tokens": 10}
    assert map_span(attributes, genai=False) == ([], [])
    assert not has_usage(attributes, (), genai=False)
    assert has_usage(attributes, (), genai=True)


def test_has_genai_usage_needs_a_count() -> None:
    assert has_genai_usage({U + "prompt_tokens": 1})
    assert not has_genai_usage(CLIENT)
    assert genai_record(CLIENT) is None


# ----------------------------------------------------------------- end to end


def test_instrumented_realtime_client_is_billed_with_no_new_attributes(
    tracing: Any, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline: Tracing = tracing(resource={sc.AGENT_ID: AGENT}, genai=True, trace_tags=False)
    pipeline.provider.add_span_processor(PaygentBaggageSpanProcessor())
    tracer = pipeline.tracer
    realtime_turn = {
        **CLIENT,
        "gen_ai.response.model": "gpt-4o-realtime-preview-2024-12-17",
        U + "input_tokens": 1020,
        U + "text.input_tokens": 120,
        U + "audio.input_tokens": 900,
        U + "cache_read.input_tokens": 140,
        U + "text.cache_read.input_tokens": 40,
        U + "audio.cache_read.input_tokens": 100,
        U + "output_tokens": 1560,
        U + "text.output_tokens": 60,
        U + "audio.output_tokens": 1500,
    }
    token = context.attach(baggage.set_baggage(sc.CUSTOMER_ID, CUSTOMER))
    try:
        with tracer.start_as_current_span("request"):
            tracer.start_span("realtime response.done", attributes=realtime_turn).end()
            tracer.start_span(
                "inconsistent",
                attributes={**CLIENT, U + "input_tokens": 5, U + "audio.input_tokens": 9},
            ).end()
            # The convention on the same span wins; nothing is billed twice.
            tracer.start_span(
                "both",
                attributes={
                    **realtime_turn,
                    sc.USAGE_KIND: "sts",
                    sc.PROVIDER: "openai",
                    sc.MODEL: "gpt-4o-realtime-preview",
                    sc.STS_CONNECTION_SECONDS: 90.0,
                },
            ).end()
    finally:
        context.detach(token)
    # No baggage, no customer: an internal LLM call is not billed to anyone.
    tracer.start_span("internal", attributes={**CLIENT, U + "input_tokens": 77}).end()
    with caplog.at_level(logging.WARNING, logger="paygent_otel"):
        pipeline.flush()

    rows = wait_for(lambda: sandbox.ledger.count() == 2 and sandbox.ledger.rows())
    by_model = {(row["model"], row["customer_id"], row["agent_id"]): row for row in rows}
    realtime = by_model[("gpt-4o-realtime-preview-2024-12-17", CUSTOMER, AGENT)]
    assert realtime["usage_metadata"] == tokens(
        input={"text": 120, "audio": 900},
        output={"text": 60, "audio": 1500},
        cached={"text": 40, "audio": 100},
    )
    convention = by_model[("gpt-4o-realtime-preview", CUSTOMER, AGENT)]
    assert convention["usage_metadata"] == {"schemaVersion": 1, "connection": {"minutes": 1.5}}
    stats = pipeline.exporter.stats
    assert stats["delivered"] == 2 and stats["invalid"] == 1
    assert any(
        "'inconsistent'" in m and "gen_ai.usage.audio.input_tokens (9)" in m
        for m in caplog.messages
    )
    dead = pipeline.exporter.pipeline.spool.dead_letters()
    assert len(dead) == 1 and "gen_ai.usage.input_tokens (5)" in dead[0].reason
