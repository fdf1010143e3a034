"""The bridge's ASGI app: OTLP/HTTP in, usage records committed to the spool, then the ack.

``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` take protobuf or OTLP/JSON, plain or
gzip. A request is answered 200 only after every valid usage record in it is committed to
the durable spool (the same :class:`~paygent_otel._delivery.DeliveryPipeline` the SDK
exporters use, which delivers in the background). Invalid records are dead-lettered and
reported in ``partial_success``. Every error answer is a ``google.rpc.Status`` in the
request's encoding, with the status a Collector acts on: 429/503 (+ ``Retry-After``) when
it should retry later, 400/401/403/413/415 when retrying cannot help.

``GET /health`` answers 200 while serving; ``GET /metrics`` gives the bridge's counters in
the Prometheus text format.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .._delivery import DeliveryPipeline
from .._mapping import IdentityDefaults, Rejection
from .._retry import RetryPolicy
from ..frameworks import parse_frameworks
from ..usage_page import USAGE_PAGE_PATH, bridge_page
from .auth import Grant
from .config import BridgeConfig
from .cumulative import CumulativeStore, open_cumulative_store
from .guard import (
    BudgetExhausted,
    BudgetHold,
    ConnectionGuard,
    MemoryBudget,
    RateLimitedLog,
    TokenBuckets,
)
from .otlp import (
    JSON_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    SIGNAL_PATHS,
    BodyTooLarge,
    Extraction,
    InvalidRequest,
    Signal,
    UnsupportedEncoding,
    UsageExtractor,
    count_items,
    decode_request,
    decompress,
    encode_response,
    encode_status,
)

__all__ = [
    "CLIENT_CLOSED_STATUS",
    "CONNECTION_EXTENSION",
    "HEALTH_PATH",
    "METRICS_ENDPOINT_PATH",
    "BridgeApp",
]

_logger = logging.getLogger("paygent_otel.bridge")

HEALTH_PATH: Final = "/health"
"""Liveness/readiness: 200 while serving, 503 while shutting down."""
METRICS_ENDPOINT_PATH: Final = "/metrics"
"""The bridge's own counters, Prometheus text format."""

CLIENT_CLOSED_STATUS: Final = 499
"""The ``status`` label of a request whose sender went away before it was answered (nginx's
convention); nothing is answered, nothing was acknowledged, and it is not a server error."""
CONNECTION_EXTENSION: Final = "paygent.connection"
"""ASGI scope extension the server sets to a dict; ``closed`` names why the server closed
the connection under a request (``body_timeout``), so the app does not count it as the
client's doing."""

_PROTOBUF_TYPES: Final = frozenset({PROTOBUF_CONTENT_TYPE, "application/protobuf"})
_GRPC_CODES: Final = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "an unknown peer"


class _Gone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refusal(Exception):
    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


