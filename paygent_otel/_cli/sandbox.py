"""The ``sandbox`` and ``ledger`` commands, and ``python -m paygent_otel.sandbox``."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
import time
import zoneinfo
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, Final

from paygent_otel._output import (
    add_command,
    add_format_arguments,
    format_table,
    print_rows,
    program_parser,
)
from paygent_otel._web.serving import caught_signals
from paygent_otel.delivery.units import flag_type, parse_duration, parse_instant
from paygent_otel.sandbox.ledger import PERIODS, Ledger

__all__ = [
    "DEFAULT_DB_PATH",
    "DEFAULT_PORT",
    "LEDGER_GROUPS",
    "add_sandbox_arguments",
    "format_totals",
    "main",
    "register",
    "run_sandbox",
    "show_ledger",
    "timezone_type",
]

DEFAULT_DB_PATH: Final = "./paygent-sandbox.sqlite3"
"""Ledger file of the ``sandbox`` and ``ledger`` commands when ``--db`` is not given."""

DEFAULT_PORT: Final = 8787
"""Port of the ``sandbox`` command when ``--port`` is not given."""

LEDGER_GROUPS: Final = {
    "customer": "customer_id",
    "agent": "agent_id",
    "indicator": "indicator",
    "kind": "kind",
    "provider": "provider",
    "model": "model",
    **{period: period for period in PERIODS},
}
"""``ledger --by`` names and the ledger columns (or time buckets) they group by."""

_SANDBOX_DESCRIPTION = """\
Run a local stand-in for the Paygent API (POST /api/v2/usage). It checks the
paygent-api-key header and every body strictly, records accepted usage in a
SQLite ledger, honours Idempotency-Key, and can add latency, failures and
rejections. Runs in the foreground until Ctrl-C or SIGTERM.
"""

_SANDBOX_EPILOG = """\
examples:
  paygent-otel sandbox
      serve http://127.0.0.1:8787, record into ./paygent-sandbox.sqlite3
  paygent-otel sandbox --db /tmp/ledger.sqlite3 --port 9000 --api-key test-key
      answer 401 to any paygent-api-key other than test-key
  paygent-otel sandbox --latency-ms 200 --fail-rate 0.1 --retry-after 2 --seed 1
      slow Paygent that answers 503 (Retry-After: 2) to one request in ten

