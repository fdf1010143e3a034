"""Pipecat's own spans, billed through PaygentSpanExporter into the sandbox ledger.

Real pipecat-ai (Pipecat's PipelineWorker, TurnTraceObserver, traced_tts/traced_stt, the
OpenAI Realtime service's traced handlers) with offline stub providers; the ledger must
hold exactly the usage on Pipecat's spans, per customer, nothing twice. Gaps against
Pipecat's own usage metrics are measured here and stated in docs/frameworks.md.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_bodies
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider

from paygent_otel import ConversationIdentityProcessor, record_tts
from paygent_otel.bridge.otlp import UsageExtractor
from paygent_otel.convention.frameworks import parse_frameworks
from paygent_otel.convention.mapping import IdentityDefaults
from paygent_otel.sandbox import SandboxServer

from .conftest import Billing
from .pipecat_stubs import Conversation, realtime_turn, run_conversations

CUSTOMER = "paygent.customer.id"


def _by_customer(bodies: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """What the ledger billed, per (customer, quantity)."""
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for body in bodies:
        raw = body["rawUsage"]
        if "characterCount" in raw:
            totals[body["customerId"], "tts_characters"] += raw["characterCount"]
        if "audioDuration" in raw:
            totals[body["customerId"], "stt_seconds"] += raw["audioDuration"] * 60
    return dict(totals)


def _span_totals(billing: Billing) -> dict[tuple[str, str], float]:
    """What Pipecat put on its tts/stt spans, per (customer of the conversation, quantity)."""
    customers = {
        s.context.trace_id: s.attributes.get(CUSTOMER) for s in billing.finished("conversation")
    }
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for span in billing.finished("tts"):
        customer = customers[span.context.trace_id]
        totals[customer, "tts_characters"] += span.attributes["metrics.character_count"]
    for span in billing.finished("stt"):
        customer = customers[span.context.trace_id]
        totals[customer, "stt_seconds"] += span.attributes["metrics.audio_seconds"]
    return dict(totals)


def test_each_customer_is_billed_exactly_the_usage_on_pipecat_spans(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="pipecat")
    # 0.1 s then a transcript; 0.15 s then a transcript; 0.15 s never transcribed.
    a = Conversation(
        "conv-a",
        {CUSTOMER: "cust_a"},
        audio=[b"T" * 3200, b"a" * 3200, b"T" * 1600, b"c" * 4800],
        speech=["Hello there.", "How are you?"],
    )
    b = Conversation("conv-b", {CUSTOMER: "cust_b"}, audio=[b"T" * 6400], speech=["Bye."])
    run_conversations(a, b)
    pipeline.flush()

    bodies = ledger_bodies(sandbox, keyed=True)
    spans = _span_totals(pipeline)
    assert _by_customer(bodies) == pytest.approx(spans)
    assert spans == pytest.approx(
        {
            ("cust_a", "tts_characters"): 24,
            ("cust_a", "stt_seconds"): 0.25,
            ("cust_b", "tts_characters"): 4,
            ("cust_b", "stt_seconds"): 0.2,
        }
    )
    # One record per usage span, each once (the sandbox keeps one row per key).
    usage_spans = pipeline.finished("tts") + pipeline.finished("stt")
    assert len(bodies) == len(usage_spans) == 6
    assert len(sandbox.ledger.rows()) == 6
    tts = [b for b in bodies if "characterCount" in b["rawUsage"]]
    assert {(b["rawUsage"]["provider"], b["rawUsage"]["model"]) for b in tts} == {
        ("stubtts", "stub-tts-1")
    }
    assert {b["agentId"] for b in bodies} == {"voice-bot"}

    # Pipecat's own usage metrics: TTS matches; STT has audio that no span carries.
    assert sum(a.sink.tts_characters) == spans["cust_a", "tts_characters"]
    assert sum(b.sink.tts_characters) == spans["cust_b", "tts_characters"]
    gap_a = sum(a.sink.stt_seconds) - spans["cust_a", "stt_seconds"]
    gap_b = sum(b.sink.stt_seconds) - spans["cust_b", "stt_seconds"]
    # The gap is exactly the audio sent after the last transcript (flushed at stop).
    assert gap_a == pytest.approx(4800 / 32000)
    assert gap_b == pytest.approx(0.0)


def test_realtime_tokens_split_without_adding_subsets_and_realtime_stt_is_not_stt(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="pipecat:voice-agent")
    run_conversations(Conversation("conv-rt", {CUSTOMER: "cust_rt"}, during=realtime_turn))
    pipeline.flush()

    (response,) = pipeline.finished("llm_response")
    assert "gen_ai.usage.text.input_tokens" not in response.attributes  # Pipecat sends none
    (stt,) = pipeline.finished("stt")
    assert "metrics.audio_seconds" not in stt.attributes
    (body,) = ledger_bodies(sandbox, keyed=True)
    assert body["customerId"] == "cust_rt"
    assert body["indicator"] == "voice-agent"
    assert body["rawUsage"]["provider"] == "openai"
    assert body["rawUsage"]["usageMetadata"] == {
        "schemaVersion": 1,
        "input": {"text": {"tokens": 150}, "audio": {"tokens": 550}},
        "output": {"text": {"tokens": 60}, "audio": {"tokens": 240}},
        "cached": {"text": {"tokens": 50}, "audio": {"tokens": 150}},
    }


def test_a_conversation_that_never_named_a_customer_is_refused_with_the_reason(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="pipecat")
    run_conversations(Conversation("conv-x", {}, audio=[b"T" * 3200], speech=["Hi."]))
    pipeline.flush()

    assert ledger_bodies(sandbox) == []
    assert pipeline.exporter.stats["invalid"] == 2
    reasons = [d.reason for d in pipeline.exporter.pipeline.spool.dead_letters()]
    assert len(reasons) == 2
    assert all("never named a customer" in r and "additional_span_attributes" in r for r in reasons)
    assert all("add paygent_otel.ConversationIdentityProcessor to" in r for r in reasons)


def test_genai_mapping_on_the_same_spans_bills_nothing_twice_and_skips_cascaded_llm(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="pipecat", genai=True)

    async def realtime_and_llm(worker: Any) -> None:
        await realtime_turn(worker)
        # A cascaded LLM call's span as Pipecat names it, with token counts.
        parent = worker._tracing_context.get_conversation_context()
        llm = trace.get_tracer("pipecat").start_span("llm", context=parent)
        llm.set_attributes(
            {
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4.1",
                "gen_ai.usage.input_tokens": 900,
                "gen_ai.usage.output_tokens": 40,
            }
        )
        llm.end()

    run_conversations(Conversation("conv-g", {CUSTOMER: "cust_g"}, during=realtime_and_llm))
    pipeline.flush()

    assert pipeline.finished("llm")[0].attributes[CUSTOMER] == "cust_g"
    (body,) = ledger_bodies(sandbox, keyed=True)
    assert body["rawUsage"]["usageMetadata"]["input"]["text"] == {"tokens": 150}
    assert pipeline.exporter.stats.get("invalid", 0) == 0


def test_a_convention_record_on_a_pipecat_span_wins_over_the_framework_rule(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="pipecat", customer_id="cust_r")
    span = trace.get_tracer("pipecat").start_span("tts")
    span.set_attributes(
        {
            "metrics.character_count": 12,
            "gen_ai.provider.name": "stubtts",
            "gen_ai.request.model": "stub-tts-1",
        }
    )
    assert record_tts(characters=12, service_provider="stubtts", model="stub-tts-1", span=span)
    span.end()
    pipeline.flush()

    (body,) = ledger_bodies(sandbox, keyed=True)
    assert body["rawUsage"]["characterCount"] == 12


def test_identity_state_is_bounded_and_released_when_conversations_end() -> None:
    identity = ConversationIdentityProcessor(max_conversations=2)
    provider = TracerProvider()
    provider.add_span_processor(identity)
    tracer = provider.get_tracer("pipecat")
    conversations = []
    for n in range(3):
        conversation = tracer.start_span("conversation")
        conversation.set_attribute(CUSTOMER, f"cust_{n}")
        conversations.append(conversation)
    assert len(identity) == 2 and identity.forgotten == 1
    stamped = []
    for conversation in conversations:
        child = tracer.start_span("tts", context=trace.set_span_in_context(conversation))
        stamped.append(child.attributes.get(CUSTOMER))
        child.end()
    assert stamped == [None, "cust_1", "cust_2"]  # the oldest was forgotten
    for conversation in conversations:
        conversation.end()
    assert len(identity) == 0


def _otlp_json(billing: Billing) -> dict[str, Any]:
    """The spans as OTLP/JSON, as the Collector's file exporter writes them (hex ids)."""
    document = json.loads(json_format.MessageToJson(encode_spans(billing.finished())))
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return document


