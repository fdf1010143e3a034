"""Extract usage records from a span (SDK ``ReadableSpan`` or one received over OTLP).

A span is a record when its attributes carry ``paygent.usage.kind``; each span event named
``paygent.usage`` is a record of its own. With GenAI mapping on, a span with
``gen_ai.usage.*`` counts and no convention record becomes an STS record. With framework
mappings on (:mod:`paygent_otel.convention.frameworks`), a span of an enabled framework's scope is
billed by that framework's rule alone (never also by the GenAI mapping).

Span limits never change who pays. The sender's SDK evicts attributes past its count limit
and cuts string values to its length limit, silently; the span says how many it dropped.
When a span (or event) lost attributes, its records are billed only if the agent and
customer come from the record, or from the span for an event record, never from a
fallback (resource, exporter defaults) that an evicted attribute would have overridden.
An id exactly as long as the value length limit is taken as cut short. Both are refused
as invalid with a message naming the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    idempotency_key,
    map_usage,
    rejected,
    rejection_key,
    source_layer,
)

if TYPE_CHECKING:
    from paygent_otel.convention.frameworks import Claim, FrameworkSet

__all__ = [
    "EVENT_LIMIT_SETTING",
    "NOT_TRUNCATED",
    "Truncation",
    "has_usage",
    "records_from_span",
    "valid_span_ids",
]

Attributes = Mapping[str, Any]

EVENT_LIMIT_SETTING: Final = "OTEL_SPAN_EVENT_COUNT_LIMIT"
"""The SDK setting whose limit drops a span's events past it (128 by default)."""
_COUNT_SETTINGS: Final = {
    "span": "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT / OTEL_ATTRIBUTE_COUNT_LIMIT",
    "span event": "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT / OTEL_ATTRIBUTE_COUNT_LIMIT",
}
_LENGTH_SETTINGS: Final = {
    "span": "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT / OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "span event": "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
}


@dataclass(frozen=True, slots=True)
class Truncation:
    """What the sender's span limits did to one attribute set (a span's or an event's)."""

    dropped: int = 0
    """Attributes evicted by the count limit (OTLP's ``dropped_attributes_count``)."""
    max_length: int | None = None
    """The value length limit string values were cut to, when known (never over OTLP)."""


NOT_TRUNCATED: Final = Truncation()
"""Nothing dropped, no known length limit."""


def valid_span_ids(trace_id: str, span_id: str) -> bool:
    """True for ids the OTel spec calls valid: 16 and 8 bytes (lowercase hex), not all zero."""
    return (
        len(trace_id) == 32
        and len(span_id) == 16
        and trace_id.strip("0") != ""
        and span_id.strip("0") != ""
    )


def has_usage(
    attributes: Attributes,
    event_names: Iterable[str],
    genai: bool,
    *,
    dropped: int = 0,
    frameworks: FrameworkSet | None = None,
    scope: str = "",
    span_name: str = "",
) -> bool:
    """Cheap test run on every span: does it carry anything billable?

    ``dropped``: attributes the SDK evicted from the span; then a convention quantity
    without ``paygent.usage.kind`` counts too (its kind may be what was evicted).
    ``scope`` (instrumentation scope name) and ``span_name`` matter only with ``frameworks``.
    """
    if sc.USAGE_KIND in attributes:
        return True
    if any(name == sc.USAGE_EVENT_NAME for name in event_names):
        return True
    if dropped and any(name in sc.QUANTITIES for name in attributes):
        return True
    if frameworks and frameworks.may_bill(scope, span_name):
        return True
    if genai:
        from paygent_otel.convention.genai import has_genai_usage

        return has_genai_usage(attributes)
    return False


_Own = tuple[tuple[Attributes, Truncation, str], ...]
"""The layers a record calls its own, most specific first: (attributes, truncation, what)
with what ``"span event"`` or ``"span"``."""


