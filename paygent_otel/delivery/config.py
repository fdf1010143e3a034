"""Every setting of the exporters and the bridge, declared once in :data:`SETTINGS`.

Each row names the constructor argument (and :class:`ExporterConfig` field), the
environment variable, how a value is read and checked, the default and one line of
documentation. From the table come :meth:`ExporterConfig.resolve` (argument, then the
signal's variable ``OTEL_EXPORTER_PAYGENT_TRACES_*`` / ``_METRICS_*``, then the generic one,
then the default), the ``paygent-otel serve`` delivery flags (:func:`add_setting_flags`) and
the table in ``docs/configuration.md`` (``python -m paygent_otel.delivery.config_doc``; a test fails
when the two drift apart). Every environment variable this package reads is defined here.

Bad values: a bad *argument* raises ``ValueError`` when the exporter (or bridge) is built,
the one place user code may see an error from this library. A bad *environment* value is
logged as a warning naming the variable and the value, and the default is used, except
where the default would send usage somewhere else (endpoint, API key, TLS files): then
:attr:`ExporterConfig.delivery_blocked` says why, and delivery keeps the records and sends
nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypedDict, TypeVar, Unpack, cast
from urllib.parse import urlsplit

from paygent_otel.delivery.spool.url import spool_location
from paygent_otel.delivery.units import flag_type, parse_duration, parse_size

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_SPOOL_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "MEMORY_SPOOL",
    "SETTINGS",
    "ExporterConfig",
    "ExporterSettings",
    "Setting",
    "add_setting_flags",
    "default_spool_path",
    "flag_type",
    "flag_values",
    "parse_endpoint",
    "read_setting",
]

_logger = logging.getLogger("paygent_otel.config")
T = TypeVar("T")

DEFAULT_ENDPOINT: Final = "https://cp-api.withpaygent.com"
"""The Paygent API base URL (the SDK's hard-coded base)."""
DEFAULT_TIMEOUT: Final = 10.0
"""Seconds one tracking request may take (the SDK's timeout)."""
DEFAULT_MAX_IN_FLIGHT: Final = 128
"""Tracking requests in flight at once: enough to keep up at a real network's latency
(``bench/RESULTS.md`` has the figures); connections open only under backlog."""
DEFAULT_SPOOL_MAX_BYTES: Final = 1 << 30
"""Size cap of the durable spool file (1 GiB); new records are refused past it."""
DEFAULT_FLUSH_TIMEOUT: Final = 10.0
"""Seconds ``shutdown()`` (and a stopping bridge) spends delivering pending records."""
MEMORY_MAX_RETRY_SECONDS: Final = 300.0
"""Retry limit of in-memory mode (a durable spool retries until delivered)."""
MEMORY_SPOOL: Final = ":memory:"
"""Spool path value that selects the in-memory queue (records are lost on a crash)."""
BARE_TIMEOUT_LIMIT: Final = 1000.0
"""A request timeout written as a bare number this large is refused: it is almost surely
milliseconds (as the OpenTelemetry specification writes exporter timeouts), not seconds."""

_PREFIX: Final = "OTEL_EXPORTER_PAYGENT_"

# The environment variables. Their meaning, type and default are the rows of SETTINGS below
# (and the table in docs/configuration.md), so they are said once.
OTEL_EXPORTER_PAYGENT_ENDPOINT: Final = "OTEL_EXPORTER_PAYGENT_ENDPOINT"
OTEL_EXPORTER_PAYGENT_TIMEOUT: Final = "OTEL_EXPORTER_PAYGENT_TIMEOUT"
OTEL_EXPORTER_PAYGENT_HEADERS: Final = "OTEL_EXPORTER_PAYGENT_HEADERS"
PAYGENT_API_KEY: Final = "PAYGENT_API_KEY"
PAYGENT_AGENT_ID: Final = "PAYGENT_AGENT_ID"
PAYGENT_CUSTOMER_ID: Final = "PAYGENT_CUSTOMER_ID"
PAYGENT_INDICATOR: Final = "PAYGENT_INDICATOR"
OTEL_EXPORTER_PAYGENT_SPOOL_PATH: Final = "OTEL_EXPORTER_PAYGENT_SPOOL_PATH"
OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES: Final = "OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES"
OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT: Final = "OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT"
OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS: Final = "OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS"
OTEL_EXPORTER_PAYGENT_FLUSH_TIMEOUT: Final = "OTEL_EXPORTER_PAYGENT_FLUSH_TIMEOUT"
OTEL_EXPORTER_PAYGENT_TRACE_TAGS: Final = "OTEL_EXPORTER_PAYGENT_TRACE_TAGS"
OTEL_EXPORTER_PAYGENT_FRAMEWORKS: Final = "OTEL_EXPORTER_PAYGENT_FRAMEWORKS"
"""Voice-agent frameworks whose own spans/metrics are billed, ``pipecat,livekit`` (each may
end in ``:indicator``). Default none. See ``docs/frameworks.md``."""
OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS: Final = "OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS"
"""PostgreSQL spool: seconds a leased record is reserved for one replica. Default 60."""
OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH: Final = "OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH"
"""PostgreSQL spool: the local SQLite file used while PostgreSQL does not answer."""
OTEL_EXPORTER_PAYGENT_GENAI: Final = "OTEL_EXPORTER_PAYGENT_GENAI"
OTEL_EXPORTER_PAYGENT_CERTIFICATE: Final = "OTEL_EXPORTER_PAYGENT_CERTIFICATE"
OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE: Final = "OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE"
OTEL_EXPORTER_PAYGENT_CLIENT_KEY: Final = "OTEL_EXPORTER_PAYGENT_CLIENT_KEY"
OTEL_EXPORTER_PAYGENT_BAGGAGE: Final = "OTEL_EXPORTER_PAYGENT_BAGGAGE"
PAYGENT_BRIDGE_TOKEN: Final = "PAYGENT_BRIDGE_TOKEN"  # noqa: S105 (a variable name)
XDG_STATE_HOME: Final = "XDG_STATE_HOME"


def default_spool_path() -> Path:
    """``$XDG_STATE_HOME/paygent-otel/spool.sqlite3`` (``~/.local/state`` when unset)."""
    state = os.environ.get(XDG_STATE_HOME) or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "paygent-otel" / "spool.sqlite3"


# ---------------------------------------------------------------- value readers
# Each takes an argument value or an environment string and returns the setting's value,
# or raises ValueError saying what is wrong (the caller adds the name and the value).

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_SAFE: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return value.strip() or None


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("must be true or false (also 1/0, yes/no, on/off)")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number of at least 0")
    return float(value)


def _duration(value: object) -> float:
    return parse_duration(value) if isinstance(value, str) else _number(value)


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def _request_timeout(value: object) -> float:
    seconds = _positive_duration(value)
    bare = not isinstance(value, str) or re.fullmatch(r"\s*[\d.]+\s*", value) is not None
    if bare and seconds >= BARE_TIMEOUT_LIMIT:
        raise ValueError(
            f"a bare timeout is in seconds, and {seconds:g} s is almost surely meant as "
            f"milliseconds: did you mean {seconds:g}ms? (write the unit: {seconds:g}ms or "
            f"{seconds / 1000:g}s)"
        )
    return seconds


def _retry_limit(value: object) -> float | None:
    return _duration(value) or None  # 0: never give up


def _count(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _size(value: object) -> int:
    if isinstance(value, str):
        value = parse_size(value)
    return _count(value)


def parse_endpoint(value: object) -> str | None:
    """The Paygent API base URL ``value`` names, without a trailing slash; ``ValueError``
    says what is wrong with it (no http/https scheme, no host, the usage path appended)."""
    text = _text(value)
    if text is None:
        return None
    text = text.rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            "must start with http:// or https:// (for example https://cp-api.withpaygent.com)"
        )
    try:
        host, _port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"has a bad port ({exc})") from None
    if not host:
        raise ValueError("has no host name")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or a fragment")
    if parts.path.rstrip("/").endswith("/api/v2/usage"):
        raise ValueError(
            "is the base URL: leave out /api/v2/usage, which the exporter appends "
            f"(use {text[: text.rindex('/api/v2/usage')] or text})"
        )
    return text


