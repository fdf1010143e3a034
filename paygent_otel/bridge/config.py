"""The bridge's settings and their defaults (no server dependency: the CLI parser reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .._config import DEFAULT_FLUSH_TIMEOUT, ExporterConfig
from .auth import BearerAuth

__all__ = [
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_ATTRIBUTE_LENGTH",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_PORT",
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
DEFAULT_RETRY_AFTER_SECONDS: Final = 5
"""``Retry-After`` sent when the spool is full or the bridge is stopping."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may hold; each breach is answered with its own status and message."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    max_items: int = DEFAULT_MAX_ITEMS
    max_attribute_length: int = DEFAULT_MAX_ATTRIBUTE_LENGTH
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """Everything the bridge app needs. The exporter config says where usage is delivered."""

    exporter: ExporterConfig
    auth: BearerAuth = field(default_factory=BearerAuth)
    limits: Limits = field(default_factory=Limits)
    retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    """Seconds spent delivering pending records at shutdown (the rest stays in the spool)."""