@dataclass
class _Counters:
    """The bridge's own counters (read by ``GET /metrics``)."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    usage: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class BridgeApp:
    """The OTLP/HTTP receiver. Serve :attr:`asgi`; call :meth:`close` when done (the
    lifespan shutdown does it)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        exporter = config.exporter
        self.pipeline = DeliveryPipeline(
            exporter,
            name="bridge",
            retry_policy=retry_policy,
            transport=transport,
            api_key_hint="set PAYGENT_API_KEY or pass --api-key-file FILE",
        )
        """Spool and delivery worker shared with the SDK exporters' code."""
        self.cumulative: CumulativeStore | None = open_cumulative_store(
            self.pipeline.spool, exporter.spool_path
        )
        """Last positions of cumulative metric streams (None with the in-memory spool)."""
        self.extractor = self._extractor(exporter.agent_id)
        self._extractors = {exporter.agent_id: self.extractor}
        limits = config.limits
        self.connections = ConnectionGuard(limits.max_connections)
        """Open connections (the server's protocol registers them here)."""
        self.memory = MemoryBudget(limits.memory_budget)
        """Bytes request bodies being read and inflated hold, shared by all requests."""
        self.refusals_log = RateLimitedLog(_logger)
        """Refusals and attacks are logged at most every few seconds per kind."""
        self._counters = _Counters()
        self._metrics_lock = threading.Lock()
        self._active = 0
        self._per_token: Counter[str] = Counter()
        self._rates = TokenBuckets(limits.rate_limit_per_token)
        self._limiter = anyio.CapacityLimiter(limits.max_concurrent_requests)
        self._closing = False
        self._closed = False
        self.left_in_spool = 0
        """Records left undelivered at :meth:`close` (they stay in a durable spool)."""
        routes = [
            Route(path, self._handler(signal), methods=["POST"])
            for signal, path in SIGNAL_PATHS.items()
        ]
        routes += [
            Route(HEALTH_PATH, self._health, methods=["GET"]),
            Route(METRICS_ENDPOINT_PATH, self._metrics, methods=["GET"]),
            Route(USAGE_PAGE_PATH, bridge_page(self), methods=["GET"]),
        ]
        self.asgi = Starlette(routes=routes, lifespan=self._lifespan)
        """The Starlette application to serve."""

    def _extractor(self, agent_id: str | None) -> UsageExtractor:
        exporter = self.config.exporter
        return UsageExtractor(
            IdentityDefaults(
                agent_id=agent_id,
                customer_id=exporter.customer_id,
                indicator=exporter.indicator,
                trace_tags=exporter.trace_tags,
            ),
            genai=exporter.genai,
            frameworks=parse_frameworks(exporter.frameworks),
            max_attribute_length=self.config.limits.max_attribute_length,
        )

    def _extractor_for(self, grant: Grant) -> UsageExtractor:
        """A token limited to exactly one agent supplies that agent id to records without one
        (a Collector that drops a resource cannot then lose them)."""
        agent = grant.single_agent or self.config.exporter.agent_id
        extractor = self._extractors.get(agent)
        if extractor is None:
            extractor = self._extractors[agent] = self._extractor(agent)
        return extractor

    # ------------------------------------------------------------------ lifecycle

    def drain(self) -> None:
        """Stop taking usage: exports are answered 503 + ``Retry-After`` and ``/health`` 503,
        so load balancers send elsewhere. Requests in progress finish."""
        self._closing = True

    @property
    def handed_to_spool(self) -> int:
        """Usage records committed to the spool by this process."""
        return self.pipeline.stats.snapshot().get("accepted", 0)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        # Records an earlier run left in the spool go out without waiting for new ones.
        self.pipeline.start()
        yield
        self._closing = True
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Deliver what is pending within the flush timeout, then close files. Idempotent."""
        if self._closed:
            return
        self._closing = self._closed = True
        with self._metrics_lock:
            self.left_in_spool = self.pipeline.shutdown(self.config.flush_timeout)
            if self.cumulative is not None:
                self.cumulative.close()

    # ------------------------------------------------------------------ export routes

    def _handler(self, signal: Signal) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            return await self._export(request, signal)

        return handle

    async def _export(self, request: Request, signal: Signal) -> Response:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        json_encoded = media_type == JSON_CONTENT_TYPE
        hold = self.memory.hold()
        token: str | None = None
        try:
            grant = self._admit(request, media_type, json_encoded)
            token = grant.name
            self._per_token[token] += 1
            body = await self._read_body(request, hold)
            if self._active >= self.config.limits.max_concurrent_requests:
                raise _Refusal(
                    429,
                    "overloaded",
                    f"more than {self.config.limits.max_concurrent_requests} export requests "
                    "in progress (--max-concurrent-requests); retry later",
                    {"Retry-After": "1"},
                )
            self._active += 1
            try:
                extraction, refused = await anyio.to_thread.run_sync(
                    self._process,
                    signal,
                    body,
                    request.headers.get("content-encoding", ""),
                    json_encoded,
                    grant,
                    hold,
                    limiter=self._limiter,
                )
            finally:
                self._active -= 1
            if refused:
                raise self._unavailable(
                    f"{refused} usage records could not be stored (spool full or stopping); "
                    "nothing from this request was acknowledged, retry later",
                    "spool_full",
                )
        except _Refusal as refusal:
            return self._refuse(signal, refusal, json_encoded, request)
        except _Gone as gone:
            return self._gone(signal, gone.reason, request)
        except Exception:
            _logger.exception("bridge: unexpected error handling a %s export request", signal)
            return self._refuse(
                signal,
                self._unavailable("internal error in the bridge; retry later", "internal_error"),
                json_encoded,
                request,
            )
        finally:
            hold.release()
            if token is not None:
                self._per_token[token] -= 1
                if not self._per_token[token]:
                    del self._per_token[token]
        self._count(signal, 200)
        body = encode_response(
            signal, extraction.rejected_items, extraction.message(), json_encoded=json_encoded
        )
        return Response(
            body, 200, media_type=JSON_CONTENT_TYPE if json_encoded else PROTOBUF_CONTENT_TYPE
        )

    def _admit(self, request: Request, media_type: str, json_encoded: bool) -> Grant:
        """The checks made before the body is read, cheapest first; the caller's grant."""
        headers = request.headers
        grant = self.config.auth.check(headers.get("authorization"))
        if grant is None:
            raise _Refusal(
                401,
                "unauthorized",
                "missing or invalid bearer token (send Authorization: Bearer <token>)",
                {"WWW-Authenticate": 'Bearer realm="paygent-otel"'},
            )
        if not json_encoded and media_type not in _PROTOBUF_TYPES:
            raise _Refusal(
                415,
                "unsupported_media_type",
                f"Content-Type {media_type or 'none'!r} is not supported; send "
                f"{PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}",
            )
        if (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        ):
            # HTTP/1.0 without Content-Length: the body would be read as empty and billed
            # as nothing.
            raise _Refusal(
                411,
                "length_required",
                "a request body needs a Content-Length (or chunked transfer encoding)",
            )
        if self._closing:
            raise self._unavailable("the bridge is shutting down", "shutting_down")
        if not self.config.auth.required:
            return grant  # no tokens (loopback, or client certificates): none to be fair between
        limits = self.config.limits
        wait = self._rates.take(grant.name)
        if wait:
            raise _Refusal(
                429,
                "rate_limited",
                f"more than {limits.rate_limit_per_token:g} export requests per second for "
                f"this token (--rate-limit-per-token); retry later",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if self._per_token[grant.name] >= limits.max_requests_per_token:
            raise _Refusal(
                429,
                "token_busy",
                f"this token already has {limits.max_requests_per_token} export requests in "
                "progress (--max-requests-per-token); retry later",
                {"Retry-After": "1"},
            )
        return grant

    def _unavailable(self, message: str, reason: str) -> _Refusal:
        return _Refusal(503, reason, message, {"Retry-After": str(self.config.retry_after_seconds)})

    async def _read_body(self, request: Request, hold: BudgetHold) -> bytes:
        limit = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        too_large = _Refusal(
            413,
            "body_too_large",
            f"the request body exceeds the limit of {limit} bytes (--max-request-bytes); "
            "lower the sender's batch size",
        )
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        try:
            if declared.isdigit():
                hold.take(int(declared))
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    closed = request.scope.get("extensions", {}).get(CONNECTION_EXTENSION, {})
                    raise _Gone(str(closed.get("closed", "client_disconnected")))
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                if not declared.isdigit():
                    hold.take(len(chunk))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except BudgetExhausted as exc:
            raise self._unavailable(str(exc), "memory_budget") from None

    def _process(
        self,
        signal: Signal,
        body: bytes,
        encoding: str,
        json_encoded: bool,
        grant: Grant,
        hold: BudgetHold,
    ) -> tuple[Extraction, int]:
        """Decode, map and commit one request (in a worker thread). Returns refused count."""
        limits = self.config.limits
        try:
            raw = decompress(body, encoding, limits.max_decompressed_bytes, hold.take)
            request = decode_request(signal, raw, json_encoded=json_encoded)
            del raw
        except BudgetExhausted as exc:
            raise self._unavailable(str(exc), "memory_budget") from None
        except BodyTooLarge as exc:
            raise _Refusal(413, "decompressed_too_large", str(exc)) from None
        except UnsupportedEncoding as exc:
            raise _Refusal(415, "unsupported_encoding", str(exc)) from None
        except InvalidRequest as exc:
            raise _Refusal(400, "bad_request", str(exc)) from None
        items = count_items(signal, request)
        if items > limits.max_items:
            raise _Refusal(
                413,
                "too_many_items",
                f"{items} {signal.item_name} in one request exceed the limit of "
                f"{limits.max_items} (--max-items); lower the sender's batch size",
            )
        with self._counters.lock:
            self._counters.items[signal] += items
        extractor = self._extractor_for(grant)
        if signal is Signal.METRICS:
            with self._metrics_lock:
                return self._commit_metrics(extractor, request, grant)
        if signal is Signal.TRACES:
            extraction = extractor.spans(request, grant.agents)
        else:
            extraction = extractor.logs(request, grant.agents)
        return extraction, self._submit(extraction)

    def _commit_metrics(
        self, extractor: UsageExtractor, request: Any, grant: Grant
    ) -> tuple[Extraction, int]:
        """Metrics under the lock: the cumulative positions move only with their records."""
        if self._closed:
            return Extraction(Signal.METRICS), 1
        cumulative = self.cumulative
        extraction = extractor.metrics(request, cumulative, grant.agents)
        if cumulative is None or not extraction.updates:
            return extraction, self._submit(extraction)
        cumulative.journal(extraction.updates, [r.idempotency_key for r in extraction.records])
        refused = self._submit(extraction)
        if refused:
            cumulative.discard()
        else:
            cumulative.commit()
        return extraction, refused

    def _submit(self, extraction: Extraction) -> int:
        refused = 0
        if extraction.records or extraction.rejections:
            conflicts: list[Rejection] = []
            refused = self.pipeline.submit(
                extraction.records, extraction.rejections, conflicts=conflicts
            )
            extraction.refuse(conflicts)  # reported in partial_success like invalid records
        with self._counters.lock:
            usage = self._counters.usage
            usage[(extraction.signal, "valid")] += len(extraction.records)
            usage.update((extraction.signal, r.reason.value) for r in extraction.rejections)
        return refused

    def _count(self, signal: Signal, status: int, reason: str | None = None) -> None:
        with self._counters.lock:
            self._counters.requests[(signal, status)] += 1
            if reason is not None:
                self._counters.refused[reason] += 1

    def _refuse(
        self, signal: Signal, refusal: _Refusal, json_encoded: bool, request: Request
    ) -> Response:
        self._count(signal, refusal.status, refusal.reason)
        self.refusals_log.log(
            logging.INFO if refusal.status in (429, 503) else logging.WARNING,
            refusal.reason,
            "bridge: %s request from %s answered %d: %s",
            signal,
            _peer(request),
            refusal.status,
            refusal.message,
        )
        body = encode_status(
            _GRPC_CODES.get(refusal.status, 2), refusal.message, json_encoded=json_encoded
        )
        return Response(
            body,
            refusal.status,
            headers=refusal.headers,
            media_type=JSON_CONTENT_TYPE if json_encoded else PROTOBUF_CONTENT_TYPE,
        )

    def _gone(self, signal: Signal, reason: str, request: Request) -> Response:
        """The connection closed under the request: nothing to answer, nothing acknowledged."""
        self._count(signal, CLIENT_CLOSED_STATUS, reason)
        self.refusals_log.log(
            logging.INFO,
            reason,
            "bridge: %s request from %s ended before its body was read (%s); nothing acknowledged",
            signal,
            _peer(request),
            reason,
        )
        return Response(b"", CLIENT_CLOSED_STATUS)

    # ------------------------------------------------------------------ health and metrics

    async def _health(self, _: Request) -> Response:
        if self._closing:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        # Counters say who sends how much: with tokens configured, a scraper presents one.
        # /health stays open for load balancers and tells nothing but the state.
        if self.config.auth.check(request.headers.get("authorization")) is None:
            self.refusals_log.log(
                logging.WARNING,
                "metrics_unauthorized",
                "bridge: GET /metrics from %s without a valid bearer token answered 401",
                _peer(request),
            )
            return PlainTextResponse(
                "GET /metrics needs a bearer token when the bridge has tokens\n",
                401,
                headers={"WWW-Authenticate": 'Bearer realm="paygent-otel"'},
            )
        text = await anyio.to_thread.run_sync(self.metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def metrics_text(self) -> str:
        """The counters in the Prometheus text exposition format."""
        c = self._counters
        with c.lock:
            requests = sorted(c.requests.items())
            items = sorted(c.items.items())
            usage = sorted(c.usage.items())
            refused = sorted(c.refused.items())
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        family(
            "paygent_bridge_requests_total",
            "counter",
            "OTLP export requests answered, by signal and HTTP status.",
            [(f'{{signal="{s}",status="{code}"}}', n) for (s, code), n in requests],
        )
        family(
            "paygent_bridge_items_received_total",
            "counter",
            "Spans, data points and log records received in accepted requests, by signal.",
            [(f'{{signal="{s}"}}', n) for s, n in items],
        )
        family(
            "paygent_bridge_usage_records_total",
            "counter",
            "Usage records found, by signal and result (valid, invalid, zero, lost).",
            [(f'{{signal="{s}",result="{r}"}}', n) for (s, r), n in usage],
        )
        family(
            "paygent_bridge_requests_rejected_total",
            "counter",
            "Export requests refused, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in refused],
        )
        family(
            "paygent_bridge_delivery_records_total",
            "counter",
            "Usage records by delivery outcome (accepted, delivered, retried, invalid, ...).",
            [(f'{{outcome="{o}"}}', n) for o, n in sorted(self.pipeline.stats.snapshot().items())],
        )
        family(
            "paygent_bridge_in_flight_requests",
            "gauge",
            "Export requests being processed.",
            [("", self._active)],
        )
        family(
            "paygent_bridge_open_connections",
            "gauge",
            "Connections open now.",
            [("", self.connections.open)],
        )
        family(
            "paygent_bridge_connections_closed_total",
            "counter",
            "Connections the bridge closed or refused, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.connections.closed.items())],
        )
        family(
            "paygent_bridge_memory_budget_used_bytes",
            "gauge",
            "Bytes of the shared memory budget held by request bodies now.",
            [("", self.memory.used)],
        )
        if not self._closed:
            spool = self.pipeline.spool.stats()
            family(
                "paygent_bridge_spool_pending",
                "gauge",
                "Usage records waiting in the spool for delivery.",
                [("", spool.pending)],
            )
            family(
                "paygent_bridge_spool_dead_letters",
                "gauge",
                "Dead letters in the spool (invalid, or refused by Paygent).",
                [("", spool.dead_letters)],
            )
        return "\n".join(lines) + "\n"
