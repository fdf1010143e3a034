"""Recording helpers: write a valid usage record onto a span, mirroring the SDK's calls.

Porting is mechanical: ``client.track_stt(agent, customer, indicator, {...})`` becomes
``record_stt(agent, customer, indicator, {...})``; the keyword form takes typed arguments.
The helpers never raise: a bad value logs a warning naming the argument and the rule, and
nothing is recorded (the function returns False).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from . import semconv as sc
from ._mapping import validate_quantities

__all__ = ["record_sts", "record_stt", "record_tts"]

_logger = logging.getLogger("paygent_otel.recording")
_warned: set[str] = set()
"""Warnings already given once per process."""

# usageMetadata path -> attribute, for the SDK's API-shaped STS dict.
_STS_PATHS = {
    q.json_path[1:]: q.name
    for q in sc.QUANTITIES.values()
    if q.kind is sc.UsageKind.STS and q.unit is not sc.Unit.SECONDS
}


def _require_mapping(argument: str, value: object) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{argument}: must be a mapping, got {type(value).__name__}")


def _identity(
    agent_id: str | None,
    customer_id: str | None,
    indicator: str | None,
    service_provider: str | None,
    model: str | None,
    plan: str | None,
    meta_tags: Mapping[str, Any] | None,
) -> dict[str, Any]:
    _require_mapping("meta_tags", meta_tags)
    attrs: dict[str, Any] = {}
    for name, value in (
        (sc.AGENT_ID, agent_id),
        (sc.CUSTOMER_ID, customer_id),
        (sc.INDICATOR, indicator),
        (sc.PROVIDER, service_provider),
        (sc.MODEL, model),
        (sc.PLAN, plan),
    ):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{name}: must be a string, got {type(value).__name__}")
        if name in (sc.AGENT_ID, sc.CUSTOMER_ID, sc.PROVIDER, sc.MODEL) and not value.strip():
            raise ValueError(f"{name}: must not be blank")
        attrs[name] = value
    for key, value in (meta_tags or {}).items():
        attrs[sc.META_PREFIX + str(key)] = (
            value if isinstance(value, str | int | float | bool) else str(value)
        )
    return attrs


def _write(kind: sc.UsageKind, attrs: dict[str, Any], span: trace.Span | None) -> bool:
    attrs[sc.USAGE_KIND] = kind.value
    if not validate_quantities(kind, attrs):
        _logger.debug(
            "paygent %s usage with only zero quantities: skipped, as the SDK does", kind.value
        )
        return False
    target = span if span is not None else trace.get_current_span()
    if not target.is_recording():
        if "not-recording" not in _warned:
            _warned.add("not-recording")
            _logger.warning(
                "paygent usage recorded on a span that is not recording (no active span, or "
                "it was not sampled): the usage is lost. Install "
                "paygent_otel.sampling.UsageSampler to keep usage under sampling."
            )
        return False
    # The SDK enforces its span limits silently: a full attribute map evicts its oldest
    # entry, a full event list its oldest event, and long strings are truncated. Each would
    # change or lose a bill, so check the room first and refuse (loudly) instead.
    limits = getattr(target, "_limits", None)
    name = getattr(target, "name", "?")
    existing = getattr(target, "attributes", None) or {}
    added = sum(1 for key in attrs if key not in existing)
    max_attributes = getattr(limits, "max_span_attributes", None)
    on_span = sc.USAGE_KIND not in existing and (
        max_attributes is None or len(existing) + added <= max_attributes
    )
    max_length = getattr(
        limits, "max_span_attribute_length" if on_span else "max_attribute_length", None
    )
    if max_length is not None:
        for key, value in attrs.items():
            if isinstance(value, str) and len(value) > max_length:
                raise ValueError(
                    f"{key}: {len(value)} characters would be truncated to {max_length} by "
                    "the span attribute length limit (OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT)"
                )
    if on_span:
        target.set_attributes(attrs)
        return True
    max_events = getattr(limits, "max_events", None)
    events = getattr(target, "events", ())
    if max_events is not None and len(events) >= max_events:
        _logger.error(
            "paygent usage not recorded: span %r already holds %d events (the span event "
            "limit, OTEL_SPAN_EVENT_COUNT_LIMIT); record usage on a new span",
            name,
            len(events),
        )
        return False
    max_event_attributes = getattr(limits, "max_event_attributes", None)
    if max_event_attributes is not None and len(attrs) > max_event_attributes:
        raise ValueError(
            f"{len(attrs)} attributes exceed the span event attribute limit "
            f"({max_event_attributes}, OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT)"
        )
    target.add_event(sc.USAGE_EVENT_NAME, attrs)
    return True


def _guard(function: str, build: Any) -> bool:
    try:
        kind, attrs, span = build()
        return _write(kind, attrs, span)
    except (ValueError, TypeError) as exc:
        _logger.warning("paygent %s: nothing recorded: %s", function, exc)
        return False
    except Exception:  # never into the application
        _logger.exception("paygent %s: nothing recorded", function)
        return False


def record_stt(
    agent_id: str | None = None,
    customer_id: str | None = None,
    indicator: str | None = None,
    stt_usage_data: Mapping[str, Any] | None = None,
    *,
    service_provider: str | None = None,
    model: str | None = None,
    plan: str | None = None,
    audio_minutes: float | None = None,
    audio_seconds: float | None = None,
    meta_tags: Mapping[str, Any] | None = None,
    span: trace.Span | None = None,
) -> bool:
    """Record speech-to-text usage (audio minutes or seconds) on ``span`` or the current span.

    ``stt_usage_data`` is the SDK's dict (``serviceProvider``, ``model``, ``plan``,
    ``audioDuration`` in minutes). Returns True when the record was written.
    """

    def build() -> tuple[sc.UsageKind, dict[str, Any], trace.Span | None]:
        _require_mapping("stt_usage_data", stt_usage_data)
        data = stt_usage_data or {}
        attrs = _identity(
            agent_id,
            customer_id,
            indicator,
            data.get("serviceProvider", service_provider),
            data.get("model", model),
            data.get("plan", plan),
            meta_tags,
        )
        minutes = data.get("audioDuration", audio_minutes)
        if minutes is not None:
            attrs[sc.STT_AUDIO_MINUTES] = minutes
        if audio_seconds is not None:
            attrs[sc.STT_AUDIO_SECONDS] = audio_seconds
        return sc.UsageKind.STT, attrs, span

    return _guard("record_stt", build)


def record_tts(
    agent_id: str | None = None,
    customer_id: str | None = None,
    indicator: str | None = None,
    tts_usage_data: Mapping[str, Any] | None = None,
    *,
    service_provider: str | None = None,
    model: str | None = None,
    plan: str | None = None,
    characters: int | None = None,
    meta_tags: Mapping[str, Any] | None = None,
    span: trace.Span | None = None,
) -> bool:
    """Record text-to-speech usage (characters) on ``span`` or the current span.

    ``tts_usage_data`` is the SDK's dict (``serviceProvider``, ``model``, ``plan``,
    ``characterCount``). Returns True when the record was written.
    """

    def build() -> tuple[sc.UsageKind, dict[str, Any], trace.Span | None]:
        _require_mapping("tts_usage_data", tts_usage_data)
        data = tts_usage_data or {}
        attrs = _identity(
            agent_id,
            customer_id,
            indicator,
            data.get("serviceProvider", service_provider),
            data.get("model", model),
            data.get("plan", plan),
            meta_tags,
        )
        count = data.get("characterCount", characters)
        if count is not None:
            attrs[sc.TTS_CHARACTERS] = count
        return sc.UsageKind.TTS, attrs, span

    return _guard("record_tts", build)


def _flatten_sts(usage_metadata: Any) -> dict[str, Any]:
    """The SDK's ``SpeechToSpeechUsageMetadata`` (or its API dict) as convention attributes."""
    if hasattr(usage_metadata, "to_api_dict"):
        usage_metadata = usage_metadata.to_api_dict()
    if not isinstance(usage_metadata, Mapping):
        raise TypeError(
            f"usage_metadata must be a mapping or SpeechToSpeechUsageMetadata, "
            f"got {type(usage_metadata).__name__}"
        )
    attrs: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if not path and key == "schemaVersion":
                continue
            here = (*path, key)
            if isinstance(value, Mapping):
                walk(value, here)
            elif here in _STS_PATHS:
                attrs[_STS_PATHS[here]] = value
            else:
                raise ValueError(f"usage_metadata: unknown field {'.'.join(here)!r}")

    walk(usage_metadata, ())
    return attrs


