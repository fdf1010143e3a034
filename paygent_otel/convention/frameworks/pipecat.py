"""Pipecat (``pipecat-ai``): ``tts``, ``stt`` and realtime ``llm_response`` spans.

Tested against pipecat-ai 1.14.0; the audio attributes arrived in 1.6 (realtime audio
tokens) and 1.7 (``metrics.audio_seconds``), so STT is billed from 1.7 on.

- ``tts``: ``metrics.character_count`` (characters of the ``run_tts`` calls of one audio
  context) -> ``paygent.tts.characters``.
- ``stt``: ``metrics.audio_seconds`` -> ``paygent.stt.audio.seconds``. A realtime service's
  ``stt`` span has no audio seconds: it bills nothing (its tokens are on ``llm_response``).
- ``llm_response`` (OpenAI/Azure Realtime, Gemini Live): the ``gen_ai.usage.*`` totals and
  their audio subsets -> one STS record. Pipecat sends no text count: text = total - audio
  (- image), cached text = cached - cached audio; a subset is never added to its total.
- every other span (``llm``, ``turn``, ``conversation``, ...) bills nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.frameworks.rules import FrameworkRule, number, priced
from paygent_otel.convention.genai import genai_record, has_genai_usage

__all__ = ["CHARACTER_COUNT", "RULE", "STT_AUDIO_SECONDS", "complete_text_split"]

CHARACTER_COUNT: Final = "metrics.character_count"
STT_AUDIO_SECONDS: Final = "metrics.audio_seconds"

_U = "gen_ai.usage."
# (total, text part, the other parts): text = total - others, when the text part is absent.
_SPLITS: Final = (
    (
        f"{_U}input_tokens",
        f"{_U}text.input_tokens",
        (f"{_U}audio.input_tokens", f"{_U}image.input_tokens"),
    ),
    (f"{_U}output_tokens", f"{_U}text.output_tokens", (f"{_U}audio.output_tokens",)),
    (
        f"{_U}cache_read.input_tokens",
        f"{_U}text.cache_read.input_tokens",
        (f"{_U}audio.cache_read.input_tokens", f"{_U}image.cache_read.input_tokens"),
    ),
)

Attributes = Mapping[str, Any]


def complete_text_split(attributes: Attributes) -> dict[str, Any]:
    """Add the text count Pipecat leaves out, derived as total minus the other modalities.

    Only when a total and at least one other modality are given as whole numbers and the
    text count is absent; a difference below zero is left for the GenAI mapping to reject
    (its parts exceed its total).
    """
    completed = dict(attributes)
    for total_name, text_name, other_names in _SPLITS:
        total = attributes.get(total_name)
        others = [attributes[n] for n in other_names if n in attributes]
        if text_name in attributes or total is None or not others:
            continue
        values = [total, *others]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            continue
        text = total - sum(others)
        if text >= 0:
            completed[text_name] = text
    return completed


def _span_record(name: str, attributes: Attributes) -> dict[str, Any] | None:
    record: dict[str, Any]
    if name == "tts":
        characters = number(attributes, CHARACTER_COUNT)
        if characters is None:
            return None
        record = {sc.USAGE_KIND: sc.UsageKind.TTS.value, sc.TTS_CHARACTERS: characters}
    elif name == "stt":
        seconds = number(attributes, STT_AUDIO_SECONDS)
        if seconds is None:
            return None  # a realtime service's stt span, or Pipecat before 1.7
        record = {sc.USAGE_KIND: sc.UsageKind.STT.value, sc.STT_AUDIO_SECONDS: seconds}
    elif name == "llm_response" and has_genai_usage(attributes):
        return genai_record(complete_text_split(attributes))
    else:
        return None
    return priced(record, attributes, None, None)


RULE: Final = FrameworkRule(
    name="pipecat",
    scopes=frozenset({"pipecat"}),
    usage_spans=frozenset({"tts", "stt", "llm_response"}),
    span_record=_span_record,
    metrics={},
    metric_identity={},
    attribute_prefixes=("metrics.", "gen_ai."),
    missing_customer=(
        "its Pipecat conversation never named a customer: pass "
        "additional_span_attributes={'paygent.customer.id': ...} to PipelineWorker and add "
        "paygent_otel.ConversationIdentityProcessor to the tracer provider"
    ),
)