def test_the_bridge_route_bills_the_same_records_and_dry_run_prints_them(
    billing: Callable[..., Billing], sandbox: SandboxServer, tmp_path: Path
) -> None:
    pipeline = billing(frameworks="pipecat")
    run_conversations(
        Conversation("conv-a", {CUSTOMER: "cust_a"}, audio=[b"T" * 3200], speech=["Hello."]),
        Conversation("conv-n", {}, speech=["Nobody."]),
    )
    pipeline.flush()
    in_process = {row["idempotency_key"]: json.loads(row["body"]) for row in sandbox.ledger.rows()}
    assert len(in_process) == 2

    # The spans as an OTLP export carries them (the identity processor stamped the
    # customer on each usage span, so the bridge needs no state of its own).
    extractor = UsageExtractor(
        IdentityDefaults(agent_id="voice-bot"), frameworks=parse_frameworks("pipecat")
    )
    extraction = extractor.spans(encode_spans(pipeline.finished()))
    assert {r.idempotency_key: r.payload for r in extraction.records} == in_process
    assert len(extraction.invalid) == 1
    assert "never named a customer" in extraction.invalid[0].message

    path = tmp_path / "traces.json"
    path.write_text(json.dumps(_otlp_json(pipeline)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paygent_otel._cli.dry_run",
            "--frameworks",
            "pipecat",
            "--agent-id",
            "voice-bot",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # one record would be refused
    assert done.stdout.count("BILL   customer=cust_a") == 2
    assert done.stdout.count("REFUSE ") == 1
    assert "2 records would be billed, 1 refused" in done.stdout
    assert "customer cust_a (agent voice-bot): audioDuration=0.00166667, characterCount=6" in (
        done.stdout
    )
    assert len(sandbox.ledger.rows()) == 2  # the dry run sent nothing
