"""Offline Pipecat services and a conversation runner (Pipecat's real pipeline and tracing).

The stubs subclass Pipecat's own ``TTSService``/``STTService`` and use its own
``traced_tts``/``traced_stt`` decorators, so spans and usage metrics are made by Pipecat's
code; only the provider call is replaced (silence out, a transcript for audio chunks that
start with ``b"T"``). ``run_conversation`` runs a real ``PipelineWorker`` with tracing on and
returns Pipecat's own usage metrics (``STTUsageMetricsData``/``TTSUsageMetricsData``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import STTUsageMetricsData, TTSUsageMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.services.settings import STTSettings, TTSSettings
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt, traced_tts
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16_000
"""16-bit mono: 32,000 bytes are one second of audio."""


class StubTTS(TTSService):
    """Pipecat's TTS base with silence for audio: ``run_tts`` as a provider would be traced."""

    def __init__(self) -> None:
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=SAMPLE_RATE,
            settings=TTSSettings(model="stub-tts-1", voice="alice", language=None),
        )

    def can_generate_metrics(self) -> bool:
        return True

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> Any:
        await self.start_tts_usage_metrics(text)
        yield TTSAudioRawFrame(b"\x00\x00" * 1600, SAMPLE_RATE, 1, context_id=context_id)


class StubSTT(STTService):
    """Pipecat's STT base (which measures the audio it sends); a chunk starting with ``T``
    ends an utterance: usage is emitted and a final transcript pushed, as providers do."""

    def __init__(self) -> None:
        super().__init__(
            sample_rate=SAMPLE_RATE, settings=STTSettings(model="stub-stt-1", language=None)
        )

    def can_generate_metrics(self) -> bool:
        return True

    @traced_stt
    async def run_stt(self, audio: bytes) -> Any:
        if audio[:1] == b"T":
            await self.emit_stt_usage_metrics()
            yield TranscriptionFrame("hello", "user-1", time_now_iso8601(), finalized=True)


class UsageSink(FrameProcessor):
    """Keeps Pipecat's own usage metrics (the truth the spans are measured against)."""

    def __init__(self) -> None:
        super().__init__()
        self.stt_seconds: list[float] = []
        self.tts_characters: list[int] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, MetricsFrame):
            for data in frame.data:
                if isinstance(data, STTUsageMetricsData):
                    self.stt_seconds.append(data.value.audio_seconds)
                elif isinstance(data, TTSUsageMetricsData):
                    self.tts_characters.append(data.value)
        await self.push_frame(frame, direction)


@dataclass
class Conversation:
    conversation_id: str
    attributes: dict[str, Any]
    audio: Sequence[bytes] = ()
    """Audio chunks for the STT service, in order."""
    speech: Sequence[str] = ()
    """Texts for the TTS service."""
    during: Callable[[PipelineWorker], Awaitable[None]] | None = None
    """Run while the pipeline is up (after the audio and speech were queued)."""
    sink: UsageSink = field(default_factory=UsageSink)


async def _run(conversation: Conversation) -> None:
    worker = PipelineWorker(
        Pipeline([StubSTT(), StubTTS(), conversation.sink]),
        enable_tracing=True,
        conversation_id=conversation.conversation_id,
        additional_span_attributes=conversation.attributes,
        cancel_on_idle_timeout=False,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    async def push() -> None:
        try:
            await asyncio.wait_for(started.wait(), 10)
            for chunk in conversation.audio:
                await worker.queue_frame(InputAudioRawFrame(chunk, SAMPLE_RATE, 1))
            for text in conversation.speech:
                await worker.queue_frame(TTSSpeakFrame(text))
            await asyncio.sleep(0.3)
            if conversation.during is not None:
                await conversation.during(worker)
        finally:
            await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), push()), 30)


def run_conversations(*conversations: Conversation) -> None:
    """Run the conversations at the same time, each in its own pipeline, to the end."""

    async def main() -> None:
        await asyncio.gather(*(_run(c) for c in conversations))

    asyncio.run(main())


RESPONSE_DONE = {
    "type": "response.done",
    "event_id": "event_1",
    "response": {
        "id": "resp_1",
        "object": "realtime.response",
        "status": "completed",
        "output": [],
        "usage": {
            "total_tokens": 1000,
            "input_tokens": 700,
            "output_tokens": 300,
            "input_token_details": {
                "cached_tokens": 200,
                "text_tokens": 150,
                "audio_tokens": 550,
                "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 150},
            },
            "output_token_details": {"text_tokens": 60, "audio_tokens": 240},
        },
    },
}
"""A canned OpenAI Realtime ``response.done`` (Pipecat's span keeps only totals and audio)."""

TRANSCRIPTION_DONE = {
    "type": "conversation.item.input_audio_transcription.completed",
    "event_id": "event_2",
    "item_id": "item_1",
    "content_index": 0,
    "transcript": "hi there",
}


async def realtime_turn(worker: PipelineWorker) -> None:
    """Drive Pipecat's OpenAI Realtime service with canned server events, no network.

    The service is not in the pipeline (it would connect): it gets the worker's tracing
    context as ``setup()`` would give it, and its traced handlers run as on a real event.
    """
    service = OpenAIRealtimeLLMService(api_key="test-key")
    service._tracing_enabled = True
    service._tracing_context = worker._tracing_context
    await service._handle_evt_response_done(events.parse_server_event(json.dumps(RESPONSE_DONE)))
    await service.handle_evt_input_audio_transcription_completed(
        events.parse_server_event(json.dumps(TRANSCRIPTION_DONE))
    )
    await service.push_frame(UserStoppedSpeakingFrame())  # closes its stt span
