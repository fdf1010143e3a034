"""The usage page (``GET /usage``), served by the sandbox and by the bridge with one look.

Usage per customer over time as a chart (inline SVG drawn here, on the server: no script,
no build step, nothing fetched from the internet), delivery health (pending, delivery rate,
dead letters by reason with their messages, the last error per endpoint) and the
conservation report. Read-only. Customer ids are personal data: a request from off
loopback must carry the server's credentials (``Authorization: Bearer <token>``, or HTTP
Basic with the token as the password so a browser can ask for it); health probes are other
routes and stay open.
"""

from __future__ import annotations

import base64
import html
import ipaddress
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from paygent_otel._output import human_age, human_time, iso_utc
from paygent_otel.delivery.reconcile import BLIND_SPOTS, COLUMNS, Report

if TYPE_CHECKING:
    from paygent_otel.delivery.spool import SqliteSpoolView

__all__ = [
    "USAGE_PAGE_PATH",
    "SpoolHealth",
    "UsagePoint",
    "journal_usage",
    "render_page",
    "spool_health",
    "usage_route",
    "window",
]

USAGE_PAGE_PATH: Final = "/usage"
"""Where the sandbox and the bridge serve the page."""

WINDOWS: Final = {"hour": (48, 3600, "%Y-%m-%dT%H:00"), "day": (30, 86_400, "%Y-%m-%d")}
"""Chart periods: how many buckets back, bucket length in seconds, bucket label (UTC)."""

_KIND_UNITS: Final = {"stt": ("minutes", "audio minutes"), "tts": ("characters", "characters"),
                      "sts": ("tokens", "tokens")}  # fmt: skip
_PALETTE: Final = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
                   "#ca8a04", "#db2777")  # fmt: skip
_RATE_WINDOW_SECONDS: Final = 300.0


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """Billed usage of one customer and kind in one bucket (labelled as in :data:`WINDOWS`)."""

    bucket: str
    customer: str
    kind: str
    calls: int
    minutes: float = 0.0
    characters: int = 0
    tokens: int = 0


@dataclass
class SpoolHealth:
    """How delivery from one spool is going."""

    name: str
    pending: int = 0
    in_flight: int = 0
    oldest_pending_age: float | None = None
    delivered_recently: int = 0
    """Records delivered in the last :data:`_RATE_WINDOW_SECONDS`."""
    dead_letters: int = 0
    dead_reasons: list[tuple[str, str, int, float]] = field(default_factory=list)
    last_errors: list[tuple[str, str, int]] = field(default_factory=list)
    """(endpoint, its latest error, records waiting after an error)."""


def spool_health(spool: SqliteSpoolView, endpoint: str | None = None) -> SpoolHealth:
    """Read a spool's health; ``endpoint`` names its destination id in the error list."""
    from paygent_otel.delivery.spool import destination_id

    stats = spool.stats()
    mine = destination_id(endpoint) if endpoint else None
    return SpoolHealth(
        name=str(spool.path),
        pending=stats.pending,
        in_flight=stats.in_flight,
        oldest_pending_age=stats.oldest_pending_age,
        delivered_recently=spool.delivered_since(time.time() - _RATE_WINDOW_SECONDS),
        dead_letters=stats.dead_letters,
        dead_reasons=spool.dead_letter_reasons(),
        last_errors=[
            (
                e.url or (endpoint if e.dest == mine and endpoint else f"endpoint {e.dest}"),
                e.last_error,
                e.pending,
            )
            for e in spool.endpoints()
            if e.last_error
        ],
    )


def window(period: str, now: float) -> tuple[float, list[str]]:
    count, length, fmt = WINDOWS[period]
    last = now // length * length
    starts = [last - length * i for i in range(count - 1, -1, -1)]
    return starts[0], [datetime.fromtimestamp(t, UTC).strftime(fmt) for t in starts]


