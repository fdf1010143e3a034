"""The Paygent semantic convention for speech usage on OpenTelemetry data.

Every name here is a span attribute, a span-event attribute, a log-record attribute or a
metric attribute (identity) or metric instrument name (quantities). The table in
``docs/semantic-conventions.md`` lists the same names; ``tests/test_semconv.py`` keeps the
two in step.

A *usage record* is one set of these attributes: a span whose attributes carry
:data:`USAGE_KIND`, or a span event named :data:`USAGE_EVENT_NAME` (one record per event),
or a log record carrying :data:`USAGE_KIND`. Identity attributes (agent, customer,
indicator) and pricing attributes (provider, model, plan, meta tags) that a record does not
carry are inherited, in this order: the span (for event records), the resource, the
exporter's defaults. Quantities are never inherited.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "AGENT_ID",
    "CUSTOMER_ID",
    "IDENTITY_ATTRIBUTES",
    "INDICATOR",
    "META_PREFIX",
    "MODEL",
    "PLAN",
    "PROVIDER",
    "QUANTITIES",
    "STS_CACHED_AUDIO_TOKENS",
    "STS_CACHED_IMAGE_TOKENS",
    "STS_CACHED_TEXT_TOKENS",
    "STS_CACHED_TOKENS",
    "STS_CONNECTION_MINUTES",
    "STS_CONNECTION_SECONDS",
    "STS_INPUT_AUDIO_MINUTES",
    "STS_INPUT_AUDIO_SECONDS",
    "STS_INPUT_AUDIO_TOKENS",
    "STS_INPUT_IMAGE_TOKENS",
    "STS_INPUT_TEXT_TOKENS",
    "STS_INPUT_VIDEO_MINUTES",
    "STS_INPUT_VIDEO_SECONDS",
    "STS_INPUT_VIDEO_TOKENS",
    "STS_OUTPUT_AUDIO_MINUTES",
    "STS_OUTPUT_AUDIO_SECONDS",
    "STS_OUTPUT_AUDIO_TOKENS",
    "STS_OUTPUT_TEXT_TOKENS",
    "STT_AUDIO_MINUTES",
    "STT_AUDIO_SECONDS",
    "TTS_CHARACTERS",
    "USAGE_EVENT_NAME",
    "USAGE_ID",
    "USAGE_KIND",
    "Quantity",
    "Unit",
    "UsageKind",
]


class UsageKind(StrEnum):
    """The three Paygent standalone tracking calls."""

    STT = "stt"
    """Speech-to-text: billed in audio minutes (``track_stt``)."""
    TTS = "tts"
    """Text-to-speech: billed in characters (``track_tts``)."""
    STS = "sts"
    """Speech-to-speech / realtime: tokens and minutes per modality (``track_sts``)."""


class Unit(StrEnum):
    """Units of quantity attributes (UCUM spelling, as OpenTelemetry metrics use)."""

    MINUTES = "min"
    """Minutes, Paygent's unit for audio and connection time."""
    SECONDS = "s"
    """Seconds, OpenTelemetry's unit for durations; converted to minutes (value / 60)."""
    TOKENS = "{token}"
    """Model tokens, an integer count."""
    CHARACTERS = "{character}"
    """Characters of synthesized text, an integer count."""


# --------------------------------------------------------------------------- record marker

USAGE_KIND: Final = "paygent.usage.kind"
"""The usage kind of the record: ``stt``, ``tts`` or ``sts`` (string, required).

Its presence is what makes a span, span event or log record a usage record.
Example: ``"stt"``."""

USAGE_EVENT_NAME: Final = "paygent.usage"
"""Name of a span event that is one usage record (for several records on one span).

The event's attributes use the same names as span attributes; what the event does not
carry (agent, customer, indicator, provider, model, plan, meta tags) it inherits from the
span. Quantities are never inherited."""

USAGE_ID: Final = "paygent.usage.id"
"""Caller-chosen id of one usage record (string, optional): its idempotency key when set.

Set it where the same usage may be sent more than once: a log line a Collector may read
again, a job that may be retried, a span re-sent from another trace. Records with the same
id are billed once (within the 24 h the spool remembers delivered keys); the same id
arriving with different usage is refused with a reason, never billed twice. Read from the
record itself only (a span event does not inherit its span's id); ignored on metric
points, whose key is their interval. At most 256 characters. Example: ``"job-8812-step-3"``."""

# --------------------------------------------------------------------------- identity

AGENT_ID: Final = "paygent.agent.id"
"""Paygent agent id (string, required after inheritance). Becomes ``agentId``.
Often set once on the resource: ``OTEL_RESOURCE_ATTRIBUTES=paygent.agent.id=voice-bot``.
Example: ``"agent-support-voice"``."""

CUSTOMER_ID: Final = "paygent.customer.id"
"""Paygent customer id (string, required after inheritance). Becomes ``customerId``.
Example: ``"cust_8812"``."""

