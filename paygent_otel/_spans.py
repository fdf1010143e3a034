"""Extract usage records from a span (SDK ``ReadableSpan`` or one received over OTLP).

A span is a record when its attributes carry ``paygent.usage.kind``; each span event named
``paygent.usage`` is a record of its own. With GenAI mapping on, a span with
``gen_ai.usage.*`` counts and no convention record becomes an STS record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import semconv as sc
from ._mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    idempotency_key,
    map_usage,
)

__all__ = ["has_usage", "records_from_span"]

Attributes = Mapping[str, Any]


def has_usage(attributes: Attributes, event_names: Iterable[str], genai: bool) -> bool:
    """Cheap test run on every span: does it carry anything billable?"""
    if sc.USAGE_KIND in attributes:
        return True
    if any(name == sc.USAGE_EVENT_NAME for name in event_names):
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
) -> tuple[list[UsageRecord], list[Rejection]]:
    """Map every record the span carries. ``trace_id``/``span_id`` are lowercase hex."""
    records: list[UsageRecord] = []
    rejections: list[Rejection] = []
    where = f"span {name!r} (trace {trace_id}, span {span_id})"

    def add(
        position: int, record: Attributes, inherited: tuple[Attributes, ...], origin: str
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

    events = list(events)
    if sc.USAGE_KIND in attributes:
        add(0, attributes, (resource,), where)
    elif (
        genai
        # A span with any convention record is billed from it alone: never twice.
        and not any(event_name == sc.USAGE_EVENT_NAME for event_name, _ in events)
        and (sc.CUSTOMER_ID in attributes or sc.CUSTOMER_ID in resource or defaults.customer_id)
    ):
        from .genai import genai_record

        origin = where + " (gen_ai.* mapping)"
        try:
            converted = genai_record(attributes)
        except ValueError as exc:
            key = idempotency_key("span", trace_id, span_id, 0, sc.UsageKind.STS.value)
            rejections.append(
                Rejection(
                    RejectReason.INVALID,
                    f"usage record from {origin} rejected: {exc}",
                    origin,
                    key,
                    dict(attributes),
                )
            )
        else:
            if converted is not None:
                add(0, {**attributes, **converted}, (resource,), origin)
    for index, (event_name, event_attributes) in enumerate(events, start=1):
        if event_name == sc.USAGE_EVENT_NAME:
            add(index, event_attributes, (attributes, resource), f"{where} event #{index}")
    return records, rejections
