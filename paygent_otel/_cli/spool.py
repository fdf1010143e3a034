"""The ``paygent-otel spool`` commands: look into the durable spool, replay, clean up.

``status`` (pending, in flight, dead letters, oldest age, size; per endpoint with the last
error and the next attempt), ``dead`` (dead letters with their reasons), ``retry`` (dead
letters back to pending), ``retarget`` (records of one endpoint filed under another),
``purge`` (delete, after confirmation), ``audit`` (who retried, re-targeted or purged what,
and when) and ``migrate`` (a SQLite spool's records into a PostgreSQL spool). They open the
same SQLite file or PostgreSQL database the exporters write, safely while they run.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from paygent_otel._output import (
    add_format_arguments,
    format_table,
    human_age,
    human_size,
    human_time,
    humanize_timestamps,
    iso_utc,
    print_rows,
)
from paygent_otel.delivery.config import (
    MEMORY_SPOOL,
    OTEL_EXPORTER_PAYGENT_SPOOL_PATH,
    ExporterConfig,
    parse_endpoint,
)
from paygent_otel.delivery.spool import (
    DeadLetter,
    EndpointStatus,
    SqliteSpool,
    SqliteSpoolView,
    check_spool_file,
    destination_id,
    open_sqlite_view,
)
from paygent_otel.delivery.spool.url import SpoolUrl, is_pg_url
from paygent_otel.delivery.units import duration_type

if TYPE_CHECKING:
    from paygent_otel.delivery.spool.postgres import PostgresSpool, PostgresSpoolView

__all__ = ["default_spool", "register"]

_DESCRIPTION = """\
Look into the durable spool where the exporters keep usage records until Paygent has
accepted them: what is waiting, what Paygent refused and why. Replay refused records
once the cause is fixed, or delete them. Safe to run while applications use the spool.
"""

_EPILOG = """\
examples:
  paygent-otel spool status                 how many records wait, and since when
  paygent-otel spool dead                   the refused records, newest first, with reasons
  paygent-otel spool retry --status 400     send the 400s again (after fixing the cause)
  paygent-otel spool retry --wait 2m        ... and watch them go out, with a summary
  paygent-otel spool retarget --from http://old --to https://cp-api.withpaygent.com
                                            send records spooled under a wrong endpoint
  paygent-otel spool purge --yes            delete every dead letter, no question asked
  paygent-otel spool audit                  who retried or purged what, and when
  paygent-otel spool status --spool postgresql://paygent@db.internal/billing
                                            the same, for the spool replicas share
  paygent-otel spool migrate --from ~/.local/state/paygent-otel/spool.sqlite3 \
      --to postgresql://paygent@db.internal/billing
                                            move a file's records into PostgreSQL

every subcommand takes --spool PATH or URL; see `paygent-otel spool SUBCOMMAND --help`.
"""

_DEAD_EPILOG = """\
status is the HTTP status Paygent answered (400, 404, 422, ...), "invalid" for a record
that broke the usage convention before it was sent (its attributes are kept, not a
Paygent document, so it cannot be retried: fix the instrumentation), "conflict" for a
record refused because one with the same paygent.usage.id (or the same telemetry) and
different usage was billed or is waiting (retry it only if the id was reused by mistake
and both usages are real), or "gave_up" when retries ran past max_retry_seconds.
"""


def default_spool() -> str:
    """What the span exporter uses when given no ``spool_path``: the env vars, else the default.

    Read as the exporter reads them (``OTEL_EXPORTER_PAYGENT_TRACES_SPOOL_PATH``, then
    ``OTEL_EXPORTER_PAYGENT_SPOOL_PATH``); a metric exporter told to use another file is
    named by :func:`_other_spools`.
    """
    return ExporterConfig.resolve("traces").spool_path


def _other_spools() -> list[str]:
    """Spool files the metric exporter and the bridge use when they differ from the default."""
    default = default_spool()
    found = {ExporterConfig.resolve(signal).spool_path for signal in ("metrics", None)}
    return sorted(found - {default, MEMORY_SPOOL})


def _add_spool_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spool",
        metavar="PATH|URL",
        help=(
            "the spool file, or a postgresql:// URL (password masked in the output; prefer "
            "PGPASSWORD or ~/.pgpass) (default: what the span exporter reads, "
            f"$OTEL_EXPORTER_PAYGENT_TRACES_SPOOL_PATH or ${OTEL_EXPORTER_PAYGENT_SPOOL_PATH}, "
            f"else its default; here {default_spool()})"
        ),
    )


@dataclass(frozen=True)
class _Subcommand:
    """One ``spool`` subcommand: its texts, its own arguments and its handler."""

    name: str
    help: str
    description: str
    handler: Callable[[argparse.Namespace], int]
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    """(flags, ``add_argument`` keywords) of each argument but ``--spool``."""
    epilog: str | None = None
    spool: bool = True
    """Takes ``--spool PATH|URL``."""
    formats: bool = False
    """Takes ``--json`` and ``--csv`` (:func:`~._output.add_format_arguments`)."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``spool`` command and its subcommands (the table :data:`_SUBCOMMANDS`)."""
    parser = commands.add_parser(
        "spool",
        help="inspect the durable spool: pending records, dead letters; retry or purge them",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="spool_command", metavar="SUBCOMMAND", required=True)
    for sub in _SUBCOMMANDS:
        extra: dict[str, Any] = {}
        if sub.epilog is not None:
            extra = {"epilog": sub.epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}
        subparser = subcommands.add_parser(
            sub.name, help=sub.help, description=sub.description, **extra
        )
        if sub.spool:
            _add_spool_argument(subparser)
        for flags, options in sub.arguments:
            subparser.add_argument(*flags, **options)
        if sub.formats:
            add_format_arguments(subparser)
        subparser.set_defaults(handler=sub.handler)