def _api_key(value: object) -> str | None:
    # A key read from a file often ends in a newline, which no HTTP header may carry.
    text = _text(value)
    if text is not None and not _HEADER_SAFE.fullmatch(text):
        raise ValueError(
            "contains characters an HTTP header cannot carry (spaces, control or non-ASCII "
            "characters)"
        )
    return text


def _names(value: object) -> tuple[str, ...]:
    """A comma list (``pipecat,livekit:voice-minutes``) or a sequence of strings."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a comma-separated string or a list of strings")
    return tuple(item.strip() for item in items if item.strip())


def _headers(value: object) -> dict[str, str]:
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, header_value = item.partition("=")
            if not sep:
                raise ValueError(f"item {item.strip()!r} is not name=value")
            pairs[name.strip()] = header_value.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ValueError("must be a dict of header names to values, or 'k1=v1,k2=v2'")
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if not isinstance(header_value, str) or not header_value.isprintable():
            raise ValueError(f"the value of {name} must be printable text")
        headers[name] = header_value
    return headers


def _path(value: object) -> str | None:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _text(value)


def _spool_path(value: object) -> str | None:
    """A file path, ``:memory:``, or a ``postgresql://`` URL (kept, but shown masked)."""
    path = _path(value)
    return None if path is None else spool_location(path)


