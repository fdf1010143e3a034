"""The one mapping from convention attributes to Paygent ``/api/v2/usage`` documents.

Every front end (spans, span events, metric points, OTLP logs and spans received by the
bridge) only *extracts* attribute sets and hands them here; this module alone decides what
a valid record is and what JSON it becomes. The JSON is the document ``paygent-sdk`` 4.9.7
sends for the same usage (see ``docs/semantic-conventions.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paygent_otel.convention import semconv as sc

__all__ = [
    "MAX_COUNT",
    "MAX_META_TAGS",
    "MAX_MINUTES",
    "MAX_USAGE_ID_LENGTH",
    "REF_DIGITS",
    "IdentityDefaults",
    "RejectReason",
    "Rejection",
    "UsageRecord",
    "canonical_json",
    "conflict_rejection",
    "idempotency_key",
    "map_usage",
    "rejected",
    "rejection_key",
    "source_layer",
    "validate_quantities",
]

MAX_MINUTES = 100_000.0
"""Largest time quantity accepted in one record, in minutes (about 69 days).

A larger value is far likelier a unit mistake (milliseconds sent as seconds) than real use."""

MAX_COUNT = 10_000_000_000
"""Largest token or character count accepted in one record (well under 2**53)."""

MAX_META_TAGS = 20
"""Paygent's (and the SDK's) limit on metaTags entries."""

MAX_USAGE_ID_LENGTH = 256
"""Longest ``paygent.usage.id`` accepted (after stripping)."""

REF_DIGITS = 20
"""Hex digits at the start of a record key that name the record's ref (80 bits)."""

_MAX_META_KEY_LEN = 64
_MAX_META_VALUE_LEN = 256
_META_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]+$")

TRACE_ID_TAG = "otel_trace_id"
"""metaTags key that carries the record's trace id (when trace tags are on)."""
SPAN_ID_TAG = "otel_span_id"
"""metaTags key that carries the record's span id (when trace tags are on)."""

AttributeValue = Any
Attributes = Mapping[str, AttributeValue]


class RejectReason(StrEnum):
    """Why a usage record was not turned into a tracking call."""

    INVALID = "invalid"
    """It breaks a rule of the convention; counted, logged and dead-lettered."""
    ZERO = "zero"
    """All its quantities are zero; skipped, as the SDK skips them."""
    LOST = "lost"
    """The sender's SDK dropped it before export (span event limit); counted and logged."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One valid usage record: one ``POST /api/v2/usage``."""

    idempotency_key: str
    """Sent as ``Idempotency-Key``: 40 hex digits, the first :data:`REF_DIGITS` a digest of
    :attr:`ref`, the rest a digest of the ref and the usage. Stable across retries, never
    the key of two different usages, and records of one ref share its start."""
    payload: dict[str, Any]
    """The JSON document, identical to the one ``paygent-sdk`` sends."""
    origin: str
    """Where the record came from, for logs (span name and ids, metric stream, ...)."""
    warnings: tuple[str, ...] = ()
    """Problems that did not stop the record (for example invalid meta tags dropped)."""
    ref: str = ""
    """What the record is, without its usage: the telemetry that carried it (trace and span
    ids and position, metric stream and interval, log record) or its ``paygent.usage.id``.
    The spool refuses a second record with the same ref and different usage. Empty: the
    record was not made by :func:`map_usage`, its key is all there is."""
    aliases: tuple[str, ...] = ()
    """Keys paygent-otel 0.1.0 gave the same record; one held under them (pending or
    delivered) is this record."""

    @property
    def ref_key(self) -> str:
        """The start of the key that names the ref (the whole key, without a ref)."""
        return self.idempotency_key[:REF_DIGITS] if self.ref else self.idempotency_key


@dataclass(frozen=True, slots=True)
class Rejection:
    """A usage record that is not sent, with the reason and the rule it broke."""

    reason: RejectReason
    message: str
    """Names the origin, the attribute and the rule."""
    origin: str
    idempotency_key: str
    attributes: dict[str, Any] = field(default_factory=dict)
    """The record's own attributes, kept for the dead-letter table."""