def _open_postgres(url: str) -> PostgresSpool | None:
    """The PostgreSQL spool at ``url``; None, with the reason (password masked), if unusable."""
    return cast("PostgresSpool | None", _open_postgres_as(url, readonly=False))


def _open_postgres_as(url: str, *, readonly: bool) -> PostgresSpoolView | None:
    try:
        from paygent_otel.delivery.spool.postgres import PostgresSpool, PostgresSpoolView
    except ImportError as exc:
        print(f"the PostgreSQL spool needs psycopg: pip install 'paygent-otel[postgres]' ({exc})",
              file=sys.stderr)  # fmt: skip
        return None
    opener = PostgresSpoolView if readonly else PostgresSpool
    try:
        # No local fallback here: a person asked about this database, not about a stand-in.
        return opener(url, max_bytes=ExporterConfig.resolve().spool_max_bytes)
    except OSError as exc:
        print(f"cannot use the spool {SpoolUrl(url)}: {exc}", file=sys.stderr)
        return None


def _locate(args: argparse.Namespace) -> str | None:
    """The spool named by ``--spool`` (or the default); None, with a message, if there is none."""
    path: str = args.spool or default_spool()
    others = [] if args.spool else _other_spools()
    if others:
        print(
            f"note: the metric exporter or the bridge is configured with another spool: "
            f"{', '.join(others)} (pass --spool PATH to look there)",
            file=sys.stderr,
        )
    if is_pg_url(path):
        return path
    if path == MEMORY_SPOOL:
        print(
            f"{OTEL_EXPORTER_PAYGENT_SPOOL_PATH}={MEMORY_SPOOL}: the exporters keep records in "
            "memory, there is no spool file to look into (pass --spool PATH)",
            file=sys.stderr,
        )
        return None
    if not Path(path).is_file():
        print(
            f"no spool at {path}: nothing was spooled there yet, or the exporters use "
            "another path (pass --spool PATH)",
            file=sys.stderr,
        )
        return None
    return path


def _open(args: argparse.Namespace) -> SqliteSpool | PostgresSpool | None:
    """The spool to change; None, with a message, if there is none."""
    path = _locate(args)
    if path is None:
        return None
    if is_pg_url(path):
        return _open_postgres(path)
    check_spool_file(path)
    return SqliteSpool(path, max_bytes=ExporterConfig.resolve().spool_max_bytes)


def _open_view(args: argparse.Namespace) -> SqliteSpoolView | PostgresSpoolView | None:
    """The spool to look into, opened read-only: the command changes nothing in it."""
    path = _locate(args)
    if path is None:
        return None
    if is_pg_url(path):
        return _open_postgres_as(path, readonly=True)
    return open_sqlite_view(path, max_bytes=ExporterConfig.resolve().spool_max_bytes)


