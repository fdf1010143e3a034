"""``paygent-otel reconcile``: print the conservation report of spools (exit 1 on any
difference), optionally checked against a sandbox ledger."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC

from paygent_otel._cli.sandbox import timezone_type
from paygent_otel._cli.spool import default_spool
from paygent_otel._output import PERIODS, add_command, add_format_arguments, print_rows
from paygent_otel.delivery.reconcile import conservation_report
from paygent_otel.delivery.units import parse_instant
from paygent_otel.sandbox.ledger import Ledger

__all__ = ["register"]

_DESCRIPTION = """\
Prove that no usage was lost or billed twice. For each period, customer and kind, the
spool's journal says how many records (and how many minutes, characters, tokens) were
recorded, and where each went: delivered to Paygent, acknowledged as a duplicate of one
already handed over, dead-lettered, still pending, purged by a person, or refused at
intake (spool full). The two sides must be equal; any difference exits 1.

--ledger also checks what the spool delivered against what a sandbox ledger received.
"""

_EPILOG = """\
examples:
  paygent-otel reconcile                            all the journal holds, by day (UTC)
  paygent-otel reconcile --by hour --since 6h
  paygent-otel reconcile --since 2026-11-01 --until 2026-12-01 --by month --csv
  paygent-otel reconcile --spool a.sqlite3 --spool b.sqlite3 --ledger ledger.sqlite3

exit status: 0 balanced, 1 a difference (or an error), 2 a usage error.
periods are the UTC hours in which records were recorded (bucketed into days or months in
--tz); the journal keeps them 400 days.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``reconcile`` command."""
    parser = add_command(
        commands,
        "reconcile",
        help="conservation report: recorded = delivered + duplicates + dead + pending (+ ...)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        handler=_reconcile,
    )
    parser.add_argument(
        "--spool", action="append", metavar="PATH",
        help=f"a spool file, repeatable (default: {default_spool()})",
    )  # fmt: skip
    parser.add_argument(
        "--by", choices=tuple(PERIODS), default="day", help="period of the rows (default day)"
    )
    parser.add_argument("--since", metavar="TIME", help="from TIME: 2026-11-30, 6h, 7d, ...")
    parser.add_argument("--until", metavar="TIME", help="before TIME")
    parser.add_argument(
        "--tz", type=timezone_type, default=UTC, metavar="ZONE",
        help="time zone of days and months (default UTC)",
    )  # fmt: skip
    parser.add_argument(
        "--ledger", metavar="FILE", help="also compare what was delivered with a sandbox ledger"
    )
    add_format_arguments(parser)


def _reconcile(args: argparse.Namespace) -> int:
    now = time.time()
    since, until = (
        None if text is None else parse_instant(text, now=now, tz=args.tz)
        for text in (args.since, args.until)
    )
    try:
        report = conservation_report(
            args.spool or [default_spool()],
            period=args.by,
            since=since,
            until=until,
            tz=args.tz,
            ledger=None if args.ledger is None else Ledger(args.ledger),
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"paygent-otel reconcile: {exc}", file=sys.stderr)
        return 1
    rows = [r.as_dict() for r in report.rows]
    columns = list(rows[0]) if rows else ["period", "customer", "kind", "balanced"]
    print_rows(rows, columns, args.format, text=report.to_text(), json_document=report.as_json())
    if not report.balanced and args.format != "text":
        print("paygent-otel reconcile: DIFFERENCE: usage unaccounted for", file=sys.stderr)
    return 0 if report.balanced else 1