then point a client at its URL (http://127.0.0.1:8787) and watch it:
  open http://127.0.0.1:8787/usage in a browser   (usage per customer; add --spool
                                                   PATH to see a spool's health too)
  curl -s localhost:8787/_sandbox/stats
  curl -s -X POST localhost:8787/_sandbox/faults -d '{"fail_rate": 1.0}'
  paygent-otel ledger --db ./paygent-sandbox.sqlite3

faults apply to the Paygent API routes in this order: latency, fail_rate,
reject_rate; then the api key, the body and Idempotency-Key are checked.
"""

_LEDGER_EPILOG = """\
examples:
  paygent-otel ledger
      totals per customer, kind and model of ./paygent-sandbox.sqlite3
  paygent-otel ledger --db /tmp/ledger.sqlite3 --by customer
  paygent-otel ledger --by day,customer --since 7d
      per day (UTC) and customer, the last seven days
  paygent-otel ledger --by hour,kind --since 2026-11-30 --until 2026-12-01 --tz Europe/Paris
  paygent-otel ledger --by agent,indicator,provider --json     (or --csv)

--since and --until take a time (2026-11-30, 2026-11-30T14:00, ...Z or +01:00;
without an offset it is in --tz) or a duration ago (30m, 2h, 7d). hour, day and
month buckets are of the arrival time at the sandbox, in --tz (default UTC).

columns: calls (accepted usage records), audio min (STT audioDuration),
chars (TTS characterCount), sts tokens and sts min (every tokens / minutes
value of the STS usageMetadata added up). Idempotent repeats are acknowledged
by the sandbox but not recorded; their count is printed below the table.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sandbox`` and ``ledger`` commands to the ``paygent-otel`` parser."""
    sandbox = add_command(
        commands,
        "sandbox",
        help="run a local Paygent that records usage in SQLite",
        description=_SANDBOX_DESCRIPTION,
        epilog=_SANDBOX_EPILOG,
        handler=run_sandbox,
    )
    add_sandbox_arguments(sandbox)

    ledger = add_command(
        commands,
        "ledger",
        help="print the usage totals a sandbox recorded",
        description=(
            "Print the totals of the usage a sandbox recorded, grouped as you choose.\n"
            "Safe to run while the sandbox is serving."
        ),
        epilog=_LEDGER_EPILOG,
        handler=show_ledger,
    )
    ledger.add_argument(
        "--db", default=DEFAULT_DB_PATH, metavar="PATH",
        help=f"the sandbox's ledger file (default: {DEFAULT_DB_PATH})",
    )  # fmt: skip
    ledger.add_argument(
        "--by", type=_group_list, default=("customer_id", "kind", "model"), metavar="LIST",
        help=(
            f"comma-separated grouping, from {','.join(LEDGER_GROUPS)} "
            "(default: customer,kind,model)"
        ),
    )  # fmt: skip
    ledger.add_argument(
        "--since", metavar="TIME", help="only usage received at or after TIME (see below)"
    )
    ledger.add_argument("--until", metavar="TIME", help="only usage received before TIME")
    ledger.add_argument(
        "--tz", type=timezone_type, default=UTC, metavar="ZONE",
        help="time zone of hour/day/month and of times without an offset: UTC (default), "
        "local, or a name such as Europe/Paris",
    )  # fmt: skip
    add_format_arguments(ledger)


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sandbox`` command's flags (shared with ``python -m paygent_otel.sandbox``)."""
    from paygent_otel.sandbox.app import DEFAULT_FAIL_STATUS
    from paygent_otel.sandbox.server import DEFAULT_HOST

    parser.add_argument(
        "--db", default=DEFAULT_DB_PATH, metavar="PATH",
        help=f"SQLite ledger file, created if missing (default: {DEFAULT_DB_PATH})",
    )  # fmt: skip
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"port to listen on, 0 for any free port (default: {DEFAULT_PORT})",
    )  # fmt: skip
    parser.add_argument(
        "--api-key", metavar="KEY",
        help="accept only this paygent-api-key (default: any non-empty key)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-cert", metavar="PEM",
        help="serve HTTPS with this certificate chain (PEM; needs --tls-key). Clients then "
        "trust its CA with OTEL_EXPORTER_PAYGENT_CERTIFICATE",
    )  # fmt: skip
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca", metavar="PEM",
        help="require a client certificate signed by this CA (mutual TLS; needs --tls-cert)",
    )  # fmt: skip
    _add_page_arguments(parser)
    faults = parser.add_argument_group(
        "fault injection", "also changeable while running: POST /_sandbox/faults"
    )
    for flag, kind, default, metavar, text in (
        ("--latency-ms", _milliseconds, 0.0, "DURATION",
         "delay every API request by DURATION: 250ms, 2s (a bare number is in milliseconds; "
         "default: 0)"),
        ("--fail-rate", float, 0.0, "P",
         "answer --fail-status to this fraction of requests, 0..1 (default: 0)"),
        ("--fail-status", int, DEFAULT_FAIL_STATUS, "STATUS",
         f"status of injected failures (default: {DEFAULT_FAIL_STATUS})"),
        ("--retry-after", _whole_seconds, None, "DURATION",
         "send Retry-After with injected failures, in whole seconds: 2, 2s, 1m "
         "(default: no header)"),
        ("--reject-rate", float, 0.0, "P",
         "answer 400 'sandbox injected rejection' to this fraction, 0..1 (default: 0)"),
        ("--seed", int, None, None, "seed the fault draws, for a reproducible sequence"),
    ):  # fmt: skip
        faults.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)


def _add_page_arguments(parser: argparse.ArgumentParser) -> None:
    """The usage page's flag: which spools' health and conservation report it shows."""
    parser.add_argument(
        "--spool", action="append", default=[], metavar="PATH", dest="page_spools",
        help="show this spool's delivery health and conservation report (checked against "
        "the ledger) on the usage page, GET /usage (repeatable)",
    )  # fmt: skip


_SERVER_FLAGS: Final = (
    *("host", "port", "api_key", "tls_cert", "tls_key", "tls_client_ca", "page_spools"),
    *("latency_ms", "fail_rate", "fail_status", "retry_after", "reject_rate", "seed"),
)
"""The ``sandbox`` flags passed to :class:`SandboxServer` as the keyword arguments of the
same names (``--db`` is its first argument)."""