def _limit_problem(own: _Own, layers: Sequence[Attributes]) -> str | None:
    """Why span limits may have changed who pays for this record; None when they cannot."""
    cut = next((i for i, (_, truncation, _) in enumerate(own) if truncation.dropped), None)
    for attribute in (sc.AGENT_ID, sc.CUSTOMER_ID, sc.USAGE_ID):
        index = source_layer(attribute, layers)
        if attribute != sc.USAGE_ID and cut is not None and (index is None or index > cut):
            _, truncation, what = own[cut]
            source = (
                "the exporter's defaults"
                if index is None
                else "the resource"
                if index >= len(own)
                else f"the {own[index][2]}"
            )
            return (
                f"{attribute} would come from {source}, but the SDK dropped "
                f"{truncation.dropped} attributes from this {what} (attribute count limit, "
                f"{_COUNT_SETTINGS[what]}): the {what}'s own {attribute} may have been one of "
                f"them. Not billed, so that it is not billed to the wrong party: raise the "
                f"limit or set fewer attributes"
            )
        if index is None or index >= len(own) or (attribute == sc.USAGE_ID and index):
            continue
        value = layers[index][attribute]
        _, truncation, what = own[index]
        limit = truncation.max_length
        if limit and isinstance(value, str) and len(value) == limit:
            return (
                f"{attribute} is exactly {limit} characters long, the {what} attribute value "
                f"length limit ({_LENGTH_SETTINGS[what]}): it was probably cut short. Not "
                f"billed, so that it is not billed to the wrong party: raise the limit"
            )
    return None


def records_from_span(
    *,
    trace_id: str,
    span_id: str,
    name: str,
    attributes: Attributes,
    events: Iterable[tuple[str, Attributes]],
    resource: Attributes,
    defaults: IdentityDefaults,
    genai: bool = False,
    truncation: Truncation = NOT_TRUNCATED,
    event_truncations: Sequence[Truncation] = (),
    dropped_events: int = 0,
    frameworks: FrameworkSet | None = None,
    scope: str = "",
) -> tuple[list[UsageRecord], list[Rejection]]:
    """Map every record the span carries. ``trace_id``/``span_id`` are lowercase hex;
    ``scope`` is the span's instrumentation scope name (read with ``frameworks``).

    ``truncation`` says what span limits did to the span's attributes, ``event_truncations``
    (aligned with ``events``) to each event's, ``dropped_events`` how many events the SDK
    dropped. A record on a span whose ids are invalid is refused unless it carries its own
    ``paygent.usage.id``: its key would be shared with every other such span.
    """
    span = _SpanMapping(trace_id, span_id, name, attributes, resource, defaults, truncation)
    events = list(events)
    # A span with any convention record is billed from it alone: never twice.
    has_events = any(event_name == sc.USAGE_EVENT_NAME for event_name, _ in events)
    span.span_record(has_events, genai, frameworks.claim(scope) if frameworks else None)
    for index, (event_name, event_attributes) in enumerate(events, start=1):
        if event_name == sc.USAGE_EVENT_NAME:
            event_truncation = (
                event_truncations[index - 1] if index <= len(event_truncations) else NOT_TRUNCATED
            )
            own = ((event_attributes, event_truncation, "span event"), span.layer)
            span.add(index, own, f"{span.where} event #{index}")
    if dropped_events and has_events:
        span.lost(dropped_events)
    return span.records, span.rejections


