"""The bridge's ASGI app: OTLP/HTTP in, usage records committed to the spool, then the ack.

``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` take protobuf or OTLP/JSON, plain or
gzip. A request is answered 200 only after every valid usage record in it is committed to
the durable spool (the same :class:`~paygent_otel.delivery.pipeline.DeliveryPipeline` the SDK
exporters use, which delivers in the background). Invalid records are dead-lettered and
reported in ``partial_success``. Every error answer is a ``google.rpc.Status`` in the
request's encoding, with the status a Collector acts on: 429/503 (+ ``Retry-After``) when
it should retry later, 400/401/403/413/415 when retrying cannot help.

``GET /health`` answers 200 while serving; ``GET /metrics`` gives the bridge's counters in
the Prometheus text format (:mod:`paygent_otel.bridge.metrics`).

The jobs are apart: :class:`~paygent_otel.bridge.admission.Admission` checks a request
before its body is read and reads it, :class:`~paygent_otel.bridge.intake.UsageIntake`
decodes, maps and commits it; this app routes, answers and counts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from paygent_otel._web.usage_page import USAGE_PAGE_PATH
from paygent_otel.bridge.admission import (
    CONNECTION_EXTENSION,
    Admission,
    Gone,
    Refusal,
    unavailable,
)
from paygent_otel.bridge.config import BridgeConfig
from paygent_otel.bridge.cumulative import CumulativeStore, open_cumulative_store
from paygent_otel.bridge.guard import ConnectionGuard, MemoryBudget, RateLimitedLog
from paygent_otel.bridge.intake import UsageIntake
from paygent_otel.bridge.metrics import METRICS_MEDIA_TYPE, BridgeCounters, bridge_metrics_text
from paygent_otel.bridge.otlp import (
    JSON_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    SIGNAL_PATHS,
    Extraction,
    Signal,
    UsageExtractor,
    encode_response,
    encode_status,
)
from paygent_otel.bridge.usage import bridge_page
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.retry import RetryPolicy

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

_GRPC_CODES: Final = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "an unknown peer"


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
        limits = config.limits
        self.connections = ConnectionGuard(limits.max_connections)
        """Open connections (the server's protocol registers them here)."""
        self.memory = MemoryBudget(limits.memory_budget)
        """Bytes request bodies being read and inflated hold, shared by all requests."""
        self.refusals_log = RateLimitedLog(_logger)
        """Refusals and attacks are logged at most every few seconds per kind."""
        self.counters = BridgeCounters()
        """What ``GET /metrics`` counts: requests, items, usage records, refusals."""
        self.admission = Admission(config)
        """The checks before a request's body is read, and the reading."""
        self.intake = UsageIntake(config, self.pipeline, self.cumulative, self.counters)
        """Decoding, mapping and committing in worker threads."""
        self._active = 0
        # Worker threads for requests, as many as may be in progress. It never makes one
        # wait (the in-flight check refuses first); without it anyio's default limiter (40
        # threads, shared with /metrics and shutdown) would queue requests past 40.
        self._limiter = anyio.CapacityLimiter(limits.max_concurrent_requests)
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

    @property
    def extractor(self) -> UsageExtractor:
        """The extractor of the configured agent id."""
        return self.intake.extractor

    # ------------------------------------------------------------------ lifecycle

    def drain(self) -> None:
        """Stop taking usage: exports are answered 503 + ``Retry-After`` and ``/health`` 503,
        so load balancers send elsewhere. Requests in progress finish."""
        self.admission.closing = True

    @property
    def handed_to_spool(self) -> int:
        """Usage records committed to the spool by this process."""
        return self.pipeline.stats.snapshot().get("accepted", 0)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        # Records an earlier run left in the spool go out without waiting for new ones.
        self.pipeline.start()
        yield
        self.admission.closing = True
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Deliver what is pending within the flush timeout, then close files. Idempotent."""
        if self._closed:
            return
        self.admission.closing = self._closed = True
        self.left_in_spool = self.intake.close()

    # ------------------------------------------------------------------ export routes

    def _handler(self, signal: Signal) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            return await self._export(request, signal)

        return handle

    async def _export(self, request: Request, signal: Signal) -> Response:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        json_encoded = media_type == JSON_CONTENT_TYPE
        try:
            extraction = await self._accept(request, signal, media_type, json_encoded)
        except Refusal as refusal:
            return self._refuse(signal, refusal, json_encoded, request)
        except Gone as gone:
            return self._gone(signal, gone.reason, request)
        except Exception:
            _logger.exception("bridge: unexpected error handling a %s export request", signal)
            return self._refuse(
                signal,
                unavailable(
                    self.config, "internal error in the bridge; retry later", "internal_error"
                ),
                json_encoded,
                request,
            )
        self.counters.request(signal, 200)
        body = encode_response(
            signal, extraction.rejected_items, extraction.message(), json_encoded=json_encoded
        )
        return Response(
            body, 200, media_type=JSON_CONTENT_TYPE if json_encoded else PROTOBUF_CONTENT_TYPE
        )

    async def _accept(
        self, request: Request, signal: Signal, media_type: str, json_encoded: bool
    ) -> Extraction:
        """Admit, read and commit one request; raises what it is answered otherwise."""
        hold = self.memory.hold()
        token: str | None = None
        try:
            grant = self.admission.admit(request, media_type, json_encoded)
            token = grant.name
            body = await self.admission.read_body(request, hold)
            limit = self.config.limits.max_concurrent_requests
            if self._active >= limit:
                raise Refusal(
                    429,
                    "overloaded",
                    f"more than {limit} export requests in progress "
                    "(--max-concurrent-requests); retry later",
                    {"Retry-After": "1"},
                )
            self._active += 1
            try:
                extraction, refused = await anyio.to_thread.run_sync(
                    self.intake.process,
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
        finally:
            hold.release()
            if token is not None:
                self.admission.release(token)
        if refused:
            raise unavailable(
                self.config,
                f"{refused} usage records could not be stored (spool full or stopping); "
                "nothing from this request was acknowledged, retry later",
                "spool_full",
            )
        return extraction

    def _refuse(
        self, signal: Signal, refusal: Refusal, json_encoded: bool, request: Request
    ) -> Response:
        self.counters.request(signal, refusal.status, refusal.reason)
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
        self.counters.request(signal, CLIENT_CLOSED_STATUS, reason)
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
        if self.admission.closing:
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
        return PlainTextResponse(text, media_type=METRICS_MEDIA_TYPE)

    def metrics_text(self) -> str:
        """The counters in the Prometheus text exposition format."""
        return bridge_metrics_text(self)

    # What the /metrics collector reads (paygent_otel.bridge.metrics.BridgeState).

    @property
    def in_flight(self) -> int:
        """Export requests being processed now."""
        return self._active

    @property
    def spool_readable(self) -> bool:
        """False once :meth:`close` began: the spool is (being) closed."""
        return not self._closed
