"""Extract usage records from metric points (SDK ``MetricsData`` or OTLP metrics).

Usage instruments are monotonic counters whose *name* is a quantity attribute of the
convention (``paygent.stt.audio.seconds``, ``paygent.sts.input.audio.tokens``, ...) and
whose point attributes carry the identity (agent, customer, indicator, provider, model,
plan, ``paygent.meta.*``). All points of one export interval with the same resource,
attributes and kind form one record: an STS record carries every modality in one call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import semconv as sc
from ._mapping import IdentityDefaults, Rejection, UsageRecord, idempotency_key, map_usage

__all__ = ["UsagePoint", "is_usage_metric", "records_from_points", "wrong_instrument_message"]


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One delta data point of a usage counter, in a neutral form every front end builds."""

    resource: Mapping[str, Any]
    name: str
    """The instrument name: a key of :data:`paygent_otel.semconv.QUANTITIES`."""
    attributes: Mapping[str, Any]
    start_ns: int
    end_ns: int
    value: int | float


def is_usage_metric(name: str) -> bool:
    """True when ``name`` is one of the convention's usage instruments."""
    return name in sc.QUANTITIES


def wrong_instrument_message(name: str, found: str) -> str:
    """The error for a usage name on something other than a monotonic delta sum."""
    return (
        f"metric {name!r} is a Paygent usage instrument but arrived as {found}; usage must be "
        f"recorded with a Counter (a monotonic sum). Its points are not billed"
    )


def _fingerprint(attributes: Mapping[str, Any]) -> str:
    return json.dumps(sorted(attributes.items()), default=repr, separators=(",", ":"))


def records_from_points(
    points: Iterable[UsagePoint], defaults: IdentityDefaults, *, source: str = "metrics"
) -> tuple[list[UsageRecord], list[Rejection]]:
    """Join points into records (one per resource, attribute set, interval and kind) and map."""
    groups: dict[tuple[str, str, int, int, sc.UsageKind], dict[str, Any]] = {}
    resources: dict[str, Mapping[str, Any]] = {}
    for point in points:
        if not point.value:
            continue  # nothing used in this interval for this stream
        quantity = sc.QUANTITIES[point.name]
        resource_key = _fingerprint(point.resource)
        resources[resource_key] = point.resource
        group_key = (
            resource_key,
            _fingerprint(point.attributes),
            point.start_ns,
            point.end_ns,
            quantity.kind,
        )
        record = groups.get(group_key)
        if record is None:
            record = groups[group_key] = {
                **point.attributes,
                sc.USAGE_KIND: quantity.kind.value,
            }
        record[point.name] = record.get(point.name, 0) + point.value

    records: list[UsageRecord] = []
    rejections: list[Rejection] = []
    for (resource_key, attr_key, start, end, kind), record in groups.items():
        instruments = sorted(n for n in record if n in sc.QUANTITIES)
        key = idempotency_key("metric", resource_key, ",".join(instruments), attr_key, start, end)
        origin = (
            f"{source} {kind.value} stream {attr_key} interval {start}..{end}"
            f" ({', '.join(instruments)})"
        )
        result = map_usage(
            record, inherited=(resources[resource_key],), defaults=defaults, key=key, origin=origin
        )
        if isinstance(result, UsageRecord):
            records.append(result)
        else:
            rejections.append(result)
    return records, rejections
