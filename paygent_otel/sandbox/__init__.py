"""A local Paygent for tests, demos and benchmarks.

It serves ``POST /api/v2/usage`` like the Paygent API, validates every body strictly,
records accepted usage in a SQLite ledger, honours ``Idempotency-Key`` and injects latency,
failures and rejections on demand. See ``docs/sandbox.md``.

The server classes load on first use: reading a ledger (``paygent-otel ledger``) needs
neither starlette nor uvicorn, which only the ``server`` extra installs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from paygent_otel.sandbox.ledger import Ledger, LedgerWriter, UsageRow

if TYPE_CHECKING:
    from paygent_otel.sandbox.app import Faults, PayloadError, SandboxApp, validate_usage
    from paygent_otel.sandbox.server import SandboxProcess, SandboxServer

__all__ = [
    "Faults",
    "Ledger",
    "LedgerWriter",
    "PayloadError",
    "SandboxApp",
    "SandboxProcess",
    "SandboxServer",
    "UsageRow",
    "validate_usage",
]

_LAZY = {
    "Faults": ".app",
    "PayloadError": ".app",
    "SandboxApp": ".app",
    "validate_usage": ".app",
    "SandboxProcess": ".server",
    "SandboxServer": ".server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
