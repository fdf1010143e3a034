"""The ``paygent-otel`` command line: demo, sandbox, ledger, serve, spool, reconcile, doctor."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial

from paygent_otel._version import __version__

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]

_GLOBAL_FLAGS = ("-v", "--verbose")


def _build_parser() -> argparse.ArgumentParser:
    from paygent_otel._cli.demo import register as register_demo
    from paygent_otel._cli.doctor import register as register_doctor
    from paygent_otel._cli.dry_run import register as register_dry_run
    from paygent_otel._cli.reconcile import register as register_reconcile
    from paygent_otel._cli.sandbox import register as register_sandbox
    from paygent_otel._cli.serve import register as register_bridge
    from paygent_otel._cli.spool import register as register_spool

    parser = argparse.ArgumentParser(
        prog="paygent-otel",
        description=(
            "Bill AI speech usage recorded with OpenTelemetry to Paygent. "
            "Start with `paygent-otel demo`; every command has --help."
        ),
        epilog=(
            "durations take units (30s, 500ms, 2m, 1h30m) and sizes too (64MiB, 1GB); "
            "-v may stand anywhere on the line"
        ),
    )
    parser.add_argument("--version", action="version", version=f"paygent-otel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (
        register_demo,
        register_sandbox,
        register_bridge,
        register_spool,
        register_reconcile,
        register_doctor,
        register_dry_run,
    ):
        register(commands)
    for command in _with_subcommands(parser):
        _add_global_flags(command)
        _help_when_bare(command)
    return parser


def _with_subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every command and subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _with_subcommands(child)


def _add_global_flags(parser: argparse.ArgumentParser) -> None:
    """``-v`` on every parser, so it works before or after the command."""
    parser.add_argument(
        *_GLOBAL_FLAGS,
        dest="verbose",
        action="store_true",
        # SUPPRESS: a subcommand that did not see -v must not reset the top level's.
        default=argparse.SUPPRESS,
        help="log at DEBUG level; show the traceback of an error",
    )


def _help_when_bare(parser: argparse.ArgumentParser) -> None:
    """A command that has subcommands prints its help when given none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            parser.set_defaults(handler=partial(_print_help, parser))


def _print_help(parser: argparse.ArgumentParser, _: argparse.Namespace) -> int:
    parser.print_help()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``paygent-otel`` command; returns the process exit status.

    An error a command did not handle is one line on stderr (with the traceback under
    ``-v``) and exit status 1, never a bare Python traceback.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error, ValueError, RuntimeError) as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "spool_command", None))))
        if verbose:
            traceback.print_exc()
        print(
            f"paygent-otel {command}: {type(exc).__name__}: {exc}"
            + ("" if verbose else " (run with -v for the traceback)"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
