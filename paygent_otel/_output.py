"""How the command line shows things: human times and sizes, and listings as text, JSON or CSV.

Every listing command takes ``--json`` and ``--csv`` (:func:`add_format_arguments`) and
prints through :func:`print_rows`, so the three forms carry the same columns. Every command
is added with :func:`add_command`, so every ``--help`` keeps its examples' layout.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "PERIODS",
    "add_command",
    "add_format_arguments",
    "format_table",
    "human_age",
    "human_size",
    "human_time",
    "humanize_timestamps",
    "iso_utc",
    "print_rows",
    "program_parser",
]


PERIODS: Final = {"hour": "%Y-%m-%dT%H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}
"""The periods usage is grouped by (ledger totals, the conservation report, the usage page),
and how each period's bucket is named (a ``strftime`` format)."""


def iso_utc(timestamp: float) -> str:
    """``2026-11-30T01:37:21Z`` for Unix seconds."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_age(seconds: float) -> str:
    """``4.2 s``, ``3.5 min``, ``2.0 h``, ``3.1 days``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def human_time(timestamp: float, now: float | None = None) -> str:
    """``2026-11-30T01:37:21Z (3.5 min ago)``: the UTC time and how long ago it was."""
    age = (time.time() if now is None else now) - timestamp
    relative = f"{human_age(age)} ago" if age >= 0 else f"in {human_age(-age)}"
    return f"{iso_utc(timestamp)} ({relative})"


def human_size(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``64.0 MiB``, ``1.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# Unix nanoseconds from 2001 to 2286: 19 digits. Shorter runs of digits are left alone.
_NANOS = re.compile(r"(?<!\d)(1\d{18})(?!\d)")


def humanize_timestamps(text: str) -> str:
    """Replace Unix-nanosecond timestamps in ``text`` (a metric stream's interval in a
    record's origin) with ISO UTC times."""

    def iso(match: re.Match[str]) -> str:
        nanos = int(match.group(1))
        stamp = datetime.fromtimestamp(nanos / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        return stamp[:-3] + "Z"

    return _NANOS.sub(iso, text)


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
    epilog: str | None = None,
    handler: Callable[[argparse.Namespace], int] | None = None,
    formatter_class: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter,
) -> argparse.ArgumentParser:
    """Add the command (or subcommand) ``name`` and return its parser.

    ``help`` is its line in the list of commands; ``description`` and ``epilog`` (examples,
    exit statuses) are printed as written, line breaks kept (``formatter_class=
    argparse.HelpFormatter`` rewraps them instead). ``handler`` runs it with the parsed
    arguments and returns the exit status; a command with subcommands leaves it out.
    """
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=formatter_class,
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def program_parser(prog: str, *, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of a command run as its own program (``python -m ...``), with the same
    help layout as :func:`add_command`."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--csv``, mutually exclusive; the default is an aligned text table."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--json", dest="format", action="store_const", const="json", help="print JSON"
    )
    group.add_argument(
        "--csv", dest="format", action="store_const", const="csv",
        help="print CSV with a header line (for spreadsheets)",
    )  # fmt: skip
    parser.set_defaults(format="text")


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numbers: Collection[int] = ()
) -> str:
    """An aligned text table; the columns at the indexes ``numbers`` align right."""
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in numbers else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(
        [render(headers), "  ".join("-" * w for w in widths), *(render(r) for r in rows)]
    )


def print_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    fmt: str,
    *,
    text: str | None = None,
    json_document: Any = None,
) -> None:
    """Print ``rows`` (dicts keyed by ``columns``) as ``fmt``: ``json``, ``csv`` or ``text``.

    ``text`` is the human form, when the caller renders it itself (else a table of the raw
    values); ``json_document`` replaces the plain JSON array of rows when given.
    """
    if fmt == "json":
        document = json_document if json_document is not None else [dict(r) for r in rows]
        print(json.dumps(document, indent=2, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    elif text is not None:
        print(text)
    else:
        print(format_table(columns, [[str(r.get(c, "")) for c in columns] for r in rows]))