def _status(args: argparse.Namespace) -> int:
    spool = _open_view(args)
    if spool is None:
        return 1
    try:
        stats = spool.stats()
        by_status = spool.dead_letter_counts()
        endpoints = spool.endpoints()
    finally:
        spool.close()
    on_disk = (
        sum(
            p.stat().st_size
            for p in (spool.path, Path(f"{spool.path}-wal"), Path(f"{spool.path}-shm"))
            if p.exists()
        )
        if isinstance(spool, SqliteSpoolView)
        else stats.size_bytes
    )
    if args.json:
        print(
            json.dumps(
                {
                    "spool": str(spool.path),
                    "pending": stats.pending,
                    "in_flight": stats.in_flight,
                    "dead_letters": stats.dead_letters,
                    "dead_letters_by_status": by_status,
                    "oldest_pending_age_seconds": stats.oldest_pending_age,
                    "size_bytes": stats.size_bytes,
                    "file_bytes": on_disk,
                    "endpoints": [_endpoint_json(e) for e in endpoints],
                }
            )
        )
        return 0
    dead_detail = ", ".join(f"{status}: {n}" for status, n in by_status.items())
    oldest = (
        "-" if stats.oldest_pending_age is None else f"{human_age(stats.oldest_pending_age)} ago"
    )
    print(f"spool           {spool.path}")
    print(f"pending         {stats.pending} ({stats.in_flight} being sent now)")
    print(f"oldest pending  {oldest}")
    print(f"dead letters    {stats.dead_letters}" + (f" ({dead_detail})" if dead_detail else ""))
    print(f"size            {human_size(stats.size_bytes)} used, {human_size(on_disk)} on disk")
    for endpoint in endpoints:
        print(_endpoint_line(endpoint))
    configured = ExporterConfig.resolve().endpoint
    for endpoint in endpoints:
        if endpoint.pending and endpoint.url not in (None, configured):
            print(
                f"\n{endpoint.url} is not the configured endpoint ({configured}): its records "
                "are sent only by a process aimed at it; to send them elsewhere: "
                f"`paygent-otel spool retarget --from {endpoint.url} --to URL`"
            )
    if stats.dead_letters:
        print("\n" + _dead_letter_hint(by_status))
    return 0


def _dead_letter_hint(by_status: dict[str, int]) -> str:
    """What to do about the dead letters: only commands that apply to their statuses."""
    invalid = by_status.get("invalid", 0)
    retryable = sum(by_status.values()) - invalid
    hints = ["see why with `paygent-otel spool dead`"]
    if retryable:
        hints.append(
            f"send the {retryable} refused ones again with `paygent-otel spool retry` once "
            "the cause is fixed"
        )
    if invalid:
        hints.append(
            f"the {invalid} invalid ones never reached Paygent and cannot be retried: fix the "
            "instrumentation and record the usage again (a corrected record is billed; the "
            "dead letter does not hold it back)"
            + ("; then delete them with `paygent-otel spool purge`" if not retryable else "")
        )
    return "; ".join(hints)


def _endpoint_json(endpoint: EndpointStatus) -> dict[str, Any]:
    return {
        "id": endpoint.dest,
        "url": endpoint.url,
        "pending": endpoint.pending,
        "in_flight": endpoint.in_flight,
        "dead_letters": endpoint.dead_letters,
        "oldest_pending_age_seconds": endpoint.oldest_pending_age,
        "next_attempt": None if endpoint.next_attempt is None else iso_utc(endpoint.next_attempt),
        "last_error": endpoint.last_error,
    }


def _endpoint_line(endpoint: EndpointStatus) -> str:
    line = (
        f"\nendpoint        {endpoint.url or f'(id {endpoint.dest})'}\n"
        f"  pending       {endpoint.pending} ({endpoint.in_flight} being sent now), "
        f"dead letters {endpoint.dead_letters}"
    )
    if endpoint.oldest_pending_age is not None:
        line += f"\n  oldest        {human_age(endpoint.oldest_pending_age)} ago"
    if endpoint.next_attempt is not None:
        wait = endpoint.next_attempt - time.time()
        line += "\n  next attempt  " + ("due now" if wait <= 0 else f"in {human_age(wait)}")
    if endpoint.last_error:
        line += f"\n  last error    {endpoint.last_error}"
    return line


def _dead_json(letter: DeadLetter) -> dict[str, Any]:
    try:
        body: Any = json.loads(letter.body)
    except ValueError:
        body = letter.body
    return {
        "key": letter.key,
        "status": letter.status,
        "reason": letter.reason,
        "died": iso_utc(letter.died),
        "died_unix": letter.died,
        "attempts": letter.attempts,
        "origin": letter.origin,
        "body": body,
    }