class _SpanMapping:
    """The records and rejections of one span, as :func:`records_from_span` finds them."""

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        name: str,
        attributes: Attributes,
        resource: Attributes,
        defaults: IdentityDefaults,
        truncation: Truncation,
    ) -> None:
        self.trace_id, self.span_id, self.name = trace_id, span_id, name
        self.attributes, self.resource, self.defaults = attributes, resource, defaults
        self.truncation = truncation
        self.where = f"span {name!r} (trace {trace_id or '-'}, span {span_id or '-'})"
        self.ids_valid = valid_span_ids(trace_id, span_id)
        self.layer = (attributes, truncation, "span")
        self.records: list[UsageRecord] = []
        self.rejections: list[Rejection] = []

    def _ref(self, position: int | str, kind: object) -> str:
        return idempotency_key("span", self.trace_id, self.span_id, position, kind)

    def refuse(self, ref: str, record: Attributes, origin: str, problem: str) -> None:
        self.rejections.append(rejected(origin, problem, rejection_key(ref, record), record))

    def add(
        self, position: int, own: _Own, origin: str, defaults: IdentityDefaults | None = None
    ) -> None:
        """Map the record ``own[0]`` (at ``position``: 0 the span, n its n-th event)."""
        record = own[0][0]
        ref = self._ref(position, record.get(sc.USAGE_KIND))
        layers = (*(layer for layer, _, _ in own), self.resource)
        problem = _limit_problem(own, layers)
        if problem is None and not self.ids_valid and sc.USAGE_ID not in record:
            problem = (
                f"trace id {self.trace_id!r} and span id {self.span_id!r} are not valid "
                "OpenTelemetry ids (16 and 8 bytes, not all zero), so this record cannot be "
                f"told apart from others: send valid ids, or give the record its own "
                f"{sc.USAGE_ID}"
            )
        if problem is not None:
            self.refuse(ref, record, origin, problem)
            return
        result = map_usage(
            record,
            inherited=layers[1:],
            defaults=self.defaults if defaults is None else defaults,
            ref=ref,
            origin=origin,
            trace_ids=(self.trace_id, self.span_id) if self.ids_valid else None,
        )
        if isinstance(result, UsageRecord):
            self.records.append(result)
        else:
            self.rejections.append(_with_dropped(result, own))

    def span_record(self, has_events: bool, genai: bool, claim: Claim | None) -> None:
        """The record the span itself carries: its convention attributes, else (without
        convention events) what its framework's rule or the GenAI mapping makes of it."""
        attributes, defaults = self.attributes, self.defaults
        known_customer = bool(
            sc.CUSTOMER_ID in attributes or sc.CUSTOMER_ID in self.resource or defaults.customer_id
        )
        if sc.USAGE_KIND in attributes:
            self.add(0, (self.layer,), self.where)
        elif self.truncation.dropped and any(n in sc.QUANTITIES for n in attributes):
            self.refuse(
                self._ref(0, None),
                attributes,
                self.where,
                f"the span carries usage quantities but no {sc.USAGE_KIND}, and the SDK dropped "
                f"{self.truncation.dropped} of its attributes (attribute count limit, "
                f"{_COUNT_SETTINGS['span']}): {sc.USAGE_KIND} was probably one of them. Raise "
                "the limit or set fewer attributes",
            )
        elif claim is not None:
            if not has_events:
                self._framework_record(claim, known_customer)
        elif genai and not has_events and known_customer:
            from paygent_otel.convention.genai import genai_record

            origin = self.where + " (gen_ai.* mapping)"
            found = self._converted(
                lambda: genai_record(attributes), origin, sc.UsageKind.STS.value
            )
            if found is not None:
                self.add(0, (({**attributes, **found}, self.truncation, "span"),), origin)

    def _framework_record(self, claim: Claim, known_customer: bool) -> None:
        origin = f"{self.where} ({claim.rule.name} mapping)"
        found = self._converted(lambda: claim.record(self.name, self.attributes), origin, "")
        if found is None:
            return
        if not known_customer:
            self.refuse(
                self._ref(0, found[sc.USAGE_KIND]),
                self.attributes,
                origin,
                f"{sc.CUSTOMER_ID} is missing: " + claim.rule.missing_customer,
            )
            return
        defaults = self.defaults
        if claim.indicator:
            defaults = replace(defaults, indicator=claim.indicator)
        own = (({**self.attributes, **found}, self.truncation, "span"),)
        self.add(0, own, origin, defaults)

    def _converted(
        self, convert: Callable[[], dict[str, Any] | None], origin: str, kind: str
    ) -> dict[str, Any] | None:
        """The convention record a foreign span stands for; a ValueError is a rejection."""
        try:
            return convert()
        except ValueError as exc:
            self.refuse(self._ref(0, kind), self.attributes, origin, str(exc))
            return None

    def lost(self, dropped_events: int) -> None:
        """The SDK dropped events of a span with usage events: some usage may be lost."""
        lost = Rejection(
            RejectReason.LOST,
            f"usage records from {self.where} lost: the SDK dropped {dropped_events} events of "
            f"this span (span event limit, {EVENT_LIMIT_SETTING}); those that were "
            f"{sc.USAGE_EVENT_NAME} events are not billed. Spread the usage over several "
            "spans, or raise the limit",
            self.where,
            idempotency_key("span", self.trace_id, self.span_id, "lost"),
        )
        self.rejections.extend([lost] * dropped_events)


def _with_dropped(rejection: Rejection, own: _Own) -> Rejection:
    """An invalid record's rejection, saying the SDK dropped attributes of its layers."""
    dropped = [(t.dropped, what) for _, t, what in own if t.dropped]
    if not dropped or rejection.reason is not RejectReason.INVALID:
        return rejection
    n, what = dropped[0]
    return replace(
        rejection,
        message=f"{rejection.message} (the SDK dropped {n} attributes from this {what}: "
        f"attribute count limit, {_COUNT_SETTINGS[what]})",
    )
