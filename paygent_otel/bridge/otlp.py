"""OTLP/HTTP on the wire: request bodies in, usage records out, responses back.

This module only *extracts*: it decodes ``Export*ServiceRequest`` messages (protobuf or
OTLP/JSON, plain or gzip/deflate) and hands each span, metric point and log record to the
same functions the SDK exporters use (:func:`paygent_otel.exporters.spans.records_from_span`,
:func:`paygent_otel.exporters.metrics.records_from_points`,
:func:`paygent_otel.convention.mapping.map_usage`),
which decide what a valid record is. It never touches HTTP or the spool.

Log records: a log record whose attributes carry ``paygent.usage.kind`` is one usage
record; it inherits identity and pricing from its resource. What identifies it (its ref)
is a canonical digest of its ``paygent.*`` attributes (sorted: a Collector's parser emits
them in no fixed order), its body, its timestamp and its trace and span ids; not the
observed time (a re-read of the same line changes it), not the other attributes a
Collector may add. Its ``paygent.usage.id``, when set, replaces all that.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from paygent_otel.bridge.cumulative import CumulativePoint, CumulativeStore, StreamUpdate
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.frameworks import FrameworkSet
from paygent_otel.convention.mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    canonical_json,
    idempotency_key,
    map_usage,
    rejected,
    rejection_key,
)
from paygent_otel.exporters.metrics import UsagePoint, records_from_points, usage_stream_problem
from paygent_otel.exporters.spans import (
    EVENT_LIMIT_SETTING,
    Truncation,
    has_usage,
    records_from_span,
)

__all__ = [
    "JSON_CONTENT_TYPE",
    "LOGS_PATH",
    "METRICS_PATH",
    "PROTOBUF_CONTENT_TYPE",
    "SIGNAL_PATHS",
    "TRACES_PATH",
    "BodyTooLarge",
    "Extraction",
    "InvalidRequest",
    "Signal",
    "UnsupportedEncoding",
    "UsageExtractor",
    "count_items",
    "decode_request",
    "decompress",
    "encode_response",
    "encode_status",
]

TRACES_PATH: Final = "/v1/traces"
"""OTLP/HTTP path of trace export requests (the Collector's ``otlphttp`` default)."""
METRICS_PATH: Final = "/v1/metrics"
"""OTLP/HTTP path of metric export requests."""
LOGS_PATH: Final = "/v1/logs"
"""OTLP/HTTP path of log export requests."""
PROTOBUF_CONTENT_TYPE: Final = "application/x-protobuf"
"""Binary protobuf encoding (what Collectors and SDK exporters send by default)."""
JSON_CONTENT_TYPE: Final = "application/json"
"""OTLP/JSON encoding (trace and span ids as hex strings)."""

_PAYGENT_PREFIX: Final = "paygent."
_GENAI_PREFIX: Final = "gen_ai."
_LIMITED_PREFIXES: Final = (_PAYGENT_PREFIX, "gen_ai.provider.", "gen_ai.request.model")
"""What the length limit checks on a framework's span: what can reach the payload."""
_MAX_MESSAGES: Final = 5
"""Distinct rejection messages quoted in one partial_success message."""
_NO_RECORDED_VALUE: Final = metrics_pb2.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
_DELTA: Final = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
_CUMULATIVE: Final = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE


class Signal(StrEnum):
    """The three OTLP signals the bridge receives."""

    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"

    @property
    def item_name(self) -> str:
        """What one item of this signal is called in messages."""
        return _ITEM_NAMES[self]


_ITEM_NAMES = {Signal.TRACES: "spans", Signal.METRICS: "data points", Signal.LOGS: "log records"}

SIGNAL_PATHS: Final[dict[Signal, str]] = {
    Signal.TRACES: TRACES_PATH,
    Signal.METRICS: METRICS_PATH,
    Signal.LOGS: LOGS_PATH,
}
"""The URL path the bridge serves for each signal."""

_REQUESTS: Final[dict[Signal, Callable[[], Message]]] = {
    Signal.TRACES: trace_service_pb2.ExportTraceServiceRequest,
    Signal.METRICS: metrics_service_pb2.ExportMetricsServiceRequest,
    Signal.LOGS: logs_service_pb2.ExportLogsServiceRequest,
}
_RESPONSES: Final[dict[Signal, Callable[[], Message]]] = {
    Signal.TRACES: trace_service_pb2.ExportTraceServiceResponse,
    Signal.METRICS: metrics_service_pb2.ExportMetricsServiceResponse,
    Signal.LOGS: logs_service_pb2.ExportLogsServiceResponse,
}
_REJECTED_FIELDS: Final = {
    Signal.TRACES: "rejected_spans",
    Signal.METRICS: "rejected_data_points",
    Signal.LOGS: "rejected_log_records",
}


# --------------------------------------------------------------------------- body decoding


class InvalidRequest(ValueError):
    """The body is not a valid export request (answered 400)."""


class BodyTooLarge(ValueError):
    """A size limit was exceeded (answered 413)."""


class UnsupportedEncoding(ValueError):
    """A ``Content-Encoding`` the bridge does not decode (answered 415)."""


_INPUT_STEP: Final = 16 << 10
"""Compressed bytes fed to zlib at a time (each call's output is capped separately)."""
_MEMBER_INPUT_STEP: Final = 512
"""Input step once a body turned out to hold several gzip members: zlib copies the input it
did not use at the end of a member, so a short step keeps tiny members linear in time."""
_OUTPUT_STEP: Final = 256 << 10
"""Most bytes inflated by one zlib call: memory is reserved from the budget step by step."""


def decompress(
    body: bytes, encoding: str, limit: int, reserve: Callable[[int], None] | None = None
) -> bytes | bytearray:
    """Undo ``Content-Encoding`` (``gzip``, ``deflate`` or none), never past ``limit`` bytes.

    The output grows at most :data:`_OUTPUT_STEP` bytes at a time and is not copied at the
    end, so a gzip bomb costs at most ``limit`` plus one step before it is refused.
    ``reserve(n)`` is called before the output grows by ``n`` bytes (a shared memory budget:
    it raises to stop). Time is linear in the body for any number of gzip members.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)"
        )
    return _inflate(body, encoding, wbits, limit, reserve)


def _inflate(
    body: bytes, encoding: str, wbits: int, limit: int, reserve: Callable[[int], None] | None
) -> bytearray:
    """The loop of :func:`decompress`: zlib streams (gzip members) one after another."""
    out = bytearray()
    view = memoryview(body)
    position, step = 0, _INPUT_STEP
    inflater = zlib.decompressobj(wbits)
    pending: bytes | memoryview = b""
    in_member = False
    try:
        while True:
            if not pending:
                if position >= len(view):
                    break
                pending = view[position : position + step]
                position += len(pending)
            in_member = True
            chunk = inflater.decompress(pending, min(limit + 1 - len(out), _OUTPUT_STEP))
            if chunk:
                if reserve is not None:
                    reserve(len(chunk))
                out += chunk
                if len(out) > limit:
                    raise BodyTooLarge(
                        f"the decompressed body exceeds the limit of {limit} bytes "
                        "(--max-decompressed-bytes)"
                    )
            if inflater.eof:
                # A gzip stream may hold several members; each needs a fresh decompressor.
                pending, in_member = inflater.unused_data, False
                inflater = zlib.decompressobj(wbits)
                step = _MEMBER_INPUT_STEP
            else:
                pending = inflater.unconsumed_tail
    except BaseException as exc:
        # The traceback keeps this frame alive, and with it the buffer: free the bytes now,
        # before the caller gives their share of the memory budget back.
        out.clear()
        if isinstance(exc, zlib.error):
            raise InvalidRequest(f"the body is not valid {encoding}: {exc}") from None
        raise
    if in_member:
        raise InvalidRequest(f"the {encoding} body is truncated")
    return out


_ID_FIELDS: Final = frozenset(
    {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
)


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    raw = bytes.fromhex(value)
                except ValueError:
                    raise InvalidRequest(f"{key} {value[:40]!r} is not a hex string") from None
                node[key] = base64.b64encode(raw).decode("ascii")
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def decode_request(signal: Signal, body: bytes | bytearray, *, json_encoded: bool) -> Any:
    """Parse an ``Export*ServiceRequest`` from protobuf or OTLP/JSON bytes."""
    message = _REQUESTS[signal]()
    if json_encoded:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("the JSON body is nested too deeply") from None
        if not isinstance(document, dict):
            raise InvalidRequest("the body must be a JSON object")
        try:
            _hex_ids_to_base64(document)
            json_format.ParseDict(document, message, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            raise InvalidRequest(f"the body is not an OTLP/JSON {signal} request: {exc}") from None
    else:
        try:
            message.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise InvalidRequest(
                f"the body is not an OTLP protobuf {signal} request: {exc}"
            ) from None
    return message


def _encode(message: Message, json_encoded: bool) -> bytes:
    if json_encoded:
        text: str = json_format.MessageToJson(message, indent=None)
        return text.encode()
    return bytes(message.SerializeToString())


def encode_response(signal: Signal, rejected: int, message: str, *, json_encoded: bool) -> bytes:
    """An ``Export*ServiceResponse``; ``partial_success`` set when there is anything to say."""
    response = _RESPONSES[signal]()
    if rejected or message:
        partial = response.partial_success
        setattr(partial, _REJECTED_FIELDS[signal], rejected)
        partial.error_message = message
    return _encode(response, json_encoded)


def encode_status(code: int, message: str, *, json_encoded: bool) -> bytes:
    """A ``google.rpc.Status`` body, as OTLP/HTTP prescribes for error responses."""
    return _encode(status_pb2.Status(code=code, message=message), json_encoded)


def count_items(signal: Signal, request: Any) -> int:
    """Spans, data points or log records in a request (cheap: no attribute is read)."""
    if signal is Signal.TRACES:
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    if signal is Signal.LOGS:
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    total = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is not None:
                    total += len(getattr(metric, kind).data_points)
    return total


# --------------------------------------------------------------------------- attributes


def _value(value: Any) -> Any:
    """An ``AnyValue`` as the Python value the SDK would hold (lists, dicts, scalars)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(key_values: Iterable[Any], prefixes: tuple[str, ...] | None) -> dict[str, Any]:
    """Attributes as a dict; only keys with one of ``prefixes`` when given (cheap skip)."""
    if prefixes is None:
        return {kv.key: _value(kv.value) for kv in key_values}
    out: dict[str, Any] = {}
    for kv in key_values:
        key = kv.key
        if key.startswith(prefixes):
            out[key] = _value(kv.value)
    return out


def _too_long(attributes: Mapping[str, Any], limit: int) -> str | None:
    """The first attribute whose key or (string) value is longer than ``limit``, described."""
    for key, value in attributes.items():
        if len(key) > limit:
            return f"attribute key {key[:40]!r}... is {len(key)} characters, over {limit}"
        if not isinstance(value, str | bytes | list):
            continue
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str | bytes) and len(item) > limit:
                return (
                    f"attribute {key} is {len(item)} characters long, over the limit of "
                    f"{limit} (--max-attribute-length)"
                )
    return None