@dataclass(frozen=True, slots=True)
class IdentityDefaults:
    """Exporter-level defaults, the last step of identity resolution.

    Not a :class:`~paygent_otel.Identity`: that is what one conversation's records say
    about who pays and how the usage is priced, given when usage is recorded, and it wins
    over these. These are an exporter's settings (``PAYGENT_AGENT_ID``, ...): fallbacks for
    the agent, customer and indicator only (pricing is never defaulted), plus the switch
    for trace-id meta tags."""

    agent_id: str | None = None
    customer_id: str | None = None
    indicator: str | None = None
    trace_tags: bool = True
    """Attach the trace and span ids as metaTags (when the front end has them)."""


class _Invalid(Exception):
    def __init__(self, attribute: str, rule: str) -> None:
        super().__init__(f"{attribute}: {rule}")
        self.attribute = attribute
        self.rule = rule


def idempotency_key(*parts: object) -> str:
    """A stable key for one record, from what identifies it (never random per attempt)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:40]


def canonical_json(value: object) -> str:
    """JSON independent of key order (values that are not JSON by their ``repr``)."""
    return json.dumps(
        value, sort_keys=True, default=repr, separators=(",", ":"), ensure_ascii=False
    )


_USAGE_ID_REF = "usage-id:"


def rejection_key(ref: str, attributes: Attributes) -> str:
    """The dead-letter key of an invalid record: never the key of a valid record, so a
    corrected record sent again is not taken for the invalid one."""
    return idempotency_key("invalid", ref, canonical_json(dict(attributes)))


def rejected(origin: str, problem: str, key: str, attributes: Attributes) -> Rejection:
    """The :class:`Rejection` of an invalid record from ``origin``, worded as every front end
    words it (``usage record from <origin> rejected: <problem>``); ``key`` is its
    dead-letter key (:func:`rejection_key` unless the front end has a better one)."""
    return Rejection(
        RejectReason.INVALID,
        f"usage record from {origin} rejected: {problem}",
        origin,
        key,
        dict(attributes),
    )


def conflict_rejection(record: UsageRecord, held: str) -> Rejection:
    """``record`` refused: a record with its ref and different usage is ``held``
    (``"pending"`` or ``"delivered"``)."""
    verb = "is waiting for delivery" if held == "pending" else "was billed"
    if record.ref.startswith(_USAGE_ID_REF):
        what = f"{sc.USAGE_ID} {record.ref.removeprefix(_USAGE_ID_REF)!r}"
        advice = "give separate usages separate ids"
    else:
        what = "the same telemetry (trace, span and position, log record or metric interval)"
        advice = "was it sent again after its attributes or the exporter's defaults changed?"
    return Rejection(
        RejectReason.INVALID,
        f"usage record from {record.origin} refused: a record with {what} {verb} with "
        f"different usage, so this one is not billed: {advice}",
        record.origin,
        record.idempotency_key,
        record.payload,
    )


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(q: sc.Quantity, value: object) -> float | int:
    """Validate one quantity; return it in Paygent's unit (minutes or a count)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(q.name, f"must be a number, got {type(value).__name__} {_describe(value)}")
    # Python ints are unbounded (OpenTelemetry accepts 10**400 as an attribute) and float()
    # of one that large raises OverflowError: compare ints as ints, never convert them first.
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(q.name, f"must be finite, got {value}")
    if value < 0:
        raise _Invalid(q.name, f"must not be negative, got {_describe(value)}")
    if q.is_count:
        if value > MAX_COUNT:
            raise _Invalid(q.name, f"{_describe(value)} exceeds the limit of {MAX_COUNT}")
        if isinstance(value, float):
            if not value.is_integer():
                raise _Invalid(q.name, f"must be a whole number of {q.unit.value}, got {value}")
            value = int(value)
        return value
    limit = MAX_MINUTES * 60.0 if q.unit is sc.Unit.SECONDS else MAX_MINUTES
    if value > limit:
        raise _Invalid(
            q.name,
            f"{_describe(value)} {q.unit.value} exceeds the limit of {MAX_MINUTES:g} minutes",
        )
    return float(value) / 60.0 if q.unit is sc.Unit.SECONDS else float(value)