# ------------------------------------------------------------------ rendering

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f6f7f9;color:#1f2933}
header{background:#1f2933;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd2d9}main{padding:8px 28px 40px;max-width:1180px}
section{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:16px 20px;
margin:18px 0}h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;margin:8px 0}th,td{padding:4px 10px;text-align:left;
border-bottom:1px solid #eef0f2;vertical-align:top}th{color:#52606d;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.when{white-space:nowrap}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
.nav a{margin-right:12px;color:#2563eb}.nav a.on{font-weight:700;text-decoration:none;
color:#1f2933}.muted{color:#7b8794}.tiles{display:flex;gap:14px;flex-wrap:wrap}
.tile{border:1px solid #e4e7eb;border-radius:6px;padding:8px 14px;min-width:120px}
.tile b{display:block;font-size:20px}code{background:#f0f2f4;padding:1px 4px;border-radius:3px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}".rstrip("0").rstrip(".")


def _metric(point: UsagePoint, kind: str) -> float:
    if kind == "all":
        return point.calls
    value: float = getattr(point, _KIND_UNITS[kind][0])
    return value


@dataclass(frozen=True, slots=True)
class _Plot:
    """Where the chart draws: the SVG's size, the plot area in it and the value scale."""

    labels: list[str]
    peak: float
    width: int = 960
    height: int = 300
    left: int = 64
    right: int = 180
    top: int = 14
    bottom: int = 46

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def x(self, i: int) -> float:
        return self.left + i * (self.plot_w / max(len(self.labels) - 1, 1))

    def y(self, v: float) -> float:
        return self.top + self.plot_h - v / self.peak * self.plot_h


def _chart(usage: Sequence[UsagePoint], labels: list[str], kind: str) -> str:
    """An inline SVG line chart: one line per customer over the buckets."""
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(labels))
    index = {label: i for i, label in enumerate(labels)}
    for point in usage:
        if point.bucket in index and kind in ("all", point.kind):
            series[point.customer][index[point.bucket]] += _metric(point, kind)
    peak = max((v for values in series.values() for v in values), default=0.0) or 1.0
    plot = _Plot(labels, peak)
    unit = "calls" if kind == "all" else _KIND_UNITS[kind][1]
    parts = _axes(plot, unit)
    for n, (customer, values) in enumerate(sorted(series.items())):
        parts.extend(_series(plot, n, customer, values, unit))
    if not series:
        parts.append(
            f'<text x="{plot.left + plot.plot_w / 2}" y="{plot.top + plot.plot_h / 2}" '
            'text-anchor="middle" fill="#7b8794">no billed usage in this window</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _axes(plot: _Plot, unit: str) -> list[str]:
    """The chart's opening: the SVG element, the plot area, value lines, bucket labels."""
    left, top, width, height = plot.left, plot.top, plot.width, plot.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="billed {_e(unit)} per customer">',
        f'<rect x="{left}" y="{top}" width="{plot.plot_w}" height="{plot.plot_h}" '
        'fill="#fbfcfd" stroke="#e4e7eb"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        ty = plot.y(plot.peak * fraction)
        parts.append(
            f'<line x1="{left}" x2="{left + plot.plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" '
            'stroke="#eef0f2"/>'
            f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#52606d">{_e(_fmt(round(plot.peak * fraction, 2)))}</text>'
        )
    labels = plot.labels
    every = max(1, len(labels) // 8)
    for i, label in enumerate(labels):
        if i % every == 0 or i == len(labels) - 1:
            parts.append(
                f'<text x="{plot.x(i):.1f}" y="{height - plot.bottom + 16}" '
                f'text-anchor="middle" font-size="11" fill="#52606d">{_e(label[5:])}</text>'
            )
    parts.append(
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#52606d">{_e(unit)} per '
        f"{'hour' if 'T' in labels[0] else 'day'}, UTC</text>"
    )
    return parts


def _series(plot: _Plot, n: int, customer: str, values: list[float], unit: str) -> list[str]:
    """The ``n``-th customer's line, a dot with a tooltip per non-zero bucket, its legend."""
    color = _PALETTE[n % len(_PALETTE)]
    x, y = plot.x, plot.y
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    parts = [
        f'<polyline class="series" data-customer="{_e(customer)}" fill="none" '
        f'stroke="{color}" stroke-width="2" points="{points}"/>'
    ]
    parts.extend(
        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
        f"<title>{_e(customer)} {_e(plot.labels[i])}: {_e(_fmt(v))} {_e(unit)}</title></circle>"
        for i, v in enumerate(values)
        if v
    )
    ly = plot.top + 14 + n * 18
    legend_x = plot.width - plot.right
    parts.append(
        f'<rect x="{legend_x + 14}" y="{ly - 9}" width="12" height="4" fill="{color}"/>'
        f'<text x="{legend_x + 32}" y="{ly - 4}" font-size="12">{_e(customer)}</text>'
    )
    return parts


def _usage_table(usage: Sequence[UsagePoint]) -> str:
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for p in usage:
        total = totals[(p.customer, p.kind)]
        total[0] += p.calls
        total[1] += p.minutes
        total[2] += p.characters
        total[3] += p.tokens
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{_e(k)}</td><td class=n>{int(t[0])}</td>"
        f"<td class=n>{_e(_fmt(t[1]))}</td><td class=n>{int(t[2])}</td>"
        f"<td class=n>{int(t[3])}</td></tr>"
        for (c, k), t in sorted(totals.items())
    )
    return (
        "<table id=usage-totals><tr><th>customer</th><th>kind</th><th>calls</th>"
        "<th>audio min</th><th>chars</th><th>tokens</th></tr>"
        + (rows or "<tr><td colspan=6 class=muted>none</td></tr>")
        + "</table>"
    )


def _health(health: Sequence[SpoolHealth], now: float) -> str:
    if not health:
        return "<p class=muted>no spool is watched here</p>"
    out = []
    for h in health:
        oldest = "-" if h.oldest_pending_age is None else human_age(h.oldest_pending_age)
        rate = h.delivered_recently / (_RATE_WINDOW_SECONDS / 60)
        out.append(
            f"<h3>{_e(h.name)}</h3><div class=tiles>"
            f"<div class=tile>pending<b id=pending>{h.pending}</b>{h.in_flight} being sent</div>"
            f"<div class=tile>oldest pending<b>{_e(oldest)}</b></div>"
            f"<div class=tile>delivery rate<b>{rate:.1f}/min</b>last 5 min</div>"
            f"<div class=tile>dead letters<b id=dead>{h.dead_letters}</b></div></div>"
        )
        reasons = "".join(
            f"<tr><td>{_e(status)}</td><td class=n>{count}</td><td><code>{_e(reason)}</code>"
            f"</td><td class='muted when'>{_e(human_time(last, now))}</td></tr>"
            for status, reason, count, last in h.dead_reasons
        )
        out.append(
            "<h4>dead letters by reason</h4><table class=dead-reasons><tr><th>status</th>"
            "<th>records</th><th>message</th><th>last</th></tr>"
            + (reasons or "<tr><td colspan=4 class=muted>none</td></tr>")
            + "</table>"
        )
        errors = "".join(
            f"<tr><td>{_e(endpoint)}</td><td class=n>{count}</td><td><code>{_e(error)}</code>"
            "</td></tr>"
            for endpoint, error, count in h.last_errors
        )
        out.append(
            "<h4>last error per endpoint</h4><table class=last-errors><tr><th>endpoint</th>"
            "<th>records waiting after an error</th><th>latest error</th></tr>"
            + (errors or "<tr><td colspan=3 class=muted>none</td></tr>")
            + "</table>"
        )
    return "".join(out)


def _conservation(report: Report | None) -> str:
    if report is None:
        return "<p class=muted>no spool is watched here: nothing to reconcile</p>"
    verdict = (
        "<p class='ok' id=verdict>BALANCED: every recorded record is accounted for</p>"
        if report.balanced
        else "<p class='bad' id=verdict>DIFFERENCE: usage unaccounted for (or counted twice)</p>"
    )
    head = "".join(f"<th>{c}</th>" for c in ("period", "customer", "kind", "recorded", *COLUMNS))
    rows = "".join(
        f"<tr><td>{_e(r.period)}</td><td>{_e(r.customer)}</td><td>{_e(r.kind)}</td>"
        f"<td class=n>{_e(r.recorded.describe(r.kind))}</td>"
        + "".join(f"<td class=n>{_e(r.parts[c].describe(r.kind))}</td>" for c in COLUMNS)
        + f"<td class={'ok' if r.balanced else 'bad'}>{'ok' if r.balanced else 'DIFFERENCE'}"
        "</td></tr>"
        for r in report.rows
    )
    ledger = ""
    if report.ledger is not None:
        ledger = (
            "<h4>delivered against the ledger</h4><table><tr><th>customer</th><th>kind</th>"
            "<th>spool delivered</th><th>ledger received</th><th></th></tr>"
            + "".join(
                f"<tr><td>{_e(c.customer)}</td><td>{_e(c.kind)}</td>"
                f"<td class=n>{_e(c.delivered.describe(c.kind))}</td>"
                f"<td class=n>{_e(c.ledger.describe(c.kind))}</td>"
                f"<td class={'ok' if c.same else 'bad'}>{'ok' if c.same else 'DIFFERENCE'}</td>"
                "</tr>"
                for c in report.ledger_checks
            )
            + "</table>"
        )
    blind = "".join(f"<li>{_e(line.strip(' -'))}</li>" for line in BLIND_SPOTS[1:])
    return (
        f"{verdict}<p class=muted>recorded = delivered + duplicate + dead + pending + purged + "
        f"refused, per day of recording (UTC)</p><table id=conservation><tr>{head}<th></th>"
        f"</tr>{rows or '<tr><td colspan=10 class=muted>nothing recorded</td></tr>'}</table>"
        f"{ledger}<p>{_e(BLIND_SPOTS[0])}</p><ul>{blind}</ul>"
    )


def render_page(
    *,
    title: str,
    source: str,
    usage: Sequence[UsagePoint],
    period: str,
    kind: str,
    health: Sequence[SpoolHealth],
    conservation: Report | None,
    now: float | None = None,
) -> str:
    """The whole page as HTML (no script, no external asset)."""
    now = time.time() if now is None else now
    _, labels = window(period, now)

    def link(name: str, value: str, text: str) -> str:
        chosen = {"period": period, "kind": kind}
        query = {**chosen, name: value}
        on = " class=on" if chosen[name] == value else ""
        href = f"?period={query['period']}&amp;kind={query['kind']}"
        return f"<a{on} href='{href}'>{_e(text)}</a>"

    nav = (
        "<p class=nav>"
        + link("period", "hour", "last 48 hours")
        + link("period", "day", "last 30 days")
        + " | "
        + "".join(link("kind", k, k) for k in ("all", "stt", "tts", "sts"))
        + "</p>"
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><meta name=viewport content='width=device-width'>"
        f"<style>{_CSS}</style></head><body><header><h1>{_e(title)}</h1>"
        f"<p>{_e(source)} &middot; generated {_e(iso_utc(now))} &middot; read-only</p></header>"
        f"<main><section id=usage><h2>Billed usage per customer</h2>{nav}"
        f"{_chart(usage, labels, kind)}{_usage_table(usage)}</section>"
        f"<section id=health><h2>Delivery health</h2>{_health(health, now)}</section>"
        f"<section id=reconcile><h2>Conservation report</h2>{_conservation(conservation)}"
        "</section></main></body></html>"
    )


# ------------------------------------------------------------------ access and routes


def _client_is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _presented(request: Request) -> str | None:
    """The credential of ``Authorization: Bearer T`` or of HTTP Basic (the password)."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except ValueError:
            return None
        return decoded.partition(":")[2] or None
    return None


def _guard(request: Request, accepts: Callable[[str], bool] | None) -> Response | None:
    """None when the request may see the page; else the answer that refuses it."""
    if _client_is_loopback(request):
        return None
    if accepts is None:
        return PlainTextResponse(
            "the usage page holds customer ids: it is served to loopback only unless the "
            "server has credentials configured",
            403,
        )
    token = _presented(request)
    if token is not None and accepts(token):
        return None
    return PlainTextResponse(
        "credentials required (Authorization: Bearer <token>, or the token as the password)",
        401,
        headers={"WWW-Authenticate": 'Basic realm="paygent-otel usage", charset="UTF-8"'},
    )


def _choices(request: Request) -> tuple[str, str]:
    period = request.query_params.get("period", "hour")
    kind = request.query_params.get("kind", "all")
    return (
        period if period in WINDOWS else "hour",
        kind if kind in ("stt", "tts", "sts") else "all",
    )


def usage_route(
    build: Callable[[str, str], str], accepts: Callable[[str], bool] | None
) -> Callable[[Request], Any]:
    """The route handler: access check, then the page built in a worker thread (SQLite)."""

    async def page(request: Request) -> Response:
        refusal = _guard(request, accepts)
        if refusal is not None:
            return refusal
        return HTMLResponse(await run_in_threadpool(build, *_choices(request)))

    return page


def journal_usage(spool: SqliteSpoolView, since: float, period: str) -> list[UsagePoint]:
    _, length, fmt = WINDOWS[period]
    return [
        UsagePoint(
            datetime.fromtimestamp(r.period // length * length, UTC).strftime(fmt),
            r.customer,
            r.kind,
            r.records,
            r.minutes,
            r.characters,
            r.tokens,
        )
        for r in spool.journal(since)
        if r.outcome == "delivered"
    ]