def _dead(args: argparse.Namespace) -> int:
    spool = _open_view(args)
    if spool is None:
        return 1
    try:
        total = sum(
            n
            for status, n in spool.dead_letter_counts().items()
            if args.status is None or status == args.status
        )
        letters = spool.dead_letters(
            limit=args.limit if args.limit > 0 else total, status=args.status
        )
    finally:
        spool.close()
    if args.format != "text":
        rows = [_dead_json(letter) for letter in letters]
        columns = ["died", "status", "attempts", "key", "origin", "reason"]
        print_rows(rows, columns, args.format)
        return 0
    if not letters:
        which = f" with status {args.status}" if args.status else ""
        print(f"no dead letters{which} in {spool.path}")
        return 0
    shown = "" if len(letters) == total else f", showing the newest {len(letters)}"
    print(f"{total} dead letters in {spool.path}{shown}:")
    for letter in letters:
        print(
            f"\n{human_time(letter.died)}  {letter.status:<8} attempts {letter.attempts}  "
            f"key {letter.key}\n  from:   {humanize_timestamps(letter.origin)}\n"
            f"  reason: {letter.reason}"
        )
    return 0


def _retry(args: argparse.Namespace) -> int:
    spool = _open(args)
    if spool is None:
        return 1
    try:
        watched = [
            letter.key
            for letter in spool.dead_letters(limit=-1, status=args.status)
            if letter.status != "invalid" and (not args.key or letter.key in args.key)
        ]
        moved = spool.retry_dead(status=args.status, keys=args.key)
        endpoints = spool.endpoints()
        if moved and args.wait is not None:
            print(f"{moved} dead letters moved back to pending in {spool.path}")
            return _watch(spool, watched, args.wait)
    finally:
        spool.close()
    if not moved:
        print(
            f"no dead letters to retry in {spool.path} (invalid records are never retried: "
            "see `paygent-otel spool dead --status invalid`)"
        )
        return 0
    print(
        f"{moved} dead letters moved back to pending in {spool.path} "
        "(add --wait 2m to watch them go out)."
    )
    _say_who_sends(spool.path, endpoints)
    return 0


def _say_who_sends(path: Path | str, endpoints: list[EndpointStatus]) -> None:
    """Which process will send the pending records: one aimed at their endpoint."""
    configured = ExporterConfig.resolve().endpoint
    for endpoint in (e for e in endpoints if e.pending):
        url = endpoint.url or f"(id {endpoint.dest})"
        print(
            f"{endpoint.pending} pending for {url}: a process delivering to that endpoint from "
            "this spool sends them (at once if one is running, else when the next starts)"
        )
        if endpoint.url != configured:
            print(
                f"  that is not the configured endpoint ({configured}); to send them there: "
                f"`paygent-otel spool retarget --spool {path} --from {url} --to {configured}`"
            )


def _retarget(args: argparse.Namespace) -> int:
    try:  # the exporters' own rule for an endpoint
        target = parse_endpoint(args.target) or ""
    except ValueError as exc:
        print(f"paygent-otel spool retarget: --to {args.target!r}: {exc}", file=sys.stderr)
        return 2
    spool = _open(args)
    if spool is None:
        return 1
    try:
        known = {e.url: e.dest for e in spool.endpoints() if e.url} | {
            e.dest: e.dest for e in spool.endpoints()
        }
        source = args.source.strip().rstrip("/")
        dest = known.get(source)
        if dest is None:
            print(
                f"paygent-otel spool retarget: no records are filed under {args.source!r} in "
                f"{spool.path}; `paygent-otel spool status` lists the endpoints",
                file=sys.stderr,
            )
            return 1
        pending, dead = spool.retarget(dest, destination_id(target), target)
        endpoints = spool.endpoints()
    finally:
        spool.close()
    print(
        f"{pending} pending records and {dead} dead letters of {args.source} are now filed "
        f"under {target} in {spool.path}"
    )
    _say_who_sends(spool.path, endpoints)
    return 0


_PROGRESS_SECONDS = 2.0


