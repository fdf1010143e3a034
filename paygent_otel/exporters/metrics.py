"""Extract usage records from metric points (SDK ``MetricsData`` or OTLP metrics).

Usage instruments are monotonic counters whose *name* is a quantity attribute of the
convention (``paygent.stt.audio.seconds``, ``paygent.sts.input.audio.tokens``, ...) and
whose point attributes carry the identity (agent, customer, indicator, provider, model,
plan, ``paygent.meta.*``). All points of one export interval with the same resource,
attributes and kind form one record: an STS record carries every modality in one call.

Front ends first check each usage stream with :func:`usage_stream_problem` (only monotonic
delta sums with a compatible unit are billed), then hand its points here as
:class:`UsagePoint` objects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import (
    IdentityDefaults,
    Rejection,
    UsageRecord,
    idempotency_key,
    map_usage,
    rejected,
)

__all__ = [
    "OVERFLOW_ATTRIBUTE",
    "WRONG_INSTRUMENT",
    "WRONG_TEMPORALITY",
    "WRONG_UNIT",
    "UsagePoint",
    "is_usage_metric",
    "records_from_points",
    "usage_stream_problem",
    "wrong_instrument_message",
]

OVERFLOW_ATTRIBUTE: Final = "otel.metric.overflow"
"""Attribute of the point an SDK aggregates measurements into once a stream has more
attribute sets in one interval than its cardinality limit (2000 by default)."""

WRONG_INSTRUMENT: Final = "wrong_instrument"
"""Stream problem (and stats counter): a usage name on a gauge, histogram or UpDownCounter."""
WRONG_TEMPORALITY: Final = "wrong_temporality"
"""Stream problem (and stats counter): a usage counter exported as a cumulative sum."""
WRONG_UNIT: Final = "wrong_unit"
"""Stream problem (and stats counter): a usage counter whose unit differs from the name's."""

