"""The ``paygent-otel`` command line: sandbox, ledger, demo, spool, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _build_parser() -> argparse.ArgumentParser:
    from .bridge.cli import register as register_bridge
    from .demo import register as register_demo
    from .sandbox.cli import register as register_sandbox
    from .spool_cli import register as register_spool

    parser = argparse.ArgumentParser(
        prog="paygent-otel",
        description=(
            "Bill AI speech usage recorded with OpenTelemetry to Paygent. "
            "Start with `paygent-otel demo`; every command has --help."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level instead of INFO"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (register_demo, register_sandbox, register_bridge, register_spool):
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``paygent-otel`` command; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
