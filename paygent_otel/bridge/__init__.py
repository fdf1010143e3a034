"""The OTLP bridge: ``paygent-otel serve``, an OTLP/HTTP receiver that bills usage.

Applications in any language set the convention's attributes
(:mod:`paygent_otel.convention.semconv`) and send OTLP to their Collector; the Collector
forwards the usage-bearing spans, metrics and log records here. The bridge maps them with
the same code as the SDK exporters, commits them to the durable spool, acknowledges, and
delivers to Paygent in the background. See ``docs/bridge.md`` and ``collector-config/``.

:class:`BridgeApp` and :class:`BridgeServer` need the ``server`` extra (uvicorn, starlette);
they are imported on first use, so the rest works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from paygent_otel.bridge.auth import BearerAuth, Grant, TokenError, is_loopback
from paygent_otel.bridge.config import DEFAULT_HOST, DEFAULT_PORT, BridgeConfig, Limits
from paygent_otel.bridge.cumulative import CumulativeStore, cumulative_state_path
from paygent_otel.bridge.otlp import (
    LOGS_PATH,
    METRICS_PATH,
    SIGNAL_PATHS,
    TRACES_PATH,
    Signal,
    UsageExtractor,
)

if TYPE_CHECKING:
    from paygent_otel.bridge.app import BridgeApp
    from paygent_otel.bridge.server import BridgeServer

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOGS_PATH",
    "METRICS_PATH",
    "SIGNAL_PATHS",
    "TRACES_PATH",
    "BearerAuth",
    "BridgeApp",
    "BridgeConfig",
    "BridgeServer",
    "CumulativeStore",
    "Grant",
    "Limits",
    "Signal",
    "TokenError",
    "UsageExtractor",
    "cumulative_state_path",
    "is_loopback",
]

_LAZY = {"BridgeApp": ".app", "BridgeServer": ".server"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