def validate_quantities(kind: sc.UsageKind, attributes: Attributes) -> dict[str, Any]:
    """Check a record's quantities and return its ``rawUsage`` quantity fields.

    Raises ``ValueError`` naming the attribute and the rule. An empty result means every
    quantity given was zero (the record is skipped, as the SDK skips it).
    """
    try:
        return _quantities(kind, attributes)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _quantities(kind: sc.UsageKind, attributes: Attributes) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    seen_paths: dict[tuple[str, ...], str] = {}
    present = False
    for name, value in attributes.items():
        q = sc.QUANTITIES.get(name)
        if q is None:
            continue
        if q.kind is not kind:
            raise _Invalid(
                name, f"is a {q.kind.value} quantity, not allowed on a {kind.value} record"
            )
        if q.json_path in seen_paths:
            raise _Invalid(
                name, f"conflicting units: {seen_paths[q.json_path]} is set too; set only one"
            )
        seen_paths[q.json_path] = name
        present = True
        amount = _number(q, value)
        if amount:
            _put(raw, q.json_path, amount)
    if not present:
        names = [q.name for q in sc.QUANTITIES.values() if q.kind is kind]
        expected = (
            "one of " + ", ".join(names)
            if len(names) <= 3
            else f"a paygent.{kind.value}.* attribute"
        )
        raise _Invalid(sc.USAGE_KIND, f"a {kind.value} record needs a quantity ({expected})")
    if kind is sc.UsageKind.STS and raw:
        cached = raw[_UM].get("cached", {})
        if "tokens" in cached and len(cached) > 1:
            raise _Invalid(
                sc.STS_CACHED_TOKENS,
                "the undivided cached count and per-modality cached counts are never sent together",
            )
        raw[_UM] = {"schemaVersion": 1, **raw[_UM]}
    return raw


_UM = "usageMetadata"