def record_sts(
    agent_id: str | None = None,
    customer_id: str | None = None,
    indicator: str | None = None,
    usage_metadata: Any = None,
    *,
    service_provider: str | None = None,
    model: str | None = None,
    plan: str | None = None,
    input_text_tokens: int | None = None,
    input_audio_tokens: int | None = None,
    input_audio_minutes: float | None = None,
    input_image_tokens: int | None = None,
    input_video_tokens: int | None = None,
    input_video_minutes: float | None = None,
    output_text_tokens: int | None = None,
    output_audio_tokens: int | None = None,
    output_audio_minutes: float | None = None,
    cached_text_tokens: int | None = None,
    cached_audio_tokens: int | None = None,
    cached_image_tokens: int | None = None,
    cached_tokens: int | None = None,
    connection_minutes: float | None = None,
    meta_tags: Mapping[str, Any] | None = None,
    span: trace.Span | None = None,
) -> bool:
    """Record speech-to-speech usage on ``span`` or the current span.

    Give ``usage_metadata`` as the SDK's ``SpeechToSpeechUsageMetadata`` or its API dict
    (as ``track_sts`` takes), or the quantities as keyword arguments. ``cached_tokens`` is
    the undivided cached count; never combine it with the per-modality cached counts.
    Returns True when the record was written.
    """

    def build() -> tuple[sc.UsageKind, dict[str, Any], trace.Span | None]:
        attrs = _identity(
            agent_id, customer_id, indicator, service_provider, model, plan, meta_tags
        )
        if usage_metadata is not None:
            attrs.update(_flatten_sts(usage_metadata))
        for name, value in (
            (sc.STS_INPUT_TEXT_TOKENS, input_text_tokens),
            (sc.STS_INPUT_AUDIO_TOKENS, input_audio_tokens),
            (sc.STS_INPUT_AUDIO_MINUTES, input_audio_minutes),
            (sc.STS_INPUT_IMAGE_TOKENS, input_image_tokens),
            (sc.STS_INPUT_VIDEO_TOKENS, input_video_tokens),
            (sc.STS_INPUT_VIDEO_MINUTES, input_video_minutes),
            (sc.STS_OUTPUT_TEXT_TOKENS, output_text_tokens),
            (sc.STS_OUTPUT_AUDIO_TOKENS, output_audio_tokens),
            (sc.STS_OUTPUT_AUDIO_MINUTES, output_audio_minutes),
            (sc.STS_CACHED_TEXT_TOKENS, cached_text_tokens),
            (sc.STS_CACHED_AUDIO_TOKENS, cached_audio_tokens),
            (sc.STS_CACHED_IMAGE_TOKENS, cached_image_tokens),
            (sc.STS_CACHED_TOKENS, cached_tokens),
            (sc.STS_CONNECTION_MINUTES, connection_minutes),
        ):
            if value is not None:
                if name in attrs:
                    raise ValueError(f"{name}: given both in usage_metadata and as an argument")
                attrs[name] = value
        return sc.UsageKind.STS, attrs, span

    return _guard("record_sts", build)
