"""The ``paygent-otel spool`` commands: look into the durable spool, replay, clean up.

``status`` (pending, in flight, dead letters, oldest age, size), ``dead`` (dead letters
with their reasons), ``retry`` (dead letters back to pending), ``purge`` (delete, after
confirmation) and ``migrate`` (a SQLite spool's records into a PostgreSQL spool). They open
the same SQLite file or PostgreSQL database the exporters write, safely while they run.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import MEMORY_SPOOL, OTEL_EXPORTER_PAYGENT_SPOOL_PATH, ExporterConfig
from ._spool import DeadLetter, SqliteSpool
from ._spool_url import SpoolUrl, is_pg_url

if TYPE_CHECKING:
    from ._spool_pg import PostgresSpool

__all__ = ["register"]

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
  paygent-otel spool purge --yes            delete every dead letter, no question asked
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
Paygent document, so it cannot be retried: fix the instrumentation), or "gave_up" when
retries ran past max_retry_seconds.
"""


def _default_spool() -> str:
    """What the exporters use when given no ``spool_path``: the env var, else the default."""
    return ExporterConfig.resolve().spool_path


def _add_spool_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spool",
        metavar="PATH|URL",
        help=(
            "the spool file, or a postgresql:// URL (password masked in the output; prefer "
            "PGPASSWORD or ~/.pgpass) (default: "
            f"${OTEL_EXPORTER_PAYGENT_SPOOL_PATH} if set, else the exporters' default, here "
            f"{_default_spool()})"
        ),
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``spool`` command and its subcommands."""
    parser = commands.add_parser(
        "spool",
        help="inspect the durable spool: pending records, dead letters; retry or purge them",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="spool_command", metavar="SUBCOMMAND", required=True)

    status = subcommands.add_parser(
        "status",
        help="records pending and in flight, dead letters, oldest pending age, size",
        description=(
            "Count what the spool holds: records waiting for delivery (and how many are being "
            "sent right now), dead letters by status, how long the oldest record has waited, "
            "and the space used."
        ),
    )
    _add_spool_argument(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_status)

    dead = subcommands.add_parser(
        "dead",
        help="list dead letters (records Paygent refused) with status and reason",
        description=(
            "List dead letters, newest first: when, the status, the key, where the record "
            "came from and Paygent's answer. --json adds each record's body."
        ),
        epilog=_DEAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_spool_argument(dead)
    dead.add_argument("--status", help="only dead letters with this status (400, invalid, ...)")
    dead.add_argument(
        "--limit", type=int, default=20, help="show at most this many (default 20; 0 = all)"
    )
    dead.add_argument("--json", action="store_true", help="print a JSON array, bodies included")
    dead.set_defaults(handler=_dead)

    retry = subcommands.add_parser(
        "retry",
        help="move dead letters back to pending, so a running exporter sends them again",
        description=(
            "Move dead letters back to the pending records, with their original idempotency "
            "key, once the cause of the refusal is fixed. An exporter running on this spool "
            "sends them within a second; otherwise the next one to start does. Invalid records "
            "are never retried (they are not Paygent documents)."
        ),
    )
    _add_spool_argument(retry)
    retry.add_argument("--status", help="only dead letters with this status (400, 422, ...)")
    retry.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY",
        help="only the dead letter with this idempotency key (repeatable)",
    )
    retry.set_defaults(handler=_retry)

    purge = subcommands.add_parser(
        "purge",
        help="delete every dead letter (or, with --pending, every undelivered record)",
        description=(
            "Delete every dead letter for good, after asking. With --pending, delete the "
            "records still waiting for delivery instead: they will never be billed."
        ),
    )
    _add_spool_argument(purge)
    purge.add_argument(
        "--pending",
        action="store_true",
        help="delete the records waiting for delivery, not the dead letters",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(handler=_purge)

    migrate = subcommands.add_parser(
        "migrate",
        help="move a SQLite spool's pending records and dead letters into a PostgreSQL spool",
        description=(
            "Move every pending record and dead letter of a SQLite spool file into the "
            "PostgreSQL spool at URL (created if needed), keys, attempts and schedule kept, "
            "then delete them from the file. Records whose key PostgreSQL already knows are "
            "deleted from the file without a second copy: running it twice, or while replicas "
            "on PostgreSQL deliver, sends nothing twice. Records a running exporter is sending "
            "right now stay in the file: stop the exporters on the file first, or run it again."
        ),
        epilog=(
            "example:\n  paygent-otel spool migrate --from ~/.local/state/paygent-otel/"
            "spool.sqlite3 --to postgresql://paygent@db.internal/billing\n\n"
            "Then point the exporters or `paygent-otel serve --spool` at the URL."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument(
        "--from", dest="source", metavar="FILE", required=True, help="the SQLite spool file"
    )
    migrate.add_argument(
        "--to",
        dest="target",
        metavar="URL",
        required=True,
        help="the PostgreSQL spool, postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
    )
    migrate.set_defaults(handler=_migrate)


def _open_postgres(url: str) -> PostgresSpool | None:
    """The PostgreSQL spool at ``url``; None, with the reason (password masked), if unusable."""
    try:
        from ._spool_pg import PostgresSpool
    except ImportError as exc:
        print(f"the PostgreSQL spool needs psycopg: pip install 'paygent-otel[postgres]' ({exc})",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        # No local fallback here: a person asked about this database, not about a stand-in.
        return PostgresSpool(url, max_bytes=ExporterConfig.resolve().spool_max_bytes)
    except OSError as exc:
        print(f"cannot use the spool {SpoolUrl(url)}: {exc}", file=sys.stderr)
        return None


def _open(args: argparse.Namespace) -> SqliteSpool | PostgresSpool | None:
    """The spool named by ``--spool`` (or the default); None, with a message, if there is none."""
    path = args.spool or _default_spool()
    if is_pg_url(path):
        return _open_postgres(path)
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
    return SqliteSpool(path, max_bytes=ExporterConfig.resolve().spool_max_bytes)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(args: argparse.Namespace) -> int:
    spool = _open(args)
    if spool is None:
        return 1
    try:
        stats = spool.stats()
        by_status = spool.dead_letter_counts()
    finally:
        spool.close()
    on_disk = (
        sum(
            p.stat().st_size
            for p in (spool.path, Path(f"{spool.path}-wal"), Path(f"{spool.path}-shm"))
            if p.exists()
        )
        if isinstance(spool, SqliteSpool)
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
                }
            )
        )
        return 0
    dead_detail = ", ".join(f"{status}: {n}" for status, n in by_status.items())
    oldest = "-" if stats.oldest_pending_age is None else f"{_age(stats.oldest_pending_age)} ago"
    print(f"spool           {spool.path}")
    print(f"pending         {stats.pending} ({stats.in_flight} being sent now)")
    print(f"oldest pending  {oldest}")
    print(f"dead letters    {stats.dead_letters}" + (f" ({dead_detail})" if dead_detail else ""))
    print(f"size            {_size(stats.size_bytes)} used, {_size(on_disk)} on disk")
    if stats.dead_letters:
        print(
            "\nsee why with `paygent-otel spool dead`; send them again with "
            "`paygent-otel spool retry` once the cause is fixed"
        )
    return 0


def _dead_json(letter: DeadLetter) -> dict[str, Any]:
    try:
        body: Any = json.loads(letter.body)
    except ValueError:
        body = letter.body
    return {
        "key": letter.key,
        "status": letter.status,
        "reason": letter.reason,
        "died": _when(letter.died),
        "died_unix": letter.died,
        "attempts": letter.attempts,
        "origin": letter.origin,
        "body": body,
    }


def _dead(args: argparse.Namespace) -> int:
    spool = _open(args)
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
    if args.json:
        print(json.dumps([_dead_json(letter) for letter in letters], indent=2))
        return 0
    if not letters:
        which = f" with status {args.status}" if args.status else ""
        print(f"no dead letters{which} in {spool.path}")
        return 0
    shown = "" if len(letters) == total else f", showing the newest {len(letters)}"
    print(f"{total} dead letters in {spool.path}{shown}:")
    for letter in letters:
        print(
            f"\n{_when(letter.died)}  {letter.status:<8} attempts {letter.attempts}  "
            f"key {letter.key}\n  from:   {letter.origin}\n  reason: {letter.reason}"
        )
    return 0


def _retry(args: argparse.Namespace) -> int:
    spool = _open(args)
    if spool is None:
        return 1
    try:
        moved = spool.retry_dead(status=args.status, keys=args.key)
    finally:
        spool.close()
    if not moved:
        print(
            f"no dead letters to retry in {spool.path} (invalid records are never retried: "
            "see `paygent-otel spool dead --status invalid`)"
        )
        return 0
    print(
        f"{moved} dead letters moved back to pending in {spool.path}; an exporter running on "
        "this spool sends them within a second, else the next one to start"
    )
    return 0


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
    from ._spool_pg import move_sqlite_records

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
