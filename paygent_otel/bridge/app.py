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
from .._spool import SqliteSpool
from ..frameworks import parse_frameworks
from ..usage_page import USAGE_PAGE_PATH, bridge_page
from .auth import Grant
from .config import BridgeConfig
from .cumulative import CumulativeStore, cumulative_state_path
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

__all__ = ["HEALTH_PATH", "METRICS_ENDPOINT_PATH", "BridgeApp"]

_logger = logging.getLogger("paygent_otel.bridge")

HEALTH_PATH: Final = "/health"
"""Liveness/readiness: 200 while serving, 503 while shutting down."""
METRICS_ENDPOINT_PATH: Final = "/metrics"
"""The bridge's own counters, Prometheus text format."""

_PROTOBUF_TYPES: Final = frozenset({PROTOBUF_CONTENT_TYPE, "application/protobuf"})
_GRPC_CODES: Final = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}


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
        self.cumulative: CumulativeStore | None = None
        """Last positions of cumulative metric streams (None with the in-memory spool)."""
        if isinstance(self.pipeline.spool, SqliteSpool):
            self.cumulative = CumulativeStore(cumulative_state_path(exporter.spool_path))
            self.cumulative.recover(self.pipeline.spool.known_keys)
            self.cumulative.prune()
        self.extractor = UsageExtractor(
            IdentityDefaults(
                agent_id=exporter.agent_id,
                customer_id=exporter.customer_id,
                indicator=exporter.indicator,
                trace_tags=exporter.trace_tags,
            ),
            genai=exporter.genai,
            frameworks=parse_frameworks(exporter.frameworks),
            max_attribute_length=config.limits.max_attribute_length,
        )
        self._counters = _Counters()
        self._metrics_lock = threading.Lock()
        self._active = 0
        self._limiter = anyio.CapacityLimiter(config.limits.max_concurrent_requests)
        self._closing = False
        self._closed = False
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

    # ------------------------------------------------------------------ lifecycle

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
            self.pipeline.shutdown(self.config.flush_timeout)
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
        try:
            grant = self.config.auth.check(request.headers.get("authorization"))
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
            if self._closing:
                raise self._unavailable("the bridge is shutting down", "shutting_down")
            if self._active >= self.config.limits.max_concurrent_requests:
                raise _Refusal(
                    429,
                    "overloaded",
                    f"more than {self.config.limits.max_concurrent_requests} export requests "
                    "in progress; retry later",
                    {"Retry-After": "1"},
                )
            self._active += 1
            try:
                body = await self._read_body(request)
                extraction, refused = await anyio.to_thread.run_sync(
                    self._process,
                    signal,
                    body,
                    request.headers.get("content-encoding", ""),
                    json_encoded,
                    grant,
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
            return self._refuse(signal, refusal, json_encoded)
        except Exception:
            _logger.exception("bridge: unexpected error handling a %s export request", signal)
            return self._refuse(
                signal,
                self._unavailable("internal error in the bridge; retry later", "internal_error"),
                json_encoded,
            )
        self._count(signal, 200)
        body = encode_response(
            signal, extraction.rejected_items, extraction.message(), json_encoded=json_encoded
        )
        return Response(
            body, 200, media_type=JSON_CONTENT_TYPE if json_encoded else PROTOBUF_CONTENT_TYPE
        )

    def _unavailable(self, message: str, reason: str) -> _Refusal:
        return _Refusal(503, reason, message, {"Retry-After": str(self.config.retry_after_seconds)})

    async def _read_body(self, request: Request) -> bytes:
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
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _process(
        self, signal: Signal, body: bytes, encoding: str, json_encoded: bool, grant: Grant
    ) -> tuple[Extraction, int]:
        """Decode, map and commit one request (in a worker thread). Returns refused count."""
        limits = self.config.limits
        try:
            raw = decompress(body, encoding, limits.max_decompressed_bytes)
            request = decode_request(signal, raw, json_encoded=json_encoded)
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
        if signal is Signal.METRICS:
            with self._metrics_lock:
                return self._commit_metrics(request, grant)
        if signal is Signal.TRACES:
            extraction = self.extractor.spans(request, grant.agents)
        else:
            extraction = self.extractor.logs(request, grant.agents)
        return extraction, self._submit(extraction)

    def _commit_metrics(self, request: Any, grant: Grant) -> tuple[Extraction, int]:
        """Metrics under the lock: the cumulative positions move only with their records."""
        if self._closed:
            return Extraction(Signal.METRICS), 1
        cumulative = self.cumulative
        extraction = self.extractor.metrics(request, cumulative, grant.agents)
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

    def _refuse(self, signal: Signal, refusal: _Refusal, json_encoded: bool) -> Response:
        self._count(signal, refusal.status, refusal.reason)
        log = _logger.info if refusal.status in (429, 503) else _logger.warning
        log("bridge: %s request answered %d: %s", signal, refusal.status, refusal.message)
        body = encode_status(
            _GRPC_CODES.get(refusal.status, 2), refusal.message, json_encoded=json_encoded
        )
        return Response(
            body,
            refusal.status,
            headers=refusal.headers,
            media_type=JSON_CONTENT_TYPE if json_encoded else PROTOBUF_CONTENT_TYPE,
        )

    # ------------------------------------------------------------------ health and metrics

    async def _health(self, _: Request) -> Response:
        if self._closing:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, _: Request) -> Response:
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