def _watch(spool: SqliteSpool | PostgresSpool, keys: list[str], timeout: float) -> int:
    """Report every few seconds how many of ``keys`` were delivered; a summary at the end."""
    started = time.monotonic()
    deadline = started + timeout
    reported = started
    while True:
        states = spool.key_states(keys)
        delivered = sum(state == "delivered" for state in states.values())
        dead = sum(state == "dead" for state in states.values())
        pending = len(keys) - delivered - dead
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        if now - reported >= _PROGRESS_SECONDS:
            print(
                f"  {delivered} of {len(keys)} delivered, {dead} dead again, {pending} pending "
                f"({now - started:.0f} s)",
                flush=True,
            )
            reported = now
        time.sleep(0.2)
    print(
        f"after {time.monotonic() - started:.1f} s: {delivered} of {len(keys)} delivered, "
        f"{dead} dead again, {pending} still pending"
        + (" (is an exporter or bridge running on this spool?)" if pending else "")
    )
    return 0 if delivered == len(keys) else 1


def _purge(args: argparse.Namespace) -> int:
    spool = _open(args)
    if spool is None:
        return 1
    try:
        stats = spool.stats()
        count = stats.pending if args.pending else stats.dead_letters
        what = "usage records waiting for delivery" if args.pending else "dead letters"
        if not count:
            print(f"no {what} in {spool.path}; nothing to delete")
            return 0
        if not args.yes:
            warning = " They will never be billed." if args.pending else ""
            try:
                answer = input(f"Delete {count} {what} from {spool.path} for good?{warning} [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = spool.purge("pending" if args.pending else "dead")
    finally:
        spool.close()
    print(f"deleted {deleted} {what} from {spool.path}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    spool = _open_view(args)
    if spool is None:
        return 1
    if not isinstance(spool, SqliteSpoolView):
        spool.close()
        print(
            "the audit lines are kept by SQLite spools; a PostgreSQL spool's changes are in "
            "the database's own log",
            file=sys.stderr,
        )
        return 1
    try:
        lines = spool.audit_lines(limit=args.limit if args.limit > 0 else -1)
    finally:
        spool.close()
    rows = [
        {
            "at": iso_utc(line.at),
            "at_unix": line.at,
            "who": line.who,
            "action": line.action,
            "records": line.records,
            "detail": line.detail,
        }
        for line in lines
    ]
    columns = ["at", "who", "action", "records", "detail"]
    if args.format == "text" and not rows:
        print(f"no audit lines in {spool.path}: nobody retried or purged anything here")
        return 0
    table = format_table(
        ["when", "who", "action", "records", "what"],
        [
            [human_time(line.at), line.who, line.action, str(line.records), line.detail]
            for line in lines
        ],
        numbers={3},
    )
    print_rows(rows, columns, args.format, text=table)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    if not is_pg_url(args.target):
        print(
            f"--to must be a PostgreSQL URL (postgresql://...), not {args.target!r}",
            file=sys.stderr,
        )
        return 2
    if not Path(args.source).is_file():
        print(f"no spool file at {args.source} (pass the SQLite spool to --from)", file=sys.stderr)
        return 1
    target = _open_postgres(args.target)
    if target is None:
        return 1
    from paygent_otel.delivery.spool.postgres import move_sqlite_records

    try:
        moved = move_sqlite_records(args.source, target)
    except (ValueError, OSError, sqlite3.Error) as exc:
        print(f"cannot migrate {args.source}: {exc}", file=sys.stderr)
        return 1
    finally:
        target.close()
    if not (moved.pending or moved.dead_letters or moved.duplicates):
        print(f"nothing to move: {args.source} holds no pending records or dead letters")
        return 0
    print(
        f"{moved.pending} pending records and {moved.dead_letters} dead letters moved from "
        f"{args.source} to {target.url}; {moved.duplicates} were already in PostgreSQL "
        "(deleted from the file, not sent twice). Replicas on the URL deliver them now."
    )
    return 0


# fmt: off
_SUBCOMMANDS: Final[tuple[_Subcommand, ...]] = (
    _Subcommand(
        "status",
        "records pending and in flight, dead letters, oldest pending age, size",
        "Count what the spool holds: records waiting for delivery (and how many are being "
        "sent right now), dead letters by status, how long the oldest record has waited, "
        "and the space used.",
        _status,
        ((("--json",), {"action": "store_true", "help": "print one JSON object"}),),
    ),
    _Subcommand(
        "dead",
        "list dead letters (records Paygent refused) with status and reason",
        "List dead letters, newest first: when, the status, the key, where the record\n"
        "came from and Paygent's answer. --json adds each record's body.",
        _dead,
        (
            (("--status",), {"help": "only dead letters with this status (400, invalid, ...)"}),
            (("--limit",), {"type": int, "default": 20,
                            "help": "show at most this many (default 20; 0 = all)"}),
        ),
        epilog=_DEAD_EPILOG,
        formats=True,
    ),
    _Subcommand(
        "retry",
        "move dead letters back to pending, so a running exporter sends them again",
        "Move dead letters back to the pending records, with their original idempotency "
        "key, once the cause of the refusal is fixed. A process delivering from this spool "
        "to the records' endpoint sends them within a second (the next one to start, if "
        "none runs); the command says which endpoint that is. Invalid records are never "
        "retried (they are not Paygent documents).",
        _retry,
        (
            (("--status",), {"help": "only dead letters with this status (400, 422, ...)"}),
            (("--key",), {"action": "append", "default": [], "metavar": "KEY",
                          "help": "only the dead letter with this idempotency key (repeatable)"}),
            (("--wait",), {"type": duration_type(), "metavar": "DURATION",
                           "help": "then watch the spool up to DURATION (30s, 2m, ...) while an "
                           "exporter sends them, printing progress, and end with a summary; "
                           "exit 1 if some are still pending or dead again"}),
        ),
    ),
    _Subcommand(
        "retarget",
        "file the records of one endpoint under another, so they are sent there",
        "Records are filed under the endpoint they were recorded for, and a process only "
        "sends those of its own endpoint: usage recorded against a sandbox is never billed "
        "to production by accident. When an endpoint was wrong (a typo, a path ending in "
        "/api/v2/usage), move its pending records and dead letters to the right one; "
        "pending ones fall due at once. `spool status` lists the endpoints and their URLs.",
        _retarget,
        (
            (("--from",), {"dest": "source", "required": True, "metavar": "URL",
                           "help": "the endpoint the records are filed under, as `spool "
                           "status` shows it (or its id)"}),
            (("--to",), {"dest": "target", "required": True, "metavar": "URL",
                         "help": "the endpoint to send them to (the API base URL, as "
                         "OTEL_EXPORTER_PAYGENT_ENDPOINT)"}),
        ),
    ),
    _Subcommand(
        "purge",
        "delete every dead letter (or, with --pending, every undelivered record)",
        "Delete every dead letter for good, after asking. With --pending, delete the "
        "records still waiting for delivery instead: they will never be billed.",
        _purge,
        (
            (("--pending",), {"action": "store_true",
                              "help": "delete the records waiting for delivery, not the dead "
                              "letters"}),
            (("--yes",), {"action": "store_true", "help": "do not ask for confirmation"}),
        ),
    ),
    _Subcommand(
        "audit",
        "who retried, purged or re-targeted records, when, and how many",
        "List the audit lines the spool keeps for every change a person made to it: "
        "`spool retry`, `spool purge` and any re-targeting of records to another "
        "endpoint. Each line says when (UTC), who (user@host and process id), what and "
        "how many records. Newest first.",
        _audit,
        ((("--limit",), {"type": int, "default": 50,
                          "help": "show at most this many (default 50; 0 = all)"}),),
        formats=True,
    ),
    _Subcommand(
        "migrate",
        "move a SQLite spool's pending records and dead letters into a PostgreSQL spool",
        "Move every pending record and dead letter of a SQLite spool file into the\n"
        "PostgreSQL spool at URL (created if needed), keys, attempts and schedule kept,\n"
        "then delete them from the file. Records whose key PostgreSQL already knows are\n"
        "deleted from the file without a second copy: running it twice, or while replicas\n"
        "on PostgreSQL deliver, sends nothing twice. Records a running exporter is sending\n"
        "right now stay in the file: stop the exporters on the file first, or run it again.",
        _migrate,
        (
            (("--from",), {"dest": "source", "metavar": "FILE", "required": True,
                           "help": "the SQLite spool file"}),
            (("--to",), {"dest": "target", "metavar": "URL", "required": True,
                         "help": "the PostgreSQL spool, "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"}),
        ),
        epilog=(
            "example:\n  paygent-otel spool migrate --from ~/.local/state/paygent-otel/"
            "spool.sqlite3 --to postgresql://paygent@db.internal/billing\n\n"
            "Then point the exporters or `paygent-otel serve --spool` at the URL."
        ),
        spool=False,
    ),
)
# fmt: on
"""The ``spool`` subcommands (a declarative table: :func:`register` builds the parsers)."""