INDICATOR: Final = "paygent.indicator"
"""Billing indicator (string, optional, may be empty). Becomes ``indicator``.
Example: ``"voice-minutes"``."""

PROVIDER: Final = "paygent.provider"
"""Service provider of the speech model (string, required). Becomes ``rawUsage.provider``.
Example: ``"deepgram"``."""

MODEL: Final = "paygent.model"
"""Model name used for pricing (string, required). Becomes ``rawUsage.model``.
Example: ``"nova-2"``."""

PLAN: Final = "paygent.plan"
"""Pricing plan (string, optional, default ``"default"``). Becomes ``rawUsage.plan``.
Example: ``"pay-as-you-go"``."""

META_PREFIX: Final = "paygent.meta."
"""Prefix of meta-tag attributes: ``paygent.meta.<key>`` becomes ``metaTags[<key>]``.

At most 20 tags, key 1-64 characters of ``[A-Za-z0-9_-]``, value at most 256 characters
after stringifying and stripping (the SDK's rules). Example: ``paygent.meta.region="eu"``."""

IDENTITY_ATTRIBUTES: Final = (AGENT_ID, CUSTOMER_ID, INDICATOR, PROVIDER, MODEL, PLAN)
"""Attributes a record inherits from its span, the resource, then exporter defaults."""

# --------------------------------------------------------------------------- STT

STT_AUDIO_MINUTES: Final = "paygent.stt.audio.minutes"
"""Transcribed audio duration in minutes (double, ``min``). Becomes ``rawUsage.audioDuration``.
Set this or :data:`STT_AUDIO_SECONDS`, never both. Example: ``0.45`` (27 s)."""

STT_AUDIO_SECONDS: Final = "paygent.stt.audio.seconds"
"""Transcribed audio duration in seconds (double, ``s``). Sent as ``audioDuration`` =
value / 60. Set this or :data:`STT_AUDIO_MINUTES`, never both. Example: ``27.0``."""

# --------------------------------------------------------------------------- TTS

TTS_CHARACTERS: Final = "paygent.tts.characters"
"""Characters synthesized (int, ``{character}``). Becomes ``rawUsage.characterCount``.
Example: ``1200``."""

# --------------------------------------------------------------------------- STS

STS_INPUT_TEXT_TOKENS: Final = "paygent.sts.input.text.tokens"
"""Input text tokens (int). Becomes ``usageMetadata.input.text.tokens``. Example: ``120``."""
STS_INPUT_AUDIO_TOKENS: Final = "paygent.sts.input.audio.tokens"
"""Input audio tokens (int). Becomes ``usageMetadata.input.audio.tokens``. Example: ``900``."""
STS_INPUT_AUDIO_MINUTES: Final = "paygent.sts.input.audio.minutes"
"""Input audio minutes (double). Becomes ``usageMetadata.input.audio.minutes``."""
STS_INPUT_AUDIO_SECONDS: Final = "paygent.sts.input.audio.seconds"
"""Input audio seconds (double). Sent as ``usageMetadata.input.audio.minutes`` = value / 60."""
STS_INPUT_IMAGE_TOKENS: Final = "paygent.sts.input.image.tokens"
"""Input image tokens (int). Becomes ``usageMetadata.input.image.tokens``."""
STS_INPUT_VIDEO_TOKENS: Final = "paygent.sts.input.video.tokens"
"""Input video tokens (int). Becomes ``usageMetadata.input.video.tokens``."""
STS_INPUT_VIDEO_MINUTES: Final = "paygent.sts.input.video.minutes"
"""Input video minutes (double). Becomes ``usageMetadata.input.video.minutes``."""
STS_INPUT_VIDEO_SECONDS: Final = "paygent.sts.input.video.seconds"
"""Input video seconds (double). Sent as ``usageMetadata.input.video.minutes`` = value / 60."""
STS_OUTPUT_TEXT_TOKENS: Final = "paygent.sts.output.text.tokens"
"""Output text tokens (int). Becomes ``usageMetadata.output.text.tokens``."""
STS_OUTPUT_AUDIO_TOKENS: Final = "paygent.sts.output.audio.tokens"
"""Output audio tokens (int). Becomes ``usageMetadata.output.audio.tokens``."""
STS_OUTPUT_AUDIO_MINUTES: Final = "paygent.sts.output.audio.minutes"
"""Output audio minutes (double). Becomes ``usageMetadata.output.audio.minutes``."""
STS_OUTPUT_AUDIO_SECONDS: Final = "paygent.sts.output.audio.seconds"
"""Output audio seconds (double). Sent as ``usageMetadata.output.audio.minutes`` = value / 60."""
STS_CACHED_TEXT_TOKENS: Final = "paygent.sts.cached.text.tokens"
"""Cached (prompt-cache replay) text tokens (int). Becomes ``usageMetadata.cached.text.tokens``.
Never together with :data:`STS_CACHED_TOKENS`."""
STS_CACHED_AUDIO_TOKENS: Final = "paygent.sts.cached.audio.tokens"
"""Cached audio tokens (int). Becomes ``usageMetadata.cached.audio.tokens``."""
STS_CACHED_IMAGE_TOKENS: Final = "paygent.sts.cached.image.tokens"
"""Cached image tokens (int). Becomes ``usageMetadata.cached.image.tokens``."""
STS_CACHED_TOKENS: Final = "paygent.sts.cached.tokens"
"""One undivided cached-token count, when the provider gives no split (int). Becomes
``usageMetadata.cached.tokens``. Never together with the per-modality cached counts."""
STS_CONNECTION_MINUTES: Final = "paygent.sts.connection.minutes"
"""Session wall-clock minutes, for per-minute priced providers (double).
Becomes ``usageMetadata.connection.minutes``."""
STS_CONNECTION_SECONDS: Final = "paygent.sts.connection.seconds"
"""Session wall-clock seconds (double).
Sent as ``usageMetadata.connection.minutes`` = value / 60."""


