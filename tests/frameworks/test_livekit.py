"""LiveKit Agents' own spans and usage counter, billed into the sandbox ledger.

Real livekit-agents (its TTS ChunkedStream/SynthesizeStream, STT.recognize, the realtime
metrics recorder ``telemetry.utils.record_realtime_metrics``, the usage counters of
``telemetry.otel_metrics``, and ``telemetry.set_tracer_provider(metadata=...)``) with fake
providers written here (LiveKit's fakes are in its repository, not its wheel).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import API_KEY, ledger_bodies
from livekit import rtc
from livekit.agents import APIConnectOptions, stt, telemetry, tts
from livekit.agents.metrics import RealtimeModelMetrics, STTMetrics, TTSMetrics
from livekit.agents.telemetry import otel_metrics
from livekit.agents.telemetry import utils as trace_utils
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.trace import TracerProvider

from paygent_otel import PaygentMetricExporter
from paygent_otel.bridge.otlp import UsageExtractor
from paygent_otel.convention.frameworks import parse_frameworks
from paygent_otel.convention.mapping import IdentityDefaults
from paygent_otel.sandbox import SandboxServer

from .conftest import METRICS, Billing

CUSTOMER = "paygent.customer.id"
SAMPLE_RATE = 16_000


class FakeTTS(tts.TTS):
    """A provider that answers every text with silence (chunked or streamed)."""

    def __init__(self, *, streaming: bool) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=streaming),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
        )

    @property
    def model(self) -> str:
        return "fake-tts-1"

    @property
    def provider(self) -> str:
        return "fakevoice"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = APIConnectOptions()
    ) -> tts.ChunkedStream:
        return FakeChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = APIConnectOptions()) -> Any:
        return FakeSynthesizeStream(tts=self, conn_options=conn_options)


class FakeChunkedStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id="req-chunked", sample_rate=SAMPLE_RATE, num_channels=1, mime_type="audio/pcm"
        )
        output_emitter.push(b"\x00\x00" * 1600)
        output_emitter.flush()


class FakeSynthesizeStream(tts.SynthesizeStream):
    """Streams one segment per flush, as websocket plugins do."""

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id="req-stream",
            sample_rate=SAMPLE_RATE,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        segment = 0
        open_segment = False
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                if open_segment:
                    output_emitter.end_segment()
                    open_segment = False
                continue
            if not open_segment:
                segment += 1
                output_emitter.start_segment(segment_id=f"seg-{segment}")
                open_segment = True
            self._mark_started()
            output_emitter.push(b"\x00\x00" * 160 * len(item))
        if open_segment:
            output_emitter.end_segment()


class FakeSTT(stt.STT):
    def __init__(self) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))

    @property
    def model(self) -> str:
        return "fake-stt-1"

    @property
    def provider(self) -> str:
        return "fakeears"

    async def _recognize_impl(self, buffer: Any, *, language: Any, conn_options: Any) -> Any:
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id="stt-1",
            alternatives=[stt.SpeechData(language="en", text="hello")],
        )


def _realtime_metrics() -> RealtimeModelMetrics:
    details = RealtimeModelMetrics.InputTokenDetails
    return RealtimeModelMetrics(
        request_id="resp-1",
        timestamp=time.time(),
        input_tokens=700,
        output_tokens=300,
        input_token_details=details(
            audio_tokens=550,
            text_tokens=150,
            cached_tokens=200,
            cached_tokens_details=RealtimeModelMetrics.CachedTokenDetails(
                audio_tokens=150, text_tokens=50
            ),
        ),
        output_token_details=RealtimeModelMetrics.OutputTokenDetails(
            text_tokens=60, audio_tokens=240
        ),
    )


def _livekit_provider(billing: Billing, metadata: dict[str, Any] | None) -> TracerProvider:
    provider = TracerProvider()
    for processor in billing.processors:
        provider.add_span_processor(processor)
    telemetry.set_tracer_provider(provider, metadata=metadata)
    return provider


async def _speak(collected: list[TTSMetrics]) -> None:
    chunked = FakeTTS(streaming=False)
    chunked.on("metrics_collected", collected.append)
    async with chunked.synthesize("Hello world.") as stream:
        async for _ in stream:
            pass
    streamed = FakeTTS(streaming=True)
    streamed.on("metrics_collected", collected.append)
    async with streamed.stream() as stream:
        stream.push_text("First segment. ")
        stream.flush()
        stream.push_text("Second one.")  # a second segment on one stream
        stream.end_input()
        async for _ in stream:
            pass


def _realtime_turns() -> None:
    tracer = telemetry.tracer
    span = tracer.start_span("realtime_inference")
    trace_utils.record_realtime_metrics(span, _realtime_metrics())
    span.end()
    late = tracer.start_span("realtime_inference")
    late.end()  # metrics after the span ended: LiveKit opens a realtime_metrics child
    trace_utils.record_realtime_metrics(late, _realtime_metrics())
    legacy = tracer.start_span("agent_turn")  # LiveKit 1.7's name for the same span
    trace_utils.record_realtime_metrics(legacy, _realtime_metrics())
    legacy.end()
    cascaded = tracer.start_span("llm_request")  # as llm.LLM records a chat completion
    cascaded.set_attributes(
        {
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4.1",
            "gen_ai.usage.input_tokens": 900,
            "gen_ai.usage.output_tokens": 40,
        }
    )
    cascaded.end()


EXPECTED_STS = {
    "schemaVersion": 1,
    "input": {"text": {"tokens": 150}, "audio": {"tokens": 550}},
    "output": {"text": {"tokens": 60}, "audio": {"tokens": 240}},
    "cached": {"text": {"tokens": 50}, "audio": {"tokens": 150}},
}


def test_livekit_spans_bill_realtime_and_tts_once_each_for_the_metadata_customer(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="livekit", genai=True)
    provider = _livekit_provider(pipeline, {CUSTOMER: "cust_lk"})
    collected: list[TTSMetrics] = []
    asyncio.run(_speak(collected))
    _realtime_turns()
    provider.force_flush()
    pipeline.flush()

    bodies = ledger_bodies(sandbox, keyed=True)
    assert {b["customerId"] for b in bodies} == {"cust_lk"}
    sts = [b["rawUsage"] for b in bodies if "usageMetadata" in b["rawUsage"]]
    # Three realtime responses (one recorded late, one on 1.7's span name), each once,
    # per modality as LiveKit gave them: the Langfuse-style duplicates add nothing.
    assert [r["usageMetadata"] for r in sts] == [EXPECTED_STS] * 3
    assert len(pipeline.finished("realtime_metrics")) == 1
    tts_billed = sorted(
        b["rawUsage"]["characterCount"] for b in bodies if "characterCount" in b["rawUsage"]
    )
    # What LiveKit's own TTS metrics say was synthesized: the span JSON lost nothing.
    assert tts_billed == sorted(m.characters_count for m in collected) == [12, 15]
    assert {
        (b["rawUsage"]["provider"], b["rawUsage"]["model"])
        for b in bodies
        if "characterCount" in b["rawUsage"]
    } == {("fakevoice", "fake-tts-1")}
    assert len(bodies) == 5  # the llm_request span is cascaded LLM usage: not billed
    assert pipeline.exporter.stats.get("invalid", 0) == 0
    provider.shutdown()


def test_a_livekit_session_without_a_customer_is_refused_with_the_reason(
    billing: Callable[..., Billing], sandbox: SandboxServer
) -> None:
    pipeline = billing(frameworks="livekit")
    provider = _livekit_provider(pipeline, None)
    span = telemetry.tracer.start_span("realtime_inference")
    trace_utils.record_realtime_metrics(span, _realtime_metrics())
    span.end()
    pipeline.flush()

    assert ledger_bodies(sandbox) == []
    (dead,) = pipeline.exporter.pipeline.spool.dead_letters()
    assert "never named a customer" in dead.reason and "set_tracer_provider" in dead.reason
    provider.shutdown()


async def _recognize(audio_seconds: list[float], collected: list[Any]) -> None:
    recognizer = FakeSTT()
    recognizer.on("metrics_collected", collected.append)
    for seconds in audio_seconds:
        samples = int(SAMPLE_RATE * seconds)
        frame = rtc.AudioFrame(b"\x00\x00" * samples, SAMPLE_RATE, 1, samples)
        await recognizer.recognize([frame])


def test_the_livekit_stt_counter_is_billed_and_its_tts_counter_is_not(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    METRICS.get_metrics_data()  # start from an empty interval
    collected: list[Any] = []
    asyncio.run(_recognize([1.0, 0.5], collected))
    # What AgentActivity does with every metrics event of a session.
    for event in collected:
        otel_metrics.collect_usage(event)
    otel_metrics.collect_usage(
        TTSMetrics(
            label="fake",
            request_id="t",
            timestamp=time.time(),
            ttfb=0.1,
            duration=0.2,
            audio_duration=1.0,
            cancelled=False,
            characters_count=40,
            streamed=False,
        )
    )
    exporter = PaygentMetricExporter(
        endpoint=sandbox.url,
        api_key=API_KEY,
        agent_id="voice-bot",
        customer_id="cust_lk",
        spool_path=tmp_path / "metrics.sqlite3",
        frameworks="livekit:voice-minutes",
    )
    try:
        data = METRICS.get_metrics_data()
        assert data is not None
        exporter.export(data)
        assert exporter.force_flush(10_000), exporter.stats
    finally:
        exporter.shutdown()

    assert all(isinstance(e, STTMetrics) for e in collected)
    (body,) = ledger_bodies(sandbox, keyed=True)
    assert body["customerId"] == "cust_lk"
    assert body["indicator"] == "voice-minutes"
    assert body["rawUsage"]["provider"] == "fakeears"
    assert body["rawUsage"]["model"] == "fake-stt-1"
    seconds = sum(e.audio_duration for e in collected)
    assert seconds == 1.5
    assert body["rawUsage"]["audioDuration"] * 60 == seconds

    # The same counter through a Collector to the bridge bills the same document.
    extractor = UsageExtractor(
        IdentityDefaults(agent_id="voice-bot", customer_id="cust_lk"),
        frameworks=parse_frameworks("livekit:voice-minutes"),
    )
    extraction = extractor.metrics(encode_metrics(data), None)
    assert [r.payload for r in extraction.records] == [body]
