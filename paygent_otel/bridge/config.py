"""The bridge's settings and their defaults (no server dependency: the CLI parser reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from paygent_otel.bridge.auth import BearerAuth
from paygent_otel.delivery.config import DEFAULT_FLUSH_TIMEOUT, ExporterConfig

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_DRAIN_GRACE",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_KEEP_ALIVE_TIMEOUT",
    "DEFAULT_MAX_ATTRIBUTE_LENGTH",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_REQUESTS_PER_TOKEN",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MIN_BODY_RATE",
    "DEFAULT_PORT",
    "DEFAULT_RATE_LIMIT_PER_TOKEN",
    "DEFAULT_RETRY_AFTER_SECONDS",
    "BridgeConfig",
    "Limits",
]

DEFAULT_HOST: Final = "127.0.0.1"
"""Loopback: other hosts can reach the bridge only when you bind elsewhere (with a token)."""
DEFAULT_PORT: Final = 4319
"""Next to OTLP/HTTP's 4318, which the Collector forwarding to the bridge usually holds."""
DEFAULT_GRACEFUL_TIMEOUT: Final = 10
"""Seconds requests in progress may take to finish once a stop is requested."""
DEFAULT_MAX_REQUEST_BYTES: Final = 8 << 20
"""Largest request body as received (compressed), 8 MiB."""
DEFAULT_MAX_DECOMPRESSED_BYTES: Final = 32 << 20
"""Largest body after gzip/deflate, 32 MiB (a gzip bomb is refused at this size)."""
DEFAULT_MAX_ITEMS: Final = 20_000
"""Most spans, data points or log records in one request (Collector batches are 8192)."""
DEFAULT_MAX_ATTRIBUTE_LENGTH: Final = 256
"""Longest ``paygent.*`` attribute key or string value on a usage record, in characters."""
DEFAULT_MAX_CONCURRENT_REQUESTS: Final = 16
"""Export requests processed at once; more are answered 429 with ``Retry-After``."""
DEFAULT_MAX_REQUESTS_PER_TOKEN: Final = 12
"""Export requests one token may have in progress (reading or processing), 429 beyond: no
token can take every processing slot."""
DEFAULT_RATE_LIMIT_PER_TOKEN: Final = 100.0
"""Export requests per second per token (bursts of twice as many), 429 beyond; 0: off."""
DEFAULT_MEMORY_BUDGET: Final = 128 << 20
"""Bytes that all request bodies being read and inflated may hold together, 128 MiB; a
request that does not fit is answered 503 with ``Retry-After``."""
DEFAULT_MAX_CONNECTIONS: Final = 512
"""Open connections; at the limit a new one evicts the longest-waiting idle one, or is refused
with 503 (half the usual 1024 open-file limit, which the bridge raises when it can)."""
DEFAULT_MAX_HEADER_BYTES: Final = 64 << 10
"""Largest request head (request line and headers), 64 KiB: 431, before authentication."""
DEFAULT_HEADER_TIMEOUT: Final = 10.0
"""Seconds from a connection's opening (or a request's first byte) to its complete head."""
DEFAULT_BODY_TIMEOUT: Final = 10.0
"""Seconds a request body may take before :data:`DEFAULT_MIN_BODY_RATE` applies."""
DEFAULT_MIN_BODY_RATE: Final = 32 << 10
"""Bytes per second a body must average after the body timeout's allowance (32 KiB/s): a
body of N bytes may take ``body_timeout + N / min_body_rate`` seconds, then 408."""
DEFAULT_KEEP_ALIVE_TIMEOUT: Final = 15.0
"""Seconds an idle connection stays open between requests."""
DEFAULT_DRAIN_GRACE: Final = 5.0
"""Seconds between SIGTERM and closing the listener, while ``/health`` answers 503 and new
exports are refused with 503, so load balancers stop sending first."""
DEFAULT_RETRY_AFTER_SECONDS: Final = 5
"""``Retry-After`` sent when the spool is full or the bridge is stopping."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request, a connection and a token may hold or take; each breach is answered
    with its own status and message (``docs/bridge.md`` has the table)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    max_items: int = DEFAULT_MAX_ITEMS
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_requests_per_token: int = DEFAULT_MAX_REQUESTS_PER_TOKEN
    rate_limit_per_token: float = DEFAULT_RATE_LIMIT_PER_TOKEN
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """Everything the bridge app needs. The exporter config says where usage is delivered."""

    exporter: ExporterConfig
    auth: BearerAuth = field(default_factory=BearerAuth)
    limits: Limits = field(default_factory=Limits)
    retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    """Seconds spent delivering pending records at shutdown (the rest stays in the spool)."""