def run_sandbox(args: argparse.Namespace) -> int:
    """Handler of ``sandbox``: serve in the foreground until SIGINT or SIGTERM; exit status."""
    from paygent_otel.sandbox.server import SandboxServer

    try:
        server = SandboxServer(args.db, **{name: getattr(args, name) for name in _SERVER_FLAGS})
        server.start()
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as exc:
        print(f"paygent-otel sandbox: {exc}", file=sys.stderr)
        return 1
    with caught_signals() as signals:
        try:
            # SandboxProcess and scripts wait for this exact line (server.LISTENING_LINE).
            print(f"paygent sandbox listening on {server.url}", flush=True)
            print(f"ledger: {server.db_path} (Ctrl-C to stop)", flush=True)
            print(f"usage page: {server.url}/usage", flush=True)
            signals.wait()
        finally:
            server.stop()
    count = server.ledger.count()
    print(f"stopped; {count} usage records in {server.db_path}", flush=True)
    return 0


def show_ledger(args: argparse.Namespace) -> int:
    """Handler of ``ledger``: print totals as a table, JSON or CSV; exit status."""
    ledger = Ledger(args.db)
    by: tuple[str, ...] = args.by
    now = time.time()
    since, until = (
        None if text is None else parse_instant(text, now=now, tz=args.tz)
        for text in (args.since, args.until)
    )
    try:
        totals = ledger.totals(by=by, since=since, until=until, tz=args.tz)
        overall = ledger.totals(by=(), since=since, until=until)
        duplicates = ledger.duplicate_count(since=since, until=until)
    except FileNotFoundError as exc:
        print(f"paygent-otel ledger: {exc} (run `paygent-otel sandbox` first)", file=sys.stderr)
        return 1
    columns = [*by, *(q for q, _ in _QUANTITY_HEADERS)]
    print_rows(
        totals,
        columns,
        args.format,
        text=format_totals(totals, by, overall[0] if overall else None)
        + f"\nidempotent repeats acknowledged, not recorded: {duplicates}",
        json_document={"groups": totals, "duplicates": duplicates},
    )
    return 0


_NAME_BY_COLUMN: Final = {column: name for name, column in LEDGER_GROUPS.items()}
_QUANTITY_HEADERS: Final = (
    ("calls", "calls"),
    ("audio_minutes", "audio min"),
    ("characters", "chars"),
    ("sts_tokens", "sts tokens"),
    ("sts_minutes", "sts min"),
)


def format_totals(
    totals: Sequence[dict[str, Any]], by: Sequence[str], overall: dict[str, Any] | None = None
) -> str:
    """An aligned text table of :meth:`Ledger.totals` rows.

    ``overall`` (``Ledger.totals(by=())``, one row) becomes a total line under several groups.
    """
    if not totals:
        return "no usage recorded"
    headers = [_NAME_BY_COLUMN.get(c, c) for c in by] + [h for _, h in _QUANTITY_HEADERS]
    body = [
        [str(row[c]) for c in by] + [_quantity(row[q]) for q, _ in _QUANTITY_HEADERS]
        for row in totals
    ]
    numbers = range(len(by), len(headers))
    table = format_table(headers, body, numbers)
    if overall is None or len(totals) < 2 or not by:
        return table
    total = ["total"] + [""] * (len(by) - 1) + [_quantity(overall[q]) for q, _ in _QUANTITY_HEADERS]
    lines = format_table(headers, [*body, total], numbers).splitlines()
    return "\n".join([*lines[:-1], lines[1], lines[-1]])


def _quantity(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    # Four decimals show a second of audio (0.0167 min); trailing zeros only add noise.
    return f"{value:.4f}".rstrip("0").rstrip(".")


@flag_type
def _milliseconds(text: str) -> float:
    return parse_duration(text, bare_unit="ms") * 1000.0


@flag_type
def _whole_seconds(text: str) -> int:
    seconds = parse_duration(text)
    if seconds != int(seconds):
        raise ValueError("Retry-After takes whole seconds")
    return int(seconds)


def timezone_type(text: str) -> tzinfo:
    """An argparse ``type=`` for ``--tz``: ``UTC``, ``local`` or an IANA name."""
    if text.upper() == "UTC":
        return UTC
    if text == "local":
        local = datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time zone: use UTC, local or a name such as Europe/Paris"
        ) from None


def _group_list(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEDGER_GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma list of {','.join(LEDGER_GROUPS)}")
    return tuple(LEDGER_GROUPS[n] for n in names)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m paygent_otel.sandbox``: the ``sandbox`` command on its own."""
    parser = program_parser(
        "python -m paygent_otel.sandbox", description=_SANDBOX_DESCRIPTION, epilog=_SANDBOX_EPILOG
    )
    add_sandbox_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_sandbox(args)