# Counts are dimensionless: UCUM "1" and any "{annotation}" mean the same thing.
_DIMENSIONLESS = frozenset({"", "1"})


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One delta data point of a usage counter, in a neutral form every front end builds."""

    resource: Mapping[str, Any]
    name: str
    """The instrument name: a key of :data:`paygent_otel.convention.semconv.QUANTITIES`."""
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


def _unit_fits(quantity: sc.Quantity, unit: str) -> bool:
    unit = unit.strip()
    if not unit or unit == quantity.unit.value:
        return True
    return quantity.is_count and (unit in _DIMENSIONLESS or unit.startswith("{"))


def usage_stream_problem(
    name: str, data_type: str, *, unit: str = "", monotonic: bool = False, delta: bool = False
) -> tuple[str, str] | None:
    """Why the points of usage stream ``name`` must not be billed, or None when they may.

    ``data_type`` is the metric's point type in lower case (``"sum"``, ``"gauge"``,
    ``"histogram"``, ``"exponential histogram"``, ...); ``monotonic`` and ``delta`` describe
    a sum. Returns ``(reason, message)`` with reason :data:`WRONG_INSTRUMENT`,
    :data:`WRONG_TEMPORALITY` or :data:`WRONG_UNIT`. An empty unit is accepted (the name
    fixes the unit); for counts, ``1`` and any ``{annotation}`` are too.
    """
    quantity = sc.QUANTITIES[name]
    if data_type != "sum":
        return WRONG_INSTRUMENT, wrong_instrument_message(name, f"a {data_type}")
    if not monotonic:
        return WRONG_INSTRUMENT, wrong_instrument_message(
            name, "a non-monotonic sum (an UpDownCounter)"
        )
    if not delta:
        return WRONG_TEMPORALITY, (
            f"metric {name!r} arrived as a cumulative sum; billing it would charge every "
            f"interval's running total again. Export usage counters with DELTA temporality "
            f"(PaygentMetricExporter asks for it; a reader or pipeline that ignores the "
            f"preference must not feed it). Its points are not billed"
        )
    if not _unit_fits(quantity, unit):
        return WRONG_UNIT, (
            f"metric {name!r} has unit {unit!r} but the convention's unit for it is "
            f"{quantity.unit.value!r}; billing it could be off by a factor. Create the counter "
            f"with unit {quantity.unit.value!r} (or no unit). Its points are not billed"
        )
    return None


def _fingerprint(attributes: Mapping[str, Any]) -> str:
    return json.dumps(sorted(attributes.items()), default=repr, separators=(",", ":"))


def _overflow_rejection(point: UsagePoint, resource_key: str, source: str) -> Rejection:
    key = idempotency_key("metric-overflow", resource_key, point.name, point.start_ns, point.end_ns)
    origin = f"{source} stream {point.name} interval {point.start_ns}..{point.end_ns}"
    return rejected(
        origin,
        f"{point.value} of {point.name} landed in the SDK's overflow point "
        f"({OVERFLOW_ATTRIBUTE}=true): the stream had more attribute sets in one interval than "
        f"the reader's cardinality limit, so this usage cannot be attributed to a customer. "
        f"Raise cardinality_limits on the metric reader or shorten the export interval",
        key,
        {**point.attributes, point.name: point.value},
    )


def _merge_units(record: dict[str, Any]) -> None:
    """Fold a ``...seconds`` stream into its ``...minutes`` twin of the same interval.

    Two counters of one quantity in two units are two sets of measurements to add up, not
    the "conflicting units" of a single span record. A value the mapping would reject is
    left in place so the rejection names it.
    """
    for name in [n for n in record if n in sc.QUANTITIES]:
        quantity = sc.QUANTITIES[name]
        if quantity.unit is not sc.Unit.SECONDS:
            continue
        twin = next(
            q.name
            for q in sc.QUANTITIES.values()
            if q.json_path == quantity.json_path and q.unit is sc.Unit.MINUTES
        )
        seconds, minutes = record[name], record.get(twin)
        if minutes is None or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in (seconds, minutes)
        ):
            continue
        record[twin] = minutes + seconds / 60.0
        del record[name]


def records_from_points(
    points: Iterable[UsagePoint], defaults: IdentityDefaults, *, source: str = "metrics"
) -> tuple[list[UsageRecord], list[Rejection]]:
    """Join points into records (one per resource, attribute set, interval and kind) and map.

    Points join on the interval's *end*: an SDK starts each attribute set's first interval
    at that set's first measurement, so two modalities of one STS session can have
    different starts and still belong to the same export. The record's interval starts at
    the earliest of its points. Zero points are skipped; a point in the SDK's cardinality
    overflow set is rejected (it has no customer). Point attributes named like a quantity
    or like ``paygent.usage.kind`` are ignored: the instrument name says what is measured.
    ``paygent.usage.id`` splits streams like any attribute but is not the record's key.
    """
    groups, rejections = _join(points, source)
    records: list[UsageRecord] = []
    for (resource_key, attr_key, end, kind), group in groups.items():
        record, start = group.record, group.start
        instruments = sorted(n for n in record if n in sc.QUANTITIES)
        ref = idempotency_key("metric", resource_key, ",".join(instruments), attr_key, start, end)
        origin = (
            f"{source} {kind.value} stream {attr_key} interval {start}..{end}"
            f" ({', '.join(instruments)})"
        )
        _merge_units(record)
        result = map_usage(
            record, inherited=(group.resource,), defaults=defaults, ref=ref, origin=origin
        )
        if isinstance(result, UsageRecord):
            records.append(result)
        else:
            rejections.append(result)
    return records, rejections


@dataclass(slots=True)
class _Group:
    """The points of one record: resource, attribute set, interval end and kind."""

    resource: Mapping[str, Any]
    record: dict[str, Any]
    """The identity attributes, the kind and each quantity's sum."""
    start: int
    """The earliest start of the group's points."""


_GroupKey = tuple[str, str, int, sc.UsageKind]
"""(resource fingerprint, attributes fingerprint, interval end, kind)."""


def _join(
    points: Iterable[UsagePoint], source: str
) -> tuple[dict[_GroupKey, _Group], list[Rejection]]:
    """Group the non-zero points into records; points in the overflow set are rejected."""
    groups: dict[_GroupKey, _Group] = {}
    rejections: list[Rejection] = []
    for point in points:
        if not point.value:
            continue  # nothing used in this interval for this stream
        quantity = sc.QUANTITIES[point.name]
        resource_key = _fingerprint(point.resource)
        if point.attributes.get(OVERFLOW_ATTRIBUTE) is True:
            rejections.append(_overflow_rejection(point, resource_key, source))
            continue
        identity = {
            k: v
            for k, v in point.attributes.items()
            if k not in sc.QUANTITIES and k != sc.USAGE_KIND
        }
        group_key = (resource_key, _fingerprint(identity), point.end_ns, quantity.kind)
        group = groups.get(group_key)
        if group is None:
            # A point sums an interval's measurements: one usage id cannot name it, and its
            # interval already keys it. The id only tells streams apart, like any attribute.
            identity.pop(sc.USAGE_ID, None)
            record = {**identity, sc.USAGE_KIND: quantity.kind.value}
            group = groups[group_key] = _Group(point.resource, record, point.start_ns)
        group.start = min(group.start, point.start_ns)
        # Several scopes (meters) may each have a counter of this name: their usage adds up.
        group.record[point.name] = group.record.get(point.name, 0) + point.value
    return groups, rejections