def _put(raw: dict[str, Any], path: tuple[str, ...], value: float | int) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _text(attribute: str, value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(
            attribute, f"must be a string, got {type(value).__name__} {_describe(value)}"
        )
    return value.strip()


def _meta_tags(layers: Sequence[Attributes]) -> tuple[dict[str, str], str | None]:
    """User meta tags, later layers winning per key; (tags, why they were dropped)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.items():
            if name.startswith(sc.META_PREFIX):
                merged[name[len(sc.META_PREFIX) :]] = value
    if not merged:
        return {}, None
    if len(merged) > MAX_META_TAGS:
        return {}, f"{len(merged)} meta tags exceed the limit of {MAX_META_TAGS}"
    tags: dict[str, str] = {}
    for raw_key, raw_value in merged.items():
        key = raw_key.strip()
        attribute = sc.META_PREFIX + raw_key
        if not key or len(key) > _MAX_META_KEY_LEN or not _META_KEY_RE.match(key):
            return {}, f"{attribute}: key must be 1-64 characters of A-Z a-z 0-9 _ -"
        if isinstance(raw_value, list | tuple):
            return {}, f"{attribute}: value must be a single value, not a list"
        value = str(raw_value).strip()
        if len(value) > _MAX_META_VALUE_LEN:
            return {}, f"{attribute}: value longer than {_MAX_META_VALUE_LEN} characters"
        tags[key] = value
    return tags, None


def source_layer(name: str, layers: Sequence[Attributes]) -> int | None:
    """Index of the first layer (most specific first) that sets ``name``; None if none does."""
    for index, layer in enumerate(layers):
        if name in layer:
            return index
    return None


def _resolve(name: str, layers: Sequence[Attributes], default: str | None) -> object:
    """The first layer (most specific first) that sets ``name``, else the default."""
    index = source_layer(name, layers)
    return default if index is None else layers[index][name]


def _usage_ref(record: Attributes) -> str | None:
    """The ref named by the record's own ``paygent.usage.id``, if it carries one."""
    if sc.USAGE_ID not in record:
        return None
    usage_id = _text(sc.USAGE_ID, record[sc.USAGE_ID])
    if not usage_id or len(usage_id) > MAX_USAGE_ID_LENGTH:
        raise _Invalid(
            sc.USAGE_ID, f"must be a non-blank string of at most {MAX_USAGE_ID_LENGTH} characters"
        )
    return _USAGE_ID_REF + usage_id


def map_usage(
    record: Attributes,
    *,
    inherited: Sequence[Attributes] = (),
    defaults: IdentityDefaults = IdentityDefaults(),
    ref: str,
    origin: str,
    trace_ids: tuple[str, str] | None = None,
    aliases: tuple[str, ...] = (),
) -> UsageRecord | Rejection:
    """Turn one record's attributes into a :class:`UsageRecord` or a :class:`Rejection`.

    ``inherited`` holds the layers the record inherits identity, pricing and meta tags from,
    most specific first (for a span event: the span's attributes, then the resource's).
    ``ref`` identifies the telemetry that carried the record (stable across re-sends);
    the record's own ``paygent.usage.id`` replaces it when set, and the record's key is
    made of a digest of the ref and a digest of the ref and the usage. ``aliases`` are the
    keys an earlier version gave it.
    ``trace_ids`` (trace id, span id as hex) become metaTags when ``defaults.trace_tags``.
    """
    try:
        explicit = _usage_ref(record)
        if explicit is not None:
            ref, aliases = explicit, (ref, *aliases)
        return _map(record, inherited, defaults, ref, aliases, origin, trace_ids)
    except _Invalid as exc:
        return rejected(origin, f"{exc.attribute} {exc.rule}", rejection_key(ref, record), record)


def _map(
    record: Attributes,
    inherited: Sequence[Attributes],
    defaults: IdentityDefaults,
    ref: str,
    aliases: tuple[str, ...],
    origin: str,
    trace_ids: tuple[str, str] | None,
) -> UsageRecord | Rejection:
    kind_value = _text(sc.USAGE_KIND, record.get(sc.USAGE_KIND)).lower()
    try:
        kind = sc.UsageKind(kind_value)
    except ValueError:
        raise _Invalid(
            sc.USAGE_KIND, f"unknown usage kind {kind_value!r} (expected stt, tts or sts)"
        ) from None
    quantities = _quantities(kind, record)
    if not quantities:
        return Rejection(
            RejectReason.ZERO,
            f"usage record from {origin} skipped: every quantity is zero",
            origin,
            rejection_key(ref, record),
            dict(record),
        )
    layers = (record, *inherited)
    agent_id, customer_id, indicator = _payer(layers, defaults)
    provider, model, plan = _pricing(layers)

    payload: dict[str, Any] = {
        "agentId": agent_id,
        "customerId": customer_id,
        "indicator": indicator,
        "rawUsage": {"provider": provider, "model": model, "plan": plan, **quantities},
    }
    tags, dropped = _meta_tags(tuple(reversed(layers)))
    warnings: tuple[str, ...] = ()
    if dropped:
        warnings = (f"usage record from {origin}: metaTags dropped (usage still sent): {dropped}",)
    if tags:
        payload["metaTags"] = dict(tags)
    # The usage, before the trace links: a retried job in a new trace is the same usage.
    usage = canonical_json(payload)
    if trace_ids is not None and defaults.trace_tags:
        for tag, value in zip((TRACE_ID_TAG, SPAN_ID_TAG), trace_ids, strict=True):
            if len(tags) < MAX_META_TAGS and tag not in tags:
                tags[tag] = value
    if tags:
        payload["metaTags"] = tags
    key = idempotency_key("ref", ref)[:REF_DIGITS] + idempotency_key(ref, usage)[REF_DIGITS:]
    return UsageRecord(key, payload, origin, warnings, ref, aliases)


def _payer(layers: Sequence[Attributes], defaults: IdentityDefaults) -> tuple[str, str, str]:
    """Agent id, customer id and indicator, resolved through the layers, then defaults."""
    agent_id = _text(sc.AGENT_ID, _resolve(sc.AGENT_ID, layers, defaults.agent_id) or "")
    customer_id = _text(
        sc.CUSTOMER_ID, _resolve(sc.CUSTOMER_ID, layers, defaults.customer_id) or ""
    )
    if not agent_id:
        raise _Invalid(
            sc.AGENT_ID,
            "is missing or blank (set it on the record, span, resource or PAYGENT_AGENT_ID)",
        )
    if not customer_id:
        raise _Invalid(
            sc.CUSTOMER_ID, "is missing or blank (set it on the record, span, resource or baggage)"
        )
    indicator = _text(sc.INDICATOR, _resolve(sc.INDICATOR, layers, defaults.indicator) or "")
    return agent_id, customer_id, indicator


def _pricing(layers: Sequence[Attributes]) -> tuple[str, str, str]:
    """Provider, model and plan (``default`` when none is set), resolved through the layers."""
    provider = _text(sc.PROVIDER, _resolve(sc.PROVIDER, layers, None) or "")
    model = _text(sc.MODEL, _resolve(sc.MODEL, layers, None) or "")
    if not provider:
        raise _Invalid(sc.PROVIDER, "is missing or blank (Paygent cannot price the record)")
    if not model:
        raise _Invalid(sc.MODEL, "is missing or blank (Paygent cannot price the record)")
    plan = _text(sc.PLAN, _resolve(sc.PLAN, layers, None) or "") or "default"
    return provider, model, plan
