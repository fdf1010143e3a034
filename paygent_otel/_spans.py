"""Extract usage records from a span (SDK ``ReadableSpan`` or one received over OTLP).

A span is a record when its attributes carry ``paygent.usage.kind``; each span event named
``paygent.usage`` is a record of its own. With GenAI mapping on, a span with
``gen_ai.usage.*`` counts and no convention record becomes an STS record. With framework
mappings on (:mod:`paygent_otel.frameworks`), a span of an enabled framework's scope is
billed by that framework's rule alone (never also by the GenAI mapping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import semconv as sc
from ._mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    idempotency_key,
    map_usage,
)

if TYPE_CHECKING:
    from .frameworks import FrameworkSet

__all__ = ["has_usage", "records_from_span"]

Attributes = Mapping[str, Any]


def has_usage(
    attributes: Attributes,
    event_names: Iterable[str],
    genai: bool,
    frameworks: FrameworkSet | None = None,
    scope: str = "",
    span_name: str = "",
) -> bool:
    """Cheap test run on every span: does it carry anything billable?

    ``scope`` (instrumentation scope name) and ``span_name`` matter only with ``frameworks``.
    """
    if sc.USAGE_KIND in attributes:
        return True
    if any(name == sc.USAGE_EVENT_NAME for name in event_names):
        return True
    if frameworks and frameworks.may_bill(scope, span_name):
        return True
    if genai:
        from .genai import has_genai_usage

        return has_genai_usage(attributes)
    return False


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
    frameworks: FrameworkSet | None = None,
    scope: str = "",
) -> tuple[list[UsageRecord], list[Rejection]]:
    """Map every record the span carries. ``trace_id``/``span_id`` are lowercase hex;
    ``scope`` is the span's instrumentation scope name (read with ``frameworks``)."""
    records: list[UsageRecord] = []
    rejections: list[Rejection] = []
    where = f"span {name!r} (trace {trace_id}, span {span_id})"

    def add(
        position: int,
        record: Attributes,
        inherited: tuple[Attributes, ...],
        origin: str,
        defaults: IdentityDefaults = defaults,
    ) -> None:
        kind = record.get(sc.USAGE_KIND)
        key = idempotency_key("span", trace_id, span_id, position, kind)
        result = map_usage(
            record,
            inherited=inherited,
            defaults=defaults,
            key=key,
            origin=origin,
            trace_ids=(trace_id, span_id),
        )
        (records if isinstance(result, UsageRecord) else rejections).append(result)  # type: ignore[arg-type]

    def refuse(origin: str, kind: str, problem: str) -> None:
        key = idempotency_key("span", trace_id, span_id, 0, kind)
        message = f"usage record from {origin} rejected: {problem}"
        rejections.append(Rejection(RejectReason.INVALID, message, origin, key, dict(attributes)))

    def converted(
        convert: Callable[[], dict[str, Any] | None], origin: str, kind: str
    ) -> dict[str, Any] | None:
        """The convention record a foreign span stands for; a ValueError is a rejection."""
        try:
            return convert()
        except ValueError as exc:
            refuse(origin, kind, str(exc))
            return None

    events = list(events)
    # A span with any convention record is billed from it alone: never twice.
    has_events = any(event_name == sc.USAGE_EVENT_NAME for event_name, _ in events)
    known_customer = bool(
        sc.CUSTOMER_ID in attributes or sc.CUSTOMER_ID in resource or defaults.customer_id
    )
    claim = frameworks.claim(scope) if frameworks else None
    if sc.USAGE_KIND in attributes:
        add(0, attributes, (resource,), where)
    elif claim is not None:
        origin = f"{where} ({claim.rule.name} mapping)"
        found = (
            None if has_events else converted(lambda: claim.record(name, attributes), origin, "")
        )
        if found is not None and not known_customer:
            refuse(
                origin,
                found[sc.USAGE_KIND],
                f"{sc.CUSTOMER_ID} is missing: " + claim.rule.missing_customer,
            )
        elif found is not None:
            framework_defaults = (
                replace(defaults, indicator=claim.indicator) if claim.indicator else defaults
            )
            add(0, {**attributes, **found}, (resource,), origin, framework_defaults)
    elif genai and not has_events and known_customer:
        from .genai import genai_record

        origin = where + " (gen_ai.* mapping)"
        found = converted(lambda: genai_record(attributes), origin, sc.UsageKind.STS.value)
        if found is not None:
            add(0, {**attributes, **found}, (resource,), origin)
    for index, (event_name, event_attributes) in enumerate(events, start=1):
        if event_name == sc.USAGE_EVENT_NAME:
            add(index, event_attributes, (attributes, resource), f"{where} event #{index}")
    return records, rejections
