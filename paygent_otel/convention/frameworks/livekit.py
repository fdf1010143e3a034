"""LiveKit Agents (``livekit-agents``): realtime spans, ``tts_request`` and the STT counter.

Tested against livekit-agents 1.8.9 (the realtime span was ``agent_turn`` in 1.7).

- ``realtime_inference`` (1.8), ``agent_turn`` (1.7) and ``realtime_metrics`` (metrics that
  arrive after their span ended): ``gen_ai.usage.*`` per modality and cached -> one STS
  record through the GenAI mapping. The Langfuse-style duplicates LiveKit writes next to
  them (``gen_ai.usage.input_audio_tokens``, ``input_cached_tokens``, ...) are read only
  when the current name is absent, so nothing is counted twice.
- ``tts_request``: the JSON string ``lk.tts_metrics`` -> ``characters_count`` as
  ``paygent.tts.characters``, priced with its ``metadata.model_provider`` /
  ``metadata.model_name``.
- the counter ``lk.agents.usage.stt_audio_duration`` (seconds; STT usage is on no span)
  -> ``paygent.stt.audio.seconds``, priced with the point's ``model_provider`` /
  ``model_name``.
- every other span (``llm_request``, ``agent_session``, ...) and counter bills nothing: the
  ``lk.agents.usage.tts_*`` and ``llm_*`` counters repeat what the spans carry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.frameworks.rules import FrameworkRule, number, priced
from paygent_otel.convention.genai import genai_record, has_genai_usage

__all__ = ["RULE", "STT_AUDIO_DURATION", "TTS_METRICS"]

TTS_METRICS: Final = "lk.tts_metrics"
STT_AUDIO_DURATION: Final = "lk.agents.usage.stt_audio_duration"
_REALTIME_SPANS: Final = frozenset({"realtime_inference", "agent_turn", "realtime_metrics"})

Attributes = Mapping[str, Any]


def _tts_record(attributes: Attributes) -> dict[str, Any] | None:
    raw = attributes.get(TTS_METRICS)
    if raw is None:
        return None  # the stream closed before any segment was synthesized
    try:
        metrics = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        metrics = None
    if not isinstance(metrics, dict):
        raise ValueError(f"{TTS_METRICS} must be a JSON object, got {str(raw)[:40]!r}")
    characters = number(metrics, "characters_count")
    if characters is None:
        raise ValueError(f"{TTS_METRICS} has no characters_count")
    metadata = metrics.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    record = {sc.USAGE_KIND: sc.UsageKind.TTS.value, sc.TTS_CHARACTERS: characters}
    return priced(record, attributes, metadata.get("model_provider"), metadata.get("model_name"))


def _span_record(name: str, attributes: Attributes) -> dict[str, Any] | None:
    if name in _REALTIME_SPANS:
        return genai_record(attributes) if has_genai_usage(attributes) else None
    if name == "tts_request":
        return _tts_record(attributes)
    return None


RULE: Final = FrameworkRule(
    name="livekit",
    scopes=frozenset({"livekit-agents"}),
    usage_spans=_REALTIME_SPANS | {"tts_request"},
    span_record=_span_record,
    metrics={STT_AUDIO_DURATION: sc.STT_AUDIO_SECONDS},
    metric_identity={"model_provider": sc.PROVIDER, "model_name": sc.MODEL},
    attribute_prefixes=("lk.tts_metrics", "gen_ai."),
    missing_customer=(
        "its LiveKit session never named a customer: pass metadata={'paygent.customer.id': "
        "...} to livekit.agents.telemetry.set_tracer_provider, or start the session inside "
        "a span that carries it (with ConversationIdentityProcessor on the provider)"
    ),
)