def _clipped(attributes: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """Attributes for a dead letter: over-long values cut, so a person can still see them."""
    return {
        key[:limit]: value[:limit] + "..."
        if isinstance(value, str) and len(value) > limit
        else value
        for key, value in attributes.items()
    }


def _fingerprint(message: Message) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def _serialized_log_key(resource_digest: str, log: Any) -> str:
    """The key paygent-otel 0.1.0 gave a log record: a digest of its serialized bytes,
    attribute order included. Kept as an alias while delivered keys of that scheme can
    still be in a spool (24 h after the upgrade); remove it after."""
    identity = logs_pb2.LogRecord()
    identity.CopyFrom(log)
    identity.observed_time_unix_nano = 0
    return idempotency_key("log", resource_digest, _fingerprint(identity))


def _attribute_fingerprint(attributes: Mapping[str, Any]) -> str:
    """Independent of attribute order, which no sender promises to keep."""
    text = json.dumps(sorted(attributes.items()), default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- extraction


@dataclass(slots=True)
class Extraction:
    """The usage records found in one request, and what was wrong with the rest."""

    signal: Signal
    records: list[UsageRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    """Invalid records (dead-lettered) and all-zero records (skipped, as the SDK does)."""
    rejected_items: int = 0
    """Spans, data points or log records with at least one invalid usage record."""
    updates: list[StreamUpdate] = field(default_factory=list)
    """Cumulative-stream positions to commit once the records are in the spool."""

    def add(self, records: Sequence[UsageRecord], rejections: Sequence[Rejection]) -> bool:
        """Add one item's results; True when any of its records was invalid."""
        self.records.extend(records)
        self.rejections.extend(rejections)
        return any(r.reason is RejectReason.INVALID for r in rejections)

    def refuse(self, conflicts: Sequence[Rejection]) -> None:
        """Records the spool refused after all (another record with their ref and different
        usage is pending or billed): invalid, each counted as one rejected item."""
        keys = {c.idempotency_key for c in conflicts}
        self.records[:] = [r for r in self.records if r.idempotency_key not in keys]
        self.rejections.extend(conflicts)
        self.rejected_items += len(conflicts)

    @property
    def invalid(self) -> list[Rejection]:
        """The rejections that break a rule (not the all-zero ones)."""
        return [r for r in self.rejections if r.reason is RejectReason.INVALID]

    def message(self) -> str:
        """The partial_success message: how many, and the rules broken (a few, verbatim)."""
        invalid = self.invalid
        warnings = [w for r in self.records for w in r.warnings]
        parts: list[str] = []
        if invalid:
            distinct = list(dict.fromkeys(r.message for r in invalid))
            more = len(distinct) - _MAX_MESSAGES
            parts.append(
                f"{self.rejected_items} {self.signal.item_name} carried {len(invalid)} invalid "
                f"usage records, not billed and kept as dead letters in the bridge's spool: "
                + "; ".join(distinct[:_MAX_MESSAGES])
                + (f" (and {more} more)" if more > 0 else "")
            )
        lost = sum(1 for r in self.rejections if r.reason is RejectReason.LOST)
        if lost:
            parts.append(
                f"{lost} events were dropped by the sender's span event limit "
                f"({EVENT_LIMIT_SETTING}) on spans that carry usage events: usage records "
                "among them are lost"
            )
        if warnings:
            distinct = list(dict.fromkeys(warnings))
            parts.append("warnings: " + "; ".join(distinct[:_MAX_MESSAGES]))
        return " | ".join(parts)


class _Resource:
    """A resource's attributes, read the first time an item of it carries usage."""

    def __init__(self, resource: Any, prefixes: tuple[str, ...] | None, limit: int) -> None:
        self._resource = resource
        self._prefixes = prefixes
        self._limit = limit
        self._attributes: dict[str, Any] | None = None
        self.problem: str | None = None
        """The first over-long attribute, described (once :attr:`attributes` was read)."""

    @property
    def attributes(self) -> dict[str, Any]:
        if self._attributes is None:
            self._attributes = _attributes(self._resource.attributes, self._prefixes)
            self.problem = _too_long(self._attributes, self._limit)
        return self._attributes

    @functools.cached_property
    def message_digest(self) -> str:
        """A digest of the whole resource message (log records' alias keys)."""
        return _fingerprint(self._resource)

    @functools.cached_property
    def attribute_digest(self) -> str:
        """A digest of its attributes in any order (metric streams' keys)."""
        return _attribute_fingerprint(self.attributes)


@dataclass(frozen=True, slots=True)
class _Rules:
    """What every signal's extraction shares: identity defaults, limits, the mappings."""

    defaults: IdentityDefaults
    genai: bool
    max_attribute_length: int
    frameworks: FrameworkSet
    prefixes: tuple[str, ...]

    def restrict(
        self,
        records: list[UsageRecord],
        rejections: list[Rejection],
        allowed_agents: frozenset[str] | None,
    ) -> None:
        """Move records billed to an agent the caller's token may not use into rejections."""
        if allowed_agents is None:
            return
        kept: list[UsageRecord] = []
        for record in records:
            agent = record.payload["agentId"]
            if agent in allowed_agents:
                kept.append(record)
            else:
                rejections.append(
                    rejected(
                        record.origin,
                        f"{sc.AGENT_ID} {agent!r} is not allowed for this bearer token "
                        f"(allowed: {', '.join(sorted(allowed_agents))})",
                        rejection_key(record.idempotency_key, record.payload),
                        record.payload,
                    )
                )
        records[:] = kept

    def limit_rejection(
        self, problem: str, origin: str, ref: str, attributes: Mapping[str, Any]
    ) -> Rejection:
        """An item refused for an over-long attribute (``problem``)."""
        return rejected(
            origin,
            problem,
            rejection_key(ref, attributes),
            _clipped(attributes, self.max_attribute_length),
        )

    def add(
        self,
        out: Extraction,
        records: list[UsageRecord],
        rejections: list[Rejection],
        allowed_agents: frozenset[str] | None,
    ) -> None:
        """One item's records, restricted to the token's agents; counted when invalid."""
        self.restrict(records, rejections, allowed_agents)
        if out.add(records, rejections):
            out.rejected_items += 1


class _SpanReader:
    """Usage records on spans and their ``paygent.usage`` span events."""

    def __init__(self, rules: _Rules) -> None:
        self.rules = rules

    def read(self, request: Any, allowed_agents: frozenset[str] | None) -> Extraction:
        out = Extraction(Signal.TRACES)
        rules = self.rules
        for rs in request.resource_spans:
            resource = _Resource(rs.resource, rules.prefixes, rules.max_attribute_length)
            for ss in rs.scope_spans:
                scope = ss.scope.name
                # A framework's raw attributes (a JSON document, counts) never reach the
                # payload as they are: only the convention's and the pricing names are limited.
                framework_span = rules.frameworks.claim(scope) is not None
                for span in ss.spans:
                    self._span(out, span, resource, scope, framework_span, allowed_agents)
        return out

    def _span(
        self,
        out: Extraction,
        span: Any,
        resource: _Resource,
        scope: str,
        framework_span: bool,
        allowed_agents: frozenset[str] | None,
    ) -> None:
        rules = self.rules
        prefixes, limit = rules.prefixes, rules.max_attribute_length
        attributes = _attributes(span.attributes, prefixes)
        event_names = [e.name for e in span.events]
        dropped = span.dropped_attributes_count
        if not has_usage(
            attributes,
            event_names,
            rules.genai,
            dropped=dropped,
            frameworks=rules.frameworks,
            scope=scope,
            span_name=span.name,
        ):
            return
        resource_attributes = resource.attributes
        events = [
            (name, _attributes(e.attributes, prefixes) if name == sc.USAGE_EVENT_NAME else {})
            for name, e in zip(event_names, span.events, strict=True)
        ]
        trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
        problem = resource.problem or self._too_long(attributes, events, framework_span)
        if problem is not None:
            where = f"span {span.name[:limit]!r} (trace {trace_id}, span {span_id})"
            ref = idempotency_key("span", trace_id, span_id, "limits")
            out.add((), (rules.limit_rejection(problem, where, ref, attributes),))
            out.rejected_items += 1
            return
        # The sender's limits are invisible here, but OTLP carries what they dropped: the
        # same rules as in the SDK exporter apply.
        records, rejections = records_from_span(
            trace_id=trace_id,
            span_id=span_id,
            name=span.name,
            attributes=attributes,
            events=events,
            resource=resource_attributes,
            defaults=rules.defaults,
            genai=rules.genai,
            truncation=Truncation(dropped),
            event_truncations=[Truncation(e.dropped_attributes_count) for e in span.events],
            dropped_events=span.dropped_events_count,
            frameworks=rules.frameworks,
            scope=scope,
        )
        rules.add(out, records, rejections, allowed_agents)

    def _too_long(
        self,
        attributes: dict[str, Any],
        events: list[tuple[str, dict[str, Any]]],
        framework_span: bool,
    ) -> str | None:
        """The first over-long attribute of the span or its usage events, described."""
        limit = self.rules.max_attribute_length
        limited = (
            {k: v for k, v in attributes.items() if k.startswith(_LIMITED_PREFIXES)}
            if framework_span
            else attributes
        )
        problem = _too_long(limited, limit)
        for _, event_attributes in events:
            problem = problem or _too_long(event_attributes, limit)
        return problem


class _LogReader:
    """Every log record that carries ``paygent.usage.kind`` is one usage record."""

    def __init__(self, rules: _Rules) -> None:
        self.rules = rules

    def read(self, request: Any, allowed_agents: frozenset[str] | None) -> Extraction:
        out = Extraction(Signal.LOGS)
        for rl in request.resource_logs:
            resource = _Resource(rl.resource, (_PAYGENT_PREFIX,), self.rules.max_attribute_length)
            for sl in rl.scope_logs:
                for log in sl.log_records:
                    attributes = _attributes(log.attributes, (_PAYGENT_PREFIX,))
                    if sc.USAGE_KIND not in attributes:
                        continue
                    self._log(out, log, attributes, resource, allowed_agents)
        return out

    def _log(
        self,
        out: Extraction,
        log: Any,
        attributes: dict[str, Any],
        resource: _Resource,
        allowed_agents: frozenset[str] | None,
    ) -> None:
        rules = self.rules
        resource_digest = resource.message_digest
        resource_attributes = resource.attributes
        trace_id, span_id = log.trace_id.hex(), log.span_id.hex()
        timestamp = log.time_unix_nano or log.observed_time_unix_nano
        where = f"log record (time {timestamp}" + (
            f", trace {trace_id}, span {span_id})" if trace_id else ")"
        )
        ref = idempotency_key(
            "log",
            canonical_json(attributes),
            canonical_json(_value(log.body)),
            log.time_unix_nano,
            trace_id,
            span_id,
        )
        problem = resource.problem or _too_long(attributes, rules.max_attribute_length)
        if problem is not None:
            out.add((), (rules.limit_rejection(problem, where, ref, attributes),))
            out.rejected_items += 1
            return
        result = map_usage(
            attributes,
            inherited=(resource_attributes,),
            defaults=rules.defaults,
            ref=ref,
            origin=where,
            trace_ids=(trace_id, span_id) if trace_id else None,
            aliases=(_serialized_log_key(resource_digest, log),),
        )
        if isinstance(result, UsageRecord):
            rules.add(out, [result], [], allowed_agents)
        else:
            rules.add(out, [], [result], allowed_agents)


def _stream_problem(
    metric: Any, name: str, kind: str | None, cumulative: CumulativeStore | None
) -> tuple[str | None, int]:
    """Why a usage metric (quantity ``name``) cannot be billed (or None), and its
    temporality."""
    temporality = metric.sum.aggregation_temporality if kind == "sum" else 0
    if kind == "sum" and metric.sum.is_monotonic:
        if temporality not in (_DELTA, _CUMULATIVE):
            return (
                f"metric {name!r} has no aggregation temporality; usage counters must be "
                "DELTA or CUMULATIVE. Its points are not billed"
            ), temporality
        if temporality == _CUMULATIVE and cumulative is None:
            return (
                f"metric {name!r} arrives with cumulative temporality, which the bridge "
                "turns into deltas only with a durable spool (serve --spool FILE); or make "
                "the sender use delta temporality "
                "(OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta). "
                "Its points are not billed"
            ), temporality
    # Cumulative sums are turned into deltas below, so they are judged as deltas here.
    found = usage_stream_problem(
        name,
        (kind or "metric without data points").replace("_", " "),
        unit=metric.unit,
        monotonic=kind == "sum" and metric.sum.is_monotonic,
        delta=True,
    )
    return (found[1] if found else None), temporality


@dataclass(slots=True)
class _Stream:
    """One usage metric of one scope and resource, as its points are read."""

    resource: dict[str, Any]
    resource_digest: str
    resource_problem: str | None
    scope: Any
    name: str
    framework: Any
    problem: str | None
    temporality: int


class _MetricReader:
    """Usage records from the points of usage counters (monotonic sums)."""

    def __init__(self, rules: _Rules) -> None:
        self.rules = rules
        self.deltas: list[UsagePoint] = []
        self.running: list[CumulativePoint] = []
        self.invalid_points = 0
        self.out = Extraction(Signal.METRICS)

    def read(
        self,
        request: Any,
        cumulative: CumulativeStore | None,
        allowed_agents: frozenset[str] | None,
    ) -> Extraction:
        for rm in request.resource_metrics:
            resource = _Resource(rm.resource, None, self.rules.max_attribute_length)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    stream = self._stream(resource, sm.scope, metric, cumulative)
                    if stream is None:
                        continue
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind) if kind is not None else None
                    for point in data.data_points if data is not None else ():
                        if not point.flags & _NO_RECORDED_VALUE:
                            self._point(stream, point)
        return self._finish(cumulative, allowed_agents)

    def _stream(
        self, resource: _Resource, scope: Any, metric: Any, cumulative: CumulativeStore | None
    ) -> _Stream | None:
        """The stream of a usage metric (None for other metrics)."""
        framework = self.rules.frameworks.metric(scope.name, metric.name)
        name = metric.name if framework is None else framework.quantity
        if name not in sc.QUANTITIES:
            return None
        attributes = resource.attributes
        kind = metric.WhichOneof("data")
        problem, temporality = _stream_problem(metric, name, kind, cumulative)
        return _Stream(
            attributes,
            resource.attribute_digest,
            resource.problem,
            scope,
            name,
            framework,
            problem,
            temporality,
        )

    def _point(self, stream: _Stream, point: Any) -> None:
        limit = self.rules.max_attribute_length
        attributes = _attributes(point.attributes, None)
        if stream.framework is not None:
            attributes = stream.framework.attributes(attributes)
        key = idempotency_key(
            "stream",
            stream.resource_digest,
            stream.scope.name,
            stream.scope.version,
            stream.name,
            _attribute_fingerprint(attributes),
        )
        where = f"metric {stream.name!r} point at {point.time_unix_nano} (stream {key})"
        problem = stream.problem or stream.resource_problem or _too_long(attributes, limit)
        if problem is not None:
            rejection = rejected(
                where,
                problem,
                idempotency_key("metric-invalid", key, point.time_unix_nano),
                _clipped(attributes, limit),
            )
            self.out.add((), (rejection,))
            self.invalid_points += 1
            return
        is_int = point.WhichOneof("value") == "as_int"
        usage = UsagePoint(
            stream.resource,
            stream.name,
            attributes,
            point.start_time_unix_nano,
            point.time_unix_nano,
            point.as_int if is_int else point.as_double,
        )
        if stream.temporality == _CUMULATIVE:
            self.running.append(CumulativePoint(key, usage))
        else:
            self.deltas.append(usage)

    def _finish(
        self, cumulative: CumulativeStore | None, allowed_agents: frozenset[str] | None
    ) -> Extraction:
        out, deltas = self.out, self.deltas
        if self.running:
            assert cumulative is not None
            converted, out.updates = cumulative.deltas(self.running)
            deltas += converted
        records, rejections = records_from_points(
            deltas, self.rules.defaults, source="otlp metrics"
        )
        self.rules.restrict(records, rejections, allowed_agents)
        out.add(records, rejections)
        out.rejected_items = self.invalid_points + sum(
            max(1, sum(1 for name in r.attributes if name in sc.QUANTITIES))
            for r in rejections
            if r.reason is RejectReason.INVALID
        )
        return out


class UsageExtractor:
    """Turns decoded export requests into usage records with the shared mapping."""

    def __init__(
        self,
        defaults: IdentityDefaults,
        *,
        genai: bool = False,
        max_attribute_length: int = 256,
        frameworks: FrameworkSet | None = None,
    ) -> None:
        self.defaults = defaults
        self.genai = genai
        self.max_attribute_length = max_attribute_length
        self.frameworks = frameworks or FrameworkSet()
        """Framework mappings (``paygent_otel.convention.frameworks``) applied to spans and
        metrics."""
        self._rules = _Rules(
            defaults,
            genai,
            max_attribute_length,
            self.frameworks,
            (
                _PAYGENT_PREFIX,
                *((_GENAI_PREFIX,) if genai else ()),
                *self.frameworks.attribute_prefixes,
            ),
        )

    def spans(self, request: Any, allowed_agents: frozenset[str] | None = None) -> Extraction:
        """Every usage record on the request's spans and ``paygent.usage`` span events."""
        return _SpanReader(self._rules).read(request, allowed_agents)

    def logs(self, request: Any, allowed_agents: frozenset[str] | None = None) -> Extraction:
        """Every log record that carries ``paygent.usage.kind`` is one usage record."""
        return _LogReader(self._rules).read(request, allowed_agents)

    def metrics(
        self,
        request: Any,
        cumulative: CumulativeStore | None,
        allowed_agents: frozenset[str] | None = None,
    ) -> Extraction:
        """Usage records from the points of usage counters (monotonic sums).

        Delta points are used as they are. Cumulative points become deltas against the last
        value of their stream in ``cumulative`` (the positions to commit are in
        :attr:`Extraction.updates`); without a store they are refused. Any other
        instrument type carrying a usage name is refused.
        """
        return _MetricReader(self._rules).read(request, cumulative, allowed_agents)
