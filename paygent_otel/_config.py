"""Exporter configuration: argument, then signal env var, then generic env var, then default.

Written once here and shared by the span exporter, the metric exporter and the bridge.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._spool_url import spool_location

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_SPOOL_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "MEMORY_SPOOL",
    "ExporterConfig",
    "default_spool_path",
]

_logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://cp-api.withpaygent.com"
"""The Paygent API base URL (the SDK's hard-coded base)."""
DEFAULT_TIMEOUT = 10.0
"""Seconds one tracking request may take (the SDK's timeout)."""
DEFAULT_MAX_IN_FLIGHT = 128
"""Tracking requests in flight at once. At 50 ms per request, 64 delivered ~700 records/s
on 2 cores and 128 ~1,000/s (``bench/RESULTS.md``); connections open only under backlog."""
DEFAULT_SPOOL_MAX_BYTES = 1 << 30
"""Size cap of the durable spool file (1 GiB); new records are refused past it."""
MEMORY_SPOOL = ":memory:"
"""Spool path value that selects the in-memory queue (records are lost on a crash)."""

OTEL_EXPORTER_PAYGENT_ENDPOINT = "OTEL_EXPORTER_PAYGENT_ENDPOINT"
"""Paygent API base URL for every signal. Default :data:`DEFAULT_ENDPOINT`."""
OTEL_EXPORTER_PAYGENT_TIMEOUT = "OTEL_EXPORTER_PAYGENT_TIMEOUT"
"""Seconds per tracking request. Default :data:`DEFAULT_TIMEOUT`."""
OTEL_EXPORTER_PAYGENT_HEADERS = "OTEL_EXPORTER_PAYGENT_HEADERS"
"""Extra request headers, ``k1=v1,k2=v2`` (W3C-baggage style, as OTLP exporters take)."""
PAYGENT_API_KEY = "PAYGENT_API_KEY"
"""The Paygent API key, sent as the ``paygent-api-key`` header. Required to deliver."""
PAYGENT_AGENT_ID = "PAYGENT_AGENT_ID"
"""Default agent id for records that carry none (last in the precedence)."""
PAYGENT_CUSTOMER_ID = "PAYGENT_CUSTOMER_ID"
"""Default customer id for records that carry none (last in the precedence)."""
PAYGENT_INDICATOR = "PAYGENT_INDICATOR"
"""Default indicator for records that carry none."""
OTEL_EXPORTER_PAYGENT_SPOOL_PATH = "OTEL_EXPORTER_PAYGENT_SPOOL_PATH"
"""Durable spool file (SQLite), or a ``postgresql://`` URL for the spool many hosts share
(password masked wherever it is shown). ``:memory:`` selects in-memory mode. Default
:func:`default_spool_path`."""
OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES = "OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES"
"""Spool size cap in bytes. Default :data:`DEFAULT_SPOOL_MAX_BYTES`."""
OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT = "OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT"
"""Concurrent tracking requests. Default :data:`DEFAULT_MAX_IN_FLIGHT`."""
OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS = "OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS"
"""Give up retrying a record after this many seconds (0 = never). Default: never with the
durable spool (an outage of hours loses nothing), 300 in memory mode."""
OTEL_EXPORTER_PAYGENT_TRACE_TAGS = "OTEL_EXPORTER_PAYGENT_TRACE_TAGS"
"""``true``/``false``: attach ``otel_trace_id``/``otel_span_id`` metaTags. Default true."""
OTEL_EXPORTER_PAYGENT_GENAI = "OTEL_EXPORTER_PAYGENT_GENAI"
"""``true``/``false``: bill spans that carry ``gen_ai.usage.*`` as STS records. Default false."""


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _signal_names(base: str, signal: str | None) -> tuple[str, ...]:
    """Signal-specific name first (``OTEL_EXPORTER_PAYGENT_TRACES_ENDPOINT``), then generic."""
    if signal is None:
        return (base,)
    prefix = "OTEL_EXPORTER_PAYGENT_"
    return (f"{prefix}{signal.upper()}_{base[len(prefix) :]}", base)


def _number(raw: str | None, name: str, default: float) -> float:
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        _logger.error("%s=%r is not a number; using the default %s", name, raw, default)
        return default


def _positive(value: float, name: str, default: float) -> float:
    """A timeout, concurrency or size cap of 0 (or NaN) would stall delivery: refuse it."""
    if value > 0 and value != float("inf"):
        return value
    _logger.error("%s=%r must be a positive number; using the default %s", name, value, default)
    return default


def _flag(raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    return raw.lower() in ("1", "true", "yes", "on")


def _headers(raw: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in (raw or "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers


def default_spool_path() -> Path:
    """``$XDG_STATE_HOME/paygent-otel/spool.sqlite3`` (``~/.local/state`` when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "paygent-otel" / "spool.sqlite3"


@dataclass(frozen=True, kw_only=True)
class ExporterConfig:
    """Resolved settings of one exporter. The API key never appears in ``repr``."""

    endpoint: str = DEFAULT_ENDPOINT
    api_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    agent_id: str | None = None
    customer_id: str | None = None
    indicator: str | None = None
    spool_path: str = MEMORY_SPOOL
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_retry_seconds: float | None = None
    """None: retry until delivered."""
    trace_tags: bool = True
    genai: bool = False

    @property
    def durable(self) -> bool:
        """True when records are committed to a spool file before ``export()`` returns."""
        return self.spool_path != MEMORY_SPOOL

    def __repr__(self) -> str:
        key = (
            "<unset>"
            if not self.api_key
            else "****" + self.api_key[-4:]
            if len(self.api_key) > 12
            else "****"
        )
        return (
            f"ExporterConfig(endpoint={self.endpoint!r}, api_key={key!r}, "
            f"timeout={self.timeout}, spool_path={self.spool_path!r}, "
            f"max_in_flight={self.max_in_flight}, max_retry_seconds={self.max_retry_seconds})"
        )

    @classmethod
    def resolve(
        cls,
        signal: str | None = None,
        *,
        endpoint: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
        agent_id: str | None = None,
        customer_id: str | None = None,
        indicator: str | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        spool_max_bytes: int | None = None,
        max_in_flight: int | None = None,
        max_retry_seconds: float | None = None,
        trace_tags: bool | None = None,
        genai: bool | None = None,
    ) -> ExporterConfig:
        """Apply the precedence: argument > ``..._<SIGNAL>_...`` env > generic env > default.

        ``signal`` is ``"traces"``, ``"metrics"`` or None (the bridge).
        """

        def env(base: str) -> str | None:
            return _env(*_signal_names(base, signal))

        resolved_spool = spool_location(
            os.fspath(spool_path)
            if spool_path is not None
            else env(OTEL_EXPORTER_PAYGENT_SPOOL_PATH) or str(default_spool_path())
        )
        if max_retry_seconds is None:
            raw = env(OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS)
            default_retry = 0.0 if resolved_spool != MEMORY_SPOOL else 300.0
            max_retry_seconds = _number(raw, OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS, default_retry)
        return cls(
            endpoint=(endpoint or env(OTEL_EXPORTER_PAYGENT_ENDPOINT) or DEFAULT_ENDPOINT).rstrip(
                "/"
            ),
            # A key read from a file often ends in a newline, which no HTTP header may carry.
            api_key=(api_key or "").strip() or _env(PAYGENT_API_KEY),
            timeout=_positive(
                timeout
                if timeout is not None
                else _number(
                    env(OTEL_EXPORTER_PAYGENT_TIMEOUT),
                    OTEL_EXPORTER_PAYGENT_TIMEOUT,
                    DEFAULT_TIMEOUT,
                ),
                "timeout",
                DEFAULT_TIMEOUT,
            ),
            headers=headers
            if headers is not None
            else _headers(env(OTEL_EXPORTER_PAYGENT_HEADERS)),
            agent_id=agent_id or _env(PAYGENT_AGENT_ID),
            customer_id=customer_id or _env(PAYGENT_CUSTOMER_ID),
            indicator=indicator if indicator is not None else _env(PAYGENT_INDICATOR),
            spool_path=resolved_spool,
            spool_max_bytes=int(
                _positive(
                    spool_max_bytes
                    if spool_max_bytes is not None
                    else _number(
                        env(OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES),
                        OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES,
                        DEFAULT_SPOOL_MAX_BYTES,
                    ),
                    "spool_max_bytes",
                    DEFAULT_SPOOL_MAX_BYTES,
                )
            ),
            max_in_flight=max(
                1,
                int(
                    _positive(
                        max_in_flight
                        if max_in_flight is not None
                        else _number(
                            env(OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT),
                            OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT,
                            DEFAULT_MAX_IN_FLIGHT,
                        ),
                        "max_in_flight",
                        DEFAULT_MAX_IN_FLIGHT,
                    )
                ),
            ),
            max_retry_seconds=max_retry_seconds or None,
            trace_tags=trace_tags
            if trace_tags is not None
            else _flag(env(OTEL_EXPORTER_PAYGENT_TRACE_TAGS), True),
            genai=genai if genai is not None else _flag(env(OTEL_EXPORTER_PAYGENT_GENAI), False),
        )
