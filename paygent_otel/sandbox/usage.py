"""The sandbox's ``/usage`` page: its ledger's usage, and the health and conservation
report of the spools it is told to watch."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from paygent_otel._web.usage_page import (
    UsagePoint,
    render_page,
    spool_health,
    usage_route,
    window,
)
from paygent_otel.delivery.reconcile import check_against_ledger, report_from_journal
from paygent_otel.delivery.spool import open_sqlite_view
from paygent_otel.sandbox.ledger import Ledger

if TYPE_CHECKING:
    from paygent_otel.sandbox.app import SandboxApp

__all__ = ["sandbox_page"]


def sandbox_page(app: SandboxApp, spools: Sequence[Path]) -> Callable[[Request], Any]:
    """The page's route handler for the sandbox: its ledger's usage; the health and
    conservation report of ``spools`` (checked against the ledger), when given."""
    ledger = Ledger(app.writer.path)

    def build(period: str, kind: str) -> str:
        since, _ = window(period, time.time())
        usage = [
            UsagePoint(g[period], g["customer_id"], g["kind"], g["calls"],
                       g["audio_minutes"] + g["sts_minutes"], g["characters"], g["sts_tokens"])
            for g in ledger.totals(by=(period, "customer_id", "kind"), since=since)
        ]  # fmt: skip
        health, journal = [], []
        for path in spools:
            if not path.is_file():
                continue
            spool = open_sqlite_view(path)
            try:
                health.append(spool_health(spool))
                journal += spool.journal()
            finally:
                spool.close()
        report = None
        if spools:
            report = report_from_journal(journal, [str(p) for p in spools])
            check_against_ledger(report, journal, ledger)
        return render_page(
            title="paygent sandbox: usage",
            source=f"sandbox ledger {ledger.path}",
            usage=usage, period=period, kind=kind, health=health, conservation=report,
        )  # fmt: skip

    return usage_route(build, app.accepts_key if app.has_api_key else None)
