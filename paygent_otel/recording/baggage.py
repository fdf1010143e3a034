"""Customer and agent ids from OpenTelemetry Baggage, for usage recorded far from the edge.

The customer is usually known where a request enters the system, while usage is recorded
deep in a worker or in another service. Put the ids in baggage at the edge
(``baggage.set_baggage("paygent.customer.id", "cust_8812")``); the default propagators
(``tracecontext,baggage``) carry them in the ``baggage`` header of every outgoing request,
and in the service that records usage:

- :class:`PaygentBaggageSpanProcessor` copies them onto each span as it starts, so span
  records (and their events) inherit them;
- :func:`identity_from_baggage` returns them for the metric helpers, since baggage is not
  on metric points.

Only the convention's identity keys (:data:`BAGGAGE_KEYS`) are read, never copied over an
attribute the span already has, and validated: baggage is untrusted input from upstream.
Precedence: record > span > baggage > resource > exporter defaults.
``OTEL_EXPORTER_PAYGENT_BAGGAGE=false`` turns both off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Final

from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from paygent_otel.convention import semconv as sc
from paygent_otel.delivery.config import OTEL_EXPORTER_PAYGENT_BAGGAGE, read_setting

__all__ = [
    "BAGGAGE_KEYS",
    "MAX_BAGGAGE_VALUE_LENGTH",
    "OTEL_EXPORTER_PAYGENT_BAGGAGE",
    "PaygentBaggageSpanProcessor",
    "baggage_enabled",
    "identity_from_baggage",
]

_logger = logging.getLogger("paygent_otel.baggage")

BAGGAGE_KEYS: Final = (sc.AGENT_ID, sc.CUSTOMER_ID, sc.INDICATOR, sc.PLAN)
"""The baggage entries read as identity: agent id, customer id, indicator and plan.

Provider, model, quantities and meta tags are facts of one call, never of a request, and
are never taken from baggage."""

MAX_BAGGAGE_VALUE_LENGTH: Final = 256
"""Longest identity value accepted from baggage, after stripping (longer ones are ignored)."""

_warned: set[tuple[str, str]] = set()
"""(key, problem) pairs already logged: baggage comes from upstream, so a bad value may
arrive on every request, and the log must not grow with it."""


def baggage_enabled() -> bool:
    """The switch :data:`OTEL_EXPORTER_PAYGENT_BAGGAGE` (true when unset; an unknown value
    is a warning naming it, and keeps the default). ``false`` makes
    :class:`PaygentBaggageSpanProcessor` a no-op and :func:`identity_from_baggage` return
    ``{}``, without a code change."""
    enabled: bool = read_setting(OTEL_EXPORTER_PAYGENT_BAGGAGE)
    return enabled


def _warn_once(key: str, problem: str) -> None:
    if (key, problem) not in _warned:
        _warned.add((key, problem))
        _logger.warning(
            "paygent: ignoring baggage entry %s: %s (baggage is untrusted input from the caller; "
            "this warning is given once per process)",
            key,
            problem,
        )


def _clean(key: str, value: object) -> str | None:
    """The usable identity value of one baggage entry, or None."""
    if not isinstance(value, str):
        _warn_once(key, f"value is a {type(value).__name__}, not a string")
        return None
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_BAGGAGE_VALUE_LENGTH:
        _warn_once(key, f"value longer than {MAX_BAGGAGE_VALUE_LENGTH} characters")
        return None
    if not text.isprintable():
        _warn_once(key, "value contains control characters")
        return None
    return text


def _identity(entries: Mapping[str, object], keys: Iterable[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key in keys:
        if key in entries:
            value = _clean(key, entries[key])
            if value is not None:
                found[key] = value
    return found


def identity_from_baggage(context: Context | None = None) -> dict[str, str]:
    """The identity attributes in the baggage of ``context`` (the current one by default).

    Keys are among :data:`BAGGAGE_KEYS`; values are stripped and validated (blank, overlong
    or control-character values are left out). Empty when baggage holds none, or when
    :data:`OTEL_EXPORTER_PAYGENT_BAGGAGE` is false. The metric helpers merge the result
    *under* the attributes given explicitly, so explicit ids always win.
    """
    if not baggage_enabled():
        return {}
    entries = baggage.get_all(context)
    if not entries:
        return {}
    return _identity(entries, BAGGAGE_KEYS)


class PaygentBaggageSpanProcessor(SpanProcessor):
    """Copies the identity entries of baggage onto every span as it starts.

    Install it on the ``TracerProvider`` of each service that records usage. It copies
    only :data:`BAGGAGE_KEYS` (``keys`` narrows them further, e.g. to the customer id),
    never overwrites an attribute the span was started with, and ignores invalid values.
    A span attribute set after the start replaces the copied value, which gives the
    documented precedence: record > span > baggage > resource > exporter defaults.

    ``enabled`` overrides :data:`OTEL_EXPORTER_PAYGENT_BAGGAGE` (read once, here).
    The copied ids are span attributes like any other: every exporter on the provider
    (OTLP too) sees them.
    """

    def __init__(self, *, enabled: bool | None = None, keys: Iterable[str] = BAGGAGE_KEYS):
        self._enabled = baggage_enabled() if enabled is None else enabled
        self._keys = tuple(keys)
        unknown = [key for key in self._keys if key not in BAGGAGE_KEYS]
        if unknown:
            raise ValueError(
                f"keys {unknown} are not identity keys; choose from {', '.join(BAGGAGE_KEYS)}"
            )

    @property
    def enabled(self) -> bool:
        """Whether the processor copies anything."""
        return self._enabled

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Copy the identity entries of the parent context's baggage onto ``span``."""
        if not self._enabled:
            return
        entries = baggage.get_all(parent_context)
        if not entries:
            return
        existing = span.attributes or {}
        for key, value in _identity(entries, self._keys).items():
            if key not in existing:
                span.set_attribute(key, value)

    def on_end(self, span: ReadableSpan) -> None:
        """Nothing to do when a span ends."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered."""
        return True

    def __repr__(self) -> str:
        return f"PaygentBaggageSpanProcessor(enabled={self._enabled}, keys={self._keys})"
