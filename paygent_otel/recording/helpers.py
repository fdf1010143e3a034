"""Recording helpers: write a valid usage record onto a span, mirroring the SDK's calls.

Porting is mechanical: ``client.track_stt(agent, customer, indicator, {...})`` becomes
``record_stt(agent, customer, indicator, {...})``; the keyword form takes typed arguments.
What a conversation's records share (agent, customer, indicator, pricing, meta tags) can
be built once as an :class:`Identity` and passed as ``identity=``.
The helpers never raise: a bad value logs a warning naming the argument and the rule, and
nothing is recorded (the function returns False).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from opentelemetry import trace

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import validate_quantities

__all__ = ["Identity", "IdentityError", "record_sts", "record_stt", "record_tts"]

_logger = logging.getLogger("paygent_otel.recording")
_warned: set[str] = set()
"""Warnings already given once per process."""

# usageMetadata path -> attribute, for the SDK's API-shaped STS dict.
_STS_PATHS = {
    q.json_path[1:]: q.name
    for q in sc.QUANTITIES.values()
    if q.kind is sc.UsageKind.STS and q.unit is not sc.Unit.SECONDS
}

_STS_ARGUMENTS: dict[str, str] = {
    q.name.removeprefix("paygent.sts.").replace(".", "_"): q.name
    for q in sc.QUANTITIES.values()
    if q.kind is sc.UsageKind.STS
}
"""Keyword argument -> STS quantity attribute: an argument is named after its attribute
(``input_audio_tokens`` is ``paygent.sts.input.audio.tokens``)."""

# Identity field -> the attribute it becomes (meta_tags becomes paygent.meta.<key>).
_IDENTITY_FIELDS = {
    "agent_id": sc.AGENT_ID,
    "customer_id": sc.CUSTOMER_ID,
    "indicator": sc.INDICATOR,
    "provider": sc.PROVIDER,
    "model": sc.MODEL,
    "plan": sc.PLAN,
}
_NOT_BLANK = frozenset({sc.AGENT_ID, sc.CUSTOMER_ID, sc.PROVIDER, sc.MODEL})


class IdentityError(ValueError):
    """An :class:`Identity` field breaks a rule; ``field`` names it, the message names the
    attribute and the rule (``paygent.customer.id: must not be blank``)."""

    def __init__(self, field: str, attribute: str, rule: str) -> None:
        super().__init__(f"{attribute}: {rule}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a usage is billed to and how it is priced: what a conversation's records share.

    Build it once and pass it to every call with ``identity=``::

        caller = Identity(agent_id="voice-bot", customer_id="cust_8812", provider="openai")
        record_sts(identity=caller, model="gpt-4o-realtime-preview", input_text_tokens=120)
        usage.add_stt(identity=caller, provider="deepgram", model="nova-2", seconds=27.0)

    Every field is optional here: what a record does not carry it inherits from its span,
    the resource, then the exporter's defaults (:class:`~paygent_otel.IdentityDefaults`,
    which holds only the exporter-wide fallbacks for agent, customer and indicator).
    Nothing is checked when it is built; the recording call checks it and, as for any bad
    argument, logs a warning naming the field and records nothing. ``meta_tags`` is read
    when a record is made (the value is frozen, not the mapping it refers to).
    """

    agent_id: str | None = None
    customer_id: str | None = None
    indicator: str | None = None
    provider: str | None = None
    """The service provider (``paygent.provider``; the SDK's ``serviceProvider``)."""
    model: str | None = None
    plan: str | None = None
    meta_tags: Mapping[str, Any] | None = None
    """Become ``paygent.meta.<key>`` attributes (the payload's ``metaTags``)."""

    def attributes(self) -> dict[str, Any]:
        """The convention attributes of the fields that are set.

        Raises ``TypeError`` when ``meta_tags`` is not a mapping, and :class:`IdentityError`
        (a ``ValueError``) when a field is not a string or a required one is blank.
        """
        return _attributes(
            self.agent_id,
            self.customer_id,
            self.indicator,
            self.provider,
            self.model,
            self.plan,
            self.meta_tags,
        )


