"""Usage counters: the convention's instruments, created once, with typed ``add_*`` methods.

The metric route's counterpart of :mod:`paygent_otel.recording.helpers`::

    usage = UsageInstruments(meter)
    usage.add_stt(seconds=27.0, customer_id="cust_8812", provider="deepgram", model="nova-2")

Each counter is named after its quantity (``paygent.stt.audio.seconds``) with the
quantity's unit, so nobody retypes names or units. The ``add_*`` methods never raise into
the application: a bad value logs a warning naming the argument and the rule, and nothing
is recorded (they return False). See ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import Counter, Meter

from paygent_otel._version import __version__
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import validate_quantities
from paygent_otel.recording.baggage import identity_from_baggage
from paygent_otel.recording.helpers import (
    Identity,
    IdentityError,
    _call_attributes,
    _Fields,
    _flatten_sts,
    _sts_keywords,
)

__all__ = ["METER_NAME", "UsageInstruments", "create_usage_counters"]

_logger = logging.getLogger("paygent_otel.instruments")

METER_NAME = "paygent_otel.usage"
"""Instrumentation scope of the counters when :class:`UsageInstruments` gets no meter."""


def create_usage_counters(meter: Meter) -> dict[str, Counter]:
    """One counter per quantity of the convention, keyed by name, with the right unit.

    ``counters["paygent.tts.characters"].add(1200, attributes)`` is billed like
    ``UsageInstruments.add_tts(characters=1200, ...)``, minus the argument checks (the SDK
    itself drops negative and non-finite increments with a warning).
    """
    return {
        q.name: meter.create_counter(
            q.name,
            unit=q.unit.value,
            description=f"Paygent {q.kind.value.upper()} usage: " + " ".join(q.name.split(".")[2:]),
        )
        for q in sc.QUANTITIES.values()
    }


def _explain(
    kind: sc.UsageKind, quantities: Sequence[tuple[str, str, object]], error: ValueError
) -> str:
    """Name the argument that breaks a rule on its own; else the rule across quantities
    (at least one quantity, one unit per field, the cached split) as the mapping worded it."""
    for argument, name, value in quantities:
        if value is None:
            continue
        try:
            validate_quantities(kind, {name: value})
        except ValueError as exc:
            return f"argument {argument}={value!r}: {exc}"
    return str(error)


class UsageInstruments:
    """The usage counters of one meter, with ``add_stt``/``add_tts``/``add_sts``.

    ``meter`` defaults to the global meter provider's meter :data:`METER_NAME`. With
    ``baggage=True`` the agent id, customer id, indicator and plan a call does not give are
    taken from the current baggage (:func:`paygent_otel.recording.baggage.identity_from_baggage`,
    which ``OTEL_EXPORTER_PAYGENT_BAGGAGE=false`` switches off); it is opt-in, as installing
    the baggage span processor is on the span route. Identity still missing is filled at
    export from the resource, then the exporter's defaults.
    """

    def __init__(self, meter: Meter | None = None, *, baggage: bool = False) -> None:
        counters = create_usage_counters(meter or metrics.get_meter(METER_NAME, __version__))
        self.counters: Mapping[str, Counter] = MappingProxyType(counters)
        """The raw counters by instrument name, for users who build attributes themselves."""
        self._baggage = baggage

    def add_stt(
        self,
        *,
        seconds: float | None = None,
        minutes: float | None = None,
        agent_id: str | None = None,
        customer_id: str | None = None,
        indicator: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        plan: str | None = None,
        meta_tags: Mapping[str, Any] | None = None,
        identity: Identity | None = None,
    ) -> bool:
        """Add speech-to-text audio (``seconds`` or ``minutes``). True when recorded.

        ``identity`` gives what the call does not: every identity argument the call gives
        wins over its field (meta tags merge key by key)."""
        call = (agent_id, customer_id, indicator, provider, model, plan, meta_tags)
        quantities = (
            ("seconds", sc.STT_AUDIO_SECONDS, seconds),
            ("minutes", sc.STT_AUDIO_MINUTES, minutes),
        )
        return self._add("add_stt", sc.UsageKind.STT, quantities, identity, call)

    def add_tts(
        self,
        *,
        characters: int | None = None,
        agent_id: str | None = None,
        customer_id: str | None = None,
        indicator: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        plan: str | None = None,
        meta_tags: Mapping[str, Any] | None = None,
        identity: Identity | None = None,
    ) -> bool:
        """Add text-to-speech ``characters``. True when recorded.

        ``identity`` gives what the call does not, as for :meth:`add_stt`."""
        call = (agent_id, customer_id, indicator, provider, model, plan, meta_tags)
        quantities = (("characters", sc.TTS_CHARACTERS, characters),)
        return self._add("add_tts", sc.UsageKind.TTS, quantities, identity, call)

    def add_sts(
        self,
        *,
        usage_metadata: Any = None,
        input_text_tokens: int | None = None,
        input_audio_tokens: int | None = None,
        input_audio_seconds: float | None = None,
        input_audio_minutes: float | None = None,
        input_image_tokens: int | None = None,
        input_video_tokens: int | None = None,
        input_video_seconds: float | None = None,
        input_video_minutes: float | None = None,
        output_text_tokens: int | None = None,
        output_audio_tokens: int | None = None,
        output_audio_seconds: float | None = None,
        output_audio_minutes: float | None = None,
        cached_text_tokens: int | None = None,
        cached_audio_tokens: int | None = None,
        cached_image_tokens: int | None = None,
        cached_tokens: int | None = None,
        connection_seconds: float | None = None,
        connection_minutes: float | None = None,
        agent_id: str | None = None,
        customer_id: str | None = None,
        indicator: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        plan: str | None = None,
        meta_tags: Mapping[str, Any] | None = None,
        identity: Identity | None = None,
    ) -> bool:
        """Add speech-to-speech usage: every modality given, in one go. True when recorded.

        ``usage_metadata`` takes the SDK's ``SpeechToSpeechUsageMetadata`` or its API dict
        (as ``track_sts`` does) instead of, or besides, the keyword quantities.
        ``cached_tokens`` is the undivided cached count; never combine it with the
        per-modality cached counts. ``identity`` gives what the call does not, as for
        :meth:`add_stt`.
        """
        # Every quantity keyword is named after its attribute: read them all from the
        # arguments as given, before any other local exists.
        quantities = _sts_keywords(locals())
        call = (agent_id, customer_id, indicator, provider, model, plan, meta_tags)
        if usage_metadata is not None:
            from_metadata = _metadata_quantities(usage_metadata, quantities)
            if from_metadata is None:
                return False
            quantities += from_metadata
        return self._add("add_sts", sc.UsageKind.STS, quantities, identity, call)

    def _add(
        self,
        method: str,
        kind: sc.UsageKind,
        quantities: Sequence[tuple[str, str, object]],
        identity: Identity | None,
        call: _Fields,
    ) -> bool:
        try:
            return self._checked_add(method, kind, quantities, identity, call)
        except Exception:  # never into the application
            _logger.exception("paygent %s: nothing recorded", method)
            return False

    def _checked_add(
        self,
        method: str,
        kind: sc.UsageKind,
        quantities: Sequence[tuple[str, str, object]],
        identity: Identity | None,
        call: _Fields,
    ) -> bool:
        try:
            attributes = _call_attributes(identity, call)
        except IdentityError as exc:
            # The field is the argument: add_* take identity under the Identity's names.
            _logger.warning("paygent %s: nothing recorded: argument %s: %s", method, exc.field, exc)
            return False
        except (ValueError, TypeError) as exc:
            _logger.warning("paygent %s: nothing recorded: %s", method, exc)
            return False
        given = {name: value for _, name, value in quantities if value is not None}
        try:
            nonzero = validate_quantities(kind, given)
        except ValueError as exc:
            _logger.warning(
                "paygent %s: nothing recorded: %s", method, _explain(kind, quantities, exc)
            )
            return False
        if not nonzero:
            _logger.debug("paygent %s: every quantity is zero: skipped, as the SDK does", method)
            return False
        if self._baggage:
            attributes = {**identity_from_baggage(), **attributes}
        for name, value in given.items():
            if value:
                assert isinstance(value, int | float)  # validated above
                amount = int(value) if sc.QUANTITIES[name].is_count else value
                self.counters[name].add(amount, attributes)
        return True


def _metadata_quantities(
    usage_metadata: Any, keywords: Sequence[tuple[str, str, object]]
) -> list[tuple[str, str, object]] | None:
    """The quantities of ``add_sts``'s ``usage_metadata``; None (after a warning) when it
    is not usage metadata or repeats a quantity given as a keyword."""
    try:
        flat = _flatten_sts(usage_metadata)
    except (ValueError, TypeError) as exc:
        _logger.warning("paygent add_sts: nothing recorded: %s", exc)
        return None
    given = {name for _, name, value in keywords if value is not None}
    for name in flat.keys() & given:
        _logger.warning(
            "paygent add_sts: nothing recorded: %s given both in usage_metadata and as an argument",
            name,
        )
        return None
    return [("usage_metadata", name, value) for name, value in flat.items()]