def _readable_file(value: object) -> str | None:
    path = _path(value)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError("no such file")
    if not os.access(path, os.R_OK):
        raise ValueError("the file is not readable by this process")
    return path


# ---------------------------------------------------------------- the table


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting: where it comes from, how it is read, what it defaults to."""

    name: str
    """Constructor argument and :class:`ExporterConfig` field; empty for a variable that is
    not an exporter setting (baggage switch, bridge token)."""
    env: str
    """The generic environment variable."""
    read: Callable[[object], Any]
    """Argument or environment text -> value; raises ValueError naming the problem."""
    default: Any = None
    """The value when neither argument nor variable is set (a callable gets the values
    resolved so far)."""
    kind: str
    """What the value is, for the docs: ``URL``, ``duration``, ``bool``, ..."""
    default_doc: str
    doc: str
    per_signal: bool = True
    """``OTEL_EXPORTER_PAYGENT_TRACES_<X>`` / ``_METRICS_<X>`` come before the generic name."""
    blocks: bool = False
    """A bad environment value stops delivery (``delivery_blocked``) instead of falling
    back: the default would send usage somewhere the user did not choose."""
    secret: bool = False
    flag: str | None = None
    """The ``paygent-otel serve`` flag that sets it, if any."""

    def env_names(self, signal: str | None) -> tuple[str, ...]:
        """Signal-specific name first (``OTEL_EXPORTER_PAYGENT_TRACES_ENDPOINT``), then generic."""
        if signal is None or not self.per_signal:
            return (self.env,)
        return (f"{_PREFIX}{signal.upper()}_{self.env[len(_PREFIX) :]}", self.env)

    def shown(self, value: object) -> str:
        """The value as messages may show it (never a secret)."""
        return "<hidden>" if self.secret else repr(value)

    def default_for(self, resolved: Mapping[str, Any]) -> Any:
        """The default, given the values resolved before this one."""
        return self.default(resolved) if callable(self.default) else self.default

    def from_argument(self, value: object) -> Any:
        """The value of an explicit argument; ``ValueError`` naming it when it is bad."""
        try:
            return self.read(value)
        except ValueError as exc:
            raise ValueError(f"{self.name}={self.shown(value)}: {exc}") from None

    def from_environment(self, signal: str | None) -> tuple[str, str] | None:
        """``(variable, text)`` of the first variable set to a non-blank value, or None."""
        for name in self.env_names(signal):
            text = os.environ.get(name, "").strip()
            if text:
                return name, text
        return None


def _default_retry_limit(resolved: Mapping[str, Any]) -> float | None:
    return MEMORY_MAX_RETRY_SECONDS if resolved.get("spool_path") == MEMORY_SPOOL else None


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        name="api_key", env=PAYGENT_API_KEY, read=_api_key, per_signal=False, blocks=True,
        secret=True, kind="string", default_doc="none",
        doc="Paygent API key (`paygent-api-key` header). Without it nothing is sent: one "
        "error at start, records stay in the durable spool. Never logged.",
    ),
    Setting(
        name="endpoint", env=OTEL_EXPORTER_PAYGENT_ENDPOINT, read=parse_endpoint, blocks=True,
        default=DEFAULT_ENDPOINT, kind="URL", default_doc=f"`{DEFAULT_ENDPOINT}`",
        flag="--endpoint",
        doc="API base URL (http or https, with a host); records go to "
        "`{endpoint}/api/v2/usage`, so a URL that already ends in it is refused.",
    ),
    Setting(
        name="timeout", env=OTEL_EXPORTER_PAYGENT_TIMEOUT, read=_request_timeout,
        default=DEFAULT_TIMEOUT, kind="duration", default_doc="`10s`", flag="--timeout",
        doc="Time one request may take. A bare number is seconds (as opentelemetry-python's "
        f"OTLP exporter reads its timeout); a bare {BARE_TIMEOUT_LIMIT:g} or more is refused "
        "as probably milliseconds: write `10000ms`.",
    ),
    Setting(
        name="headers", env=OTEL_EXPORTER_PAYGENT_HEADERS, read=_headers, default=lambda _: {},
        kind="`k1=v1,k2=v2`", default_doc="none", secret=True,
        doc="Extra request headers (a dict as argument).",
    ),
    Setting(
        name="agent_id", env=PAYGENT_AGENT_ID, read=_text, per_signal=False, kind="string",
        default_doc="none", doc="Agent id for records that carry none.",
    ),
    Setting(
        name="customer_id", env=PAYGENT_CUSTOMER_ID, read=_text, per_signal=False,
        kind="string", default_doc="none", doc="Customer id for records that carry none.",
    ),
    Setting(
        name="indicator", env=PAYGENT_INDICATOR, read=_text, per_signal=False, kind="string",
        default_doc="none", doc="Indicator for records that carry none.",
    ),
    Setting(
        name="spool_path", env=OTEL_EXPORTER_PAYGENT_SPOOL_PATH, read=_spool_path,
        default=lambda _: str(default_spool_path()), kind="path", flag="--spool",
        default_doc="`$XDG_STATE_HOME/paygent-otel/spool.sqlite3` (`~/.local/state/...`)",
        doc=f"Durable spool file (SQLite), or a `postgresql://` URL for one spool many hosts "
        f"share (its password is masked wherever it is shown); `{MEMORY_SPOOL}` keeps records "
        "in memory (lost on a crash).",
    ),
    Setting(
        name="spool_max_bytes", env=OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES, read=_size,
        default=DEFAULT_SPOOL_MAX_BYTES, kind="size", default_doc="`1GiB`",
        flag="--spool-max-bytes",
        doc="Spool size cap (bare: bytes; `64MiB`, `1GiB`); past it new records are "
        "refused (counted, logged).",
    ),
    Setting(
        name="max_in_flight", env=OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT, read=_count,
        default=DEFAULT_MAX_IN_FLIGHT, kind="integer", default_doc=f"`{DEFAULT_MAX_IN_FLIGHT}`",
        flag="--max-in-flight", doc="Concurrent requests to Paygent.",
    ),
    Setting(
        name="max_retry_seconds", env=OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS,
        read=_retry_limit, default=_default_retry_limit, kind="duration",
        default_doc="never (durable), `300s` (memory)", flag="--max-retry",
        doc="Give up on a record (dead letter `gave_up`) after this long; `0` = never. A "
        "bare number is seconds.",
    ),
    Setting(
        name="flush_timeout", env=OTEL_EXPORTER_PAYGENT_FLUSH_TIMEOUT, read=_duration,
        default=DEFAULT_FLUSH_TIMEOUT, kind="duration", default_doc="`10s`",
        flag="--flush-timeout",
        doc="Longest `shutdown()` (at exit: the SDK's shutdown) or a stopping bridge waits "
        "for delivery; what is left stays in the spool. A bare number is seconds.",
    ),
    Setting(
        name="certificate", env=OTEL_EXPORTER_PAYGENT_CERTIFICATE, read=_readable_file,
        blocks=True, kind="path", default_doc="the system trust store", flag="--certificate",
        doc="CA bundle (PEM) that verifies the endpoint's TLS certificate.",
    ),
    Setting(
        name="client_certificate", env=OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE,
        read=_readable_file, blocks=True, kind="path", default_doc="none",
        flag="--client-certificate", doc="Client certificate (PEM) for mutual TLS.",
    ),
    Setting(
        name="client_key", env=OTEL_EXPORTER_PAYGENT_CLIENT_KEY, read=_readable_file,
        blocks=True, kind="path", default_doc="none", flag="--client-key",
        doc="Private key (PEM) of the client certificate (omit it when the certificate file "
        "holds the key).",
    ),
    Setting(
        name="trace_tags", env=OTEL_EXPORTER_PAYGENT_TRACE_TAGS, read=_flag, default=True,
        kind="bool", default_doc="`true`",
        doc="Send `otel_trace_id` / `otel_span_id` meta tags.",
    ),
    Setting(
        name="genai", env=OTEL_EXPORTER_PAYGENT_GENAI, read=_flag, default=False,
        kind="bool", default_doc="`false`",
        doc="Bill spans carrying `gen_ai.usage.*` as speech-to-speech records.",
    ),
    Setting(
        name="frameworks", env=OTEL_EXPORTER_PAYGENT_FRAMEWORKS, read=_names, default=(),
        kind="list", default_doc="none",
        doc="Voice-agent frameworks whose own spans and metrics are billed: `pipecat`, "
        "`livekit`, comma-separated, each optionally `:INDICATOR` (docs/frameworks.md).",
    ),
    Setting(
        name="", env=OTEL_EXPORTER_PAYGENT_BAGGAGE, read=_flag, default=True,
        per_signal=False, kind="bool", default_doc="`true`",
        doc="Read customer and agent ids from baggage (`PaygentBaggageSpanProcessor`, "
        "`UsageInstruments(baggage=True)`); `false` turns both off.",
    ),
    Setting(
        name="", env=OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS, read=_positive_duration,
        default=60.0, per_signal=False, kind="duration", default_doc="`60s`",
        doc="PostgreSQL spool: how long a leased record is reserved for one replica; a "
        "dead replica's leases are taken back after it.",
    ),
    Setting(
        name="", env=OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH, read=_path, per_signal=False,
        kind="path", default_doc="`pg-fallback.sqlite3` beside the default spool",
        doc="PostgreSQL spool: the local SQLite file records go to while PostgreSQL does not "
        "answer; they move to PostgreSQL when it does.",
    ),
    Setting(
        name="", env=PAYGENT_BRIDGE_TOKEN, read=_text, per_signal=False, secret=True,
        kind="`TOKEN[=AGENTS]`", default_doc="none",
        doc="A bearer token `paygent-otel serve` requires (prefer `--token-file`).",
    ),
)  # fmt: skip
"""Every setting, in the order they are resolved and documented."""

_EXPORTER_SETTINGS: Final = tuple(s for s in SETTINGS if s.name)
_BY_ENV: Final = {s.env: s for s in SETTINGS}


class ExporterSettings(TypedDict, total=False):
    """Keyword arguments every exporter takes (the rows of :data:`SETTINGS`); each falls
    back to its environment variable, then to its default (``docs/configuration.md``)."""

    endpoint: str | None
    api_key: str | None
    timeout: float | str | None
    headers: Mapping[str, str] | None
    agent_id: str | None
    customer_id: str | None
    indicator: str | None
    spool_path: str | os.PathLike[str] | None
    spool_max_bytes: int | str | None
    max_in_flight: int | None
    max_retry_seconds: float | str | None
    flush_timeout: float | str | None
    certificate: str | os.PathLike[str] | None
    client_certificate: str | os.PathLike[str] | None
    client_key: str | os.PathLike[str] | None
    trace_tags: bool | None
    genai: bool | None
    frameworks: str | Sequence[str] | None


def read_setting(env: str, signal: str | None = None) -> Any:
    """The value of the setting whose variable is ``env``, from the environment alone.

    A bad value is logged as a warning naming the variable and the value; the default is
    used. For switches read outside an exporter (:data:`OTEL_EXPORTER_PAYGENT_BAGGAGE`)."""
    setting = _BY_ENV[env]
    found = setting.from_environment(signal)
    if found is not None:
        try:
            return setting.read(found[1])
        except ValueError as exc:
            _warn_fallback(setting, found, exc)
    return setting.default_for({})


_warned: set[tuple[str, str]] = set()


def _warn_fallback(setting: Setting, found: tuple[str, str], exc: ValueError) -> None:
    name, text = found
    if (name, text) in _warned:  # settings are read again by each exporter and command
        return
    _warned.add((name, text))
    _logger.warning(
        "paygent-otel: ignoring %s=%s: %s; using the default (%s)",
        name,
        setting.shown(text),
        exc,
        setting.default_doc.replace("`", ""),
    )


@dataclass(frozen=True, kw_only=True)
class ExporterConfig:
    """Resolved settings of one exporter (or the bridge). The API key and the headers never
    appear in ``repr``."""

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
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    certificate: str | None = None
    """CA bundle path; None: the system trust store."""
    client_certificate: str | None = None
    client_key: str | None = None
    trace_tags: bool = True
    genai: bool = False
    frameworks: tuple[str, ...] = ()
    """Entries of :data:`OTEL_EXPORTER_PAYGENT_FRAMEWORKS` (see
    ``paygent_otel.convention.frameworks``)."""
    delivery_blocked: str | None = None
    """Why nothing may be sent (a bad endpoint, key or TLS file in the environment), or
    None. While set, delivery keeps every record and sends none."""

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
        blocked = "" if self.delivery_blocked is None else f", blocked={self.delivery_blocked!r}"
        return (
            f"ExporterConfig(endpoint={self.endpoint!r}, api_key={key!r}, "
            f"timeout={self.timeout}, spool_path={self.spool_path!r}, "
            f"max_in_flight={self.max_in_flight}, max_retry_seconds={self.max_retry_seconds}"
            f"{blocked})"
        )

    @classmethod
    def resolve(
        cls, signal: str | None = None, **arguments: Unpack[ExporterSettings]
    ) -> ExporterConfig:
        """Apply the precedence: argument > ``..._<SIGNAL>_...`` env > generic env > default.

        ``signal`` is ``"traces"``, ``"metrics"`` or None (the bridge). A bad argument raises
        ``ValueError`` naming it; a bad environment value warns and falls back to the
        default, or, for the endpoint, the key and the TLS files, sets
        :attr:`delivery_blocked`.
        """
        given = cast(dict[str, object], arguments)
        values: dict[str, Any] = {}
        from_env: dict[str, str] = {}
        blocked: list[str] = []
        for setting in _EXPORTER_SETTINGS:
            value = given.get(setting.name)
            if value is not None and value != "":
                values[setting.name] = setting.from_argument(value)
                continue
            found = setting.from_environment(signal)
            if found is None:
                values[setting.name] = setting.default_for(values)
                continue
            try:
                values[setting.name] = setting.read(found[1])
                from_env[setting.name] = found[0]
            except ValueError as exc:
                if setting.blocks:
                    blocked.append(f"{found[0]}={setting.shown(found[1])}: {exc}")
                    # Records are filed under the endpoint as written, never the default.
                    values[setting.name] = None if setting.secret else found[1]
                else:
                    _warn_fallback(setting, found, exc)
                    values[setting.name] = setting.default_for(values)
        if values["client_key"] and not values["client_certificate"]:
            problem = "a client key without a client certificate"
            if "client_key" not in from_env:
                raise ValueError(f"client_key: {problem} (pass client_certificate too)")
            blocked.append(f"{from_env['client_key']}: {problem}")
        return cls(**values, delivery_blocked="; ".join(blocked) or None)


# ---------------------------------------------------------------- flags and docs


def add_setting_flags(group: argparse._ArgumentGroup) -> None:
    """Add a flag for every setting that has one (default None: the variable, then the
    default apply, through :meth:`ExporterConfig.resolve`)."""
    for setting in _EXPORTER_SETTINGS:
        if setting.flag is None:
            continue
        group.add_argument(
            setting.flag,
            dest=setting.name,
            type=flag_type(setting.read),
            metavar=setting.kind.upper(),
            help=f"{_plain(setting.doc)} (default: ${setting.env}, else "
            f"{_plain(setting.default_doc)})".replace("%", "%%"),
        )


def flag_values(args: argparse.Namespace) -> ExporterSettings:
    """The settings given as flags added by :func:`add_setting_flags`."""
    return cast(
        ExporterSettings,
        {s.name: getattr(args, s.name) for s in _EXPORTER_SETTINGS if s.flag is not None},
    )


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")