def _attributes(
    agent_id: str | None,
    customer_id: str | None,
    indicator: str | None,
    provider: str | None,
    model: str | None,
    plan: str | None,
    meta_tags: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """:meth:`Identity.attributes` of these fields, without building an :class:`Identity`
    (the recording calls' hot path)."""
    _require_mapping("meta_tags", meta_tags)
    attrs: dict[str, Any] = {}
    for (field, name), value in zip(
        _IDENTITY_FIELDS.items(),
        (agent_id, customer_id, indicator, provider, model, plan),
        strict=True,
    ):
        if value is None:
            continue
        if not isinstance(value, str):
            raise IdentityError(field, name, f"must be a string, got {type(value).__name__}")
        if name in _NOT_BLANK and not value.strip():
            raise IdentityError(field, name, "must not be blank")
        attrs[name] = value
    for key, value in (meta_tags or {}).items():
        attrs[sc.META_PREFIX + str(key)] = (
            value if isinstance(value, str | int | float | bool) else str(value)
        )
    return attrs


def _resolve_identity(identity: Identity, call: Identity) -> Identity:
    """``call`` (a call's own arguments) over ``identity`` (the ``identity=`` argument).

    A field the call gives wins over the same field of ``identity``; meta tags are merged
    key by key, the call's winning. Raises ``TypeError`` when ``identity`` is not an
    :class:`Identity` or a ``meta_tags`` is not a mapping.
    """
    if not isinstance(identity, Identity):
        raise TypeError(f"identity: must be an Identity, got {type(identity).__name__}")
    _require_mapping("meta_tags", identity.meta_tags)
    _require_mapping("meta_tags", call.meta_tags)
    given = {f.name: getattr(call, f.name) for f in fields(call)}
    changes = {name: value for name, value in given.items() if value is not None}
    if identity.meta_tags and call.meta_tags is not None:
        changes["meta_tags"] = {**identity.meta_tags, **call.meta_tags}
    return replace(identity, **changes)


def _require_mapping(argument: str, value: object) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{argument}: must be a mapping, got {type(value).__name__}")


def _usage_data(argument: str, value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The SDK's usage dict (``stt_usage_data``/``tts_usage_data``), checked."""
    _require_mapping(argument, value)
    return value or {}


_Fields = tuple[
    str | None, str | None, str | None, str | None, str | None, str | None,
    Mapping[str, Any] | None,
]  # fmt: skip
"""A call's identity arguments, in :class:`Identity`'s field order."""


def _call_attributes(
    identity: Identity | None, call: _Fields, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The identity attributes of a recording call: the SDK dict's pricing fields (``data``)
    win over the keywords, the call's over ``identity``'s. Without ``identity=`` (the common
    case) no :class:`Identity` is built."""
    agent_id, customer_id, indicator, provider, model, plan, meta_tags = call
    if data:
        provider = data.get("serviceProvider", provider)
        model = data.get("model", model)
        plan = data.get("plan", plan)
    if identity is None:
        return _attributes(agent_id, customer_id, indicator, provider, model, plan, meta_tags)
    given = Identity(agent_id, customer_id, indicator, provider, model, plan, meta_tags)
    return _resolve_identity(identity, given).attributes()


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
                "paygent_otel.UsageSampler to keep usage under sampling."
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


def _guard(
    function: str,
    kind: sc.UsageKind,
    span: trace.Span | None,
    build: Callable[[], dict[str, Any]],
) -> bool:
    """Write what ``build`` returns; a bad value is a warning naming it, nothing raises."""
    try:
        return _write(kind, build(), span)
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
    identity: Identity | None = None,
) -> bool:
    """Record speech-to-text usage (audio minutes or seconds) on ``span`` or the current span.

    ``stt_usage_data`` is the SDK's dict (``serviceProvider``, ``model``, ``plan``,
    ``audioDuration`` in minutes); its fields win over the keywords. ``identity`` gives
    what the call does not: every identity argument the call gives wins over its field
    (meta tags merge key by key). Returns True when the record was written.
    """

    def build() -> dict[str, Any]:
        data = _usage_data("stt_usage_data", stt_usage_data)
        call = (agent_id, customer_id, indicator, service_provider, model, plan, meta_tags)
        attrs = _call_attributes(identity, call, data)
        minutes = data.get("audioDuration", audio_minutes)
        if minutes is not None:
            attrs[sc.STT_AUDIO_MINUTES] = minutes
        if audio_seconds is not None:
            attrs[sc.STT_AUDIO_SECONDS] = audio_seconds
        return attrs

    return _guard("record_stt", sc.UsageKind.STT, span, build)


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
    identity: Identity | None = None,
) -> bool:
    """Record text-to-speech usage (characters) on ``span`` or the current span.

    ``tts_usage_data`` is the SDK's dict (``serviceProvider``, ``model``, ``plan``,
    ``characterCount``); its fields win over the keywords. ``identity`` gives what the
    call does not, as for :func:`record_stt`. Returns True when the record was written.
    """

    def build() -> dict[str, Any]:
        data = _usage_data("tts_usage_data", tts_usage_data)
        call = (agent_id, customer_id, indicator, service_provider, model, plan, meta_tags)
        attrs = _call_attributes(identity, call, data)
        count = data.get("characterCount", characters)
        if count is not None:
            attrs[sc.TTS_CHARACTERS] = count
        return attrs

    return _guard("record_tts", sc.UsageKind.TTS, span, build)


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


def _sts_keywords(arguments: Mapping[str, Any]) -> list[tuple[str, str, object]]:
    """``(argument, attribute, value)`` of each STS quantity keyword given, in the order
    of ``arguments`` (a function's ``locals()``, which keeps the signature's order)."""
    return [
        (argument, _STS_ARGUMENTS[argument], value)
        for argument, value in arguments.items()
        if argument in _STS_ARGUMENTS and value is not None
    ]


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
    identity: Identity | None = None,
) -> bool:
    """Record speech-to-speech usage on ``span`` or the current span.

    Give ``usage_metadata`` as the SDK's ``SpeechToSpeechUsageMetadata`` or its API dict
    (as ``track_sts`` takes), or the quantities as keyword arguments. ``cached_tokens`` is
    the undivided cached count; never combine it with the per-modality cached counts.
    ``identity`` gives what the call does not, as for :func:`record_stt`.
    Returns True when the record was written.
    """
    # Every quantity keyword is named after its attribute (_STS_ARGUMENTS): read them all
    # from the arguments as given, before any other local exists.
    keywords = _sts_keywords(locals())

    def build() -> dict[str, Any]:
        call = (agent_id, customer_id, indicator, service_provider, model, plan, meta_tags)
        attrs = _call_attributes(identity, call)
        if usage_metadata is not None:
            attrs.update(_flatten_sts(usage_metadata))
        for _, name, value in keywords:
            if name in attrs:
                raise ValueError(f"{name}: given both in usage_metadata and as an argument")
            attrs[name] = value
        return attrs

    return _guard("record_sts", sc.UsageKind.STS, span, build)