class Quantity:
    """How one quantity attribute maps onto the Paygent payload."""

    __slots__ = ("json_path", "kind", "name", "unit")

    def __init__(self, name: str, kind: UsageKind, unit: Unit, json_path: tuple[str, ...]):
        self.name = name
        """The attribute (and metric instrument) name."""
        self.kind = kind
        """The usage kind this quantity belongs to."""
        self.unit = unit
        """Unit of the attribute value; seconds are converted to minutes."""
        self.json_path = json_path
        """Where the value lands under ``rawUsage`` (in minutes for time quantities)."""

    @property
    def is_count(self) -> bool:
        """True for integer quantities (tokens, characters)."""
        return self.unit in (Unit.TOKENS, Unit.CHARACTERS)

    def __repr__(self) -> str:
        return f"Quantity({self.name!r})"


_UM = "usageMetadata"

# A declarative table (one row per quantity: name, kind, unit, payload path); its rows are
# alike on purpose. docs/semantic-conventions.md is generated from it (_semconv_doc).
QUANTITIES: Final[dict[str, Quantity]] = {
    q.name: q
    for q in (
        Quantity(STT_AUDIO_MINUTES, UsageKind.STT, Unit.MINUTES, ("audioDuration",)),
        Quantity(STT_AUDIO_SECONDS, UsageKind.STT, Unit.SECONDS, ("audioDuration",)),
        Quantity(TTS_CHARACTERS, UsageKind.TTS, Unit.CHARACTERS, ("characterCount",)),
        Quantity(
            STS_INPUT_TEXT_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "input", "text", "tokens")
        ),
        Quantity(
            STS_INPUT_AUDIO_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "input", "audio", "tokens")
        ),
        Quantity(
            STS_INPUT_AUDIO_MINUTES, UsageKind.STS, Unit.MINUTES, (_UM, "input", "audio", "minutes")
        ),
        Quantity(
            STS_INPUT_AUDIO_SECONDS, UsageKind.STS, Unit.SECONDS, (_UM, "input", "audio", "minutes")
        ),
        Quantity(
            STS_INPUT_IMAGE_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "input", "image", "tokens")
        ),
        Quantity(
            STS_INPUT_VIDEO_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "input", "video", "tokens")
        ),
        Quantity(
            STS_INPUT_VIDEO_MINUTES, UsageKind.STS, Unit.MINUTES, (_UM, "input", "video", "minutes")
        ),
        Quantity(
            STS_INPUT_VIDEO_SECONDS, UsageKind.STS, Unit.SECONDS, (_UM, "input", "video", "minutes")
        ),
        Quantity(
            STS_OUTPUT_TEXT_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "output", "text", "tokens")
        ),
        Quantity(
            STS_OUTPUT_AUDIO_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "output", "audio", "tokens")
        ),
        Quantity(
            STS_OUTPUT_AUDIO_MINUTES,
            UsageKind.STS,
            Unit.MINUTES,
            (_UM, "output", "audio", "minutes"),
        ),
        Quantity(
            STS_OUTPUT_AUDIO_SECONDS,
            UsageKind.STS,
            Unit.SECONDS,
            (_UM, "output", "audio", "minutes"),
        ),
        Quantity(
            STS_CACHED_TEXT_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "cached", "text", "tokens")
        ),
        Quantity(
            STS_CACHED_AUDIO_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "cached", "audio", "tokens")
        ),
        Quantity(
            STS_CACHED_IMAGE_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "cached", "image", "tokens")
        ),
        Quantity(STS_CACHED_TOKENS, UsageKind.STS, Unit.TOKENS, (_UM, "cached", "tokens")),
        Quantity(
            STS_CONNECTION_MINUTES, UsageKind.STS, Unit.MINUTES, (_UM, "connection", "minutes")
        ),
        Quantity(
            STS_CONNECTION_SECONDS, UsageKind.STS, Unit.SECONDS, (_UM, "connection", "minutes")
        ),
    )
}
"""Every quantity attribute, by name. Metric instruments carry the same names."""
