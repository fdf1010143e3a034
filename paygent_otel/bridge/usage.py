"""The bridge's ``/usage`` page: the usage its spool delivered, its health and report."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from paygent_otel._web.usage_page import (
    SpoolHealth,
    UsagePoint,
    journal_usage,
    render_page,
    spool_health,
    usage_route,
    window,
)
from paygent_otel.delivery.reconcile import report_from_journal
from paygent_otel.delivery.spool import SqliteSpool

if TYPE_CHECKING:
    from paygent_otel.bridge.app import BridgeApp

__all__ = ["bridge_page"]


def bridge_page(app: BridgeApp) -> Callable[[Request], Any]:
    """The page's route handler for the bridge: its spool's billed usage, health, report."""

    def accepts(token: str) -> bool:
        return app.config.auth.check(f"Bearer {token}") is not None

    def build(period: str, kind: str) -> str:
        spool = app.pipeline.spool
        usage: list[UsagePoint] = []
        health: list[SpoolHealth] = []
        report = None
        if isinstance(spool, SqliteSpool) and not app.pipeline.is_shut_down:
            since, _ = window(period, time.time())
            usage = journal_usage(spool, since, period)
            health = [spool_health(spool, app.config.exporter.endpoint)]
            report = report_from_journal(spool.journal(), [str(spool.path)])
        return render_page(
            title="paygent-otel bridge: usage",
            source=f"bridge delivering to {app.config.exporter.endpoint}",
            usage=usage, period=period, kind=kind, health=health, conservation=report,
        )  # fmt: skip

    return usage_route(build, accepts if app.config.auth.required else None)
