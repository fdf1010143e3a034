"""``python -m paygent_otel._cli.dry_run``: print what would be billed, send nothing.

Reads OTLP/JSON files (an ``Export*ServiceRequest`` per file, or one per line as the
Collector's ``file`` exporter writes them), maps them exactly as the bridge does (the same
extraction, framework rules and mapping), and prints each record that would be sent, each
record that would be refused with its reason, and the totals per customer. Nothing is
sent and nothing is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from paygent_otel._output import add_command, program_parser
from paygent_otel.bridge.otlp import (
    Extraction,
    InvalidRequest,
    Signal,
    UsageExtractor,
    decode_request,
)
from paygent_otel.convention.frameworks import FRAMEWORKS, parse_frameworks
from paygent_otel.convention.mapping import IdentityDefaults, RejectReason

__all__ = ["dry_run", "main", "register"]

_SIGNAL_KEYS = {
    "resourceSpans": Signal.TRACES,
    "resourceMetrics": Signal.METRICS,
    "resourceLogs": Signal.LOGS,
}

_DESCRIPTION = """\
Print what Paygent would be billed for the OpenTelemetry data in OTLP/JSON files, without
sending anything: every usage record (customer, kind, provider/model, quantities, and the
span or metric it came from), every record that would be refused and why, and the totals
per customer.

Write such a file with the Collector's `file` exporter (one request per line), or with
`opentelemetry-exporter-otlp`'s JSON encoding. Metric points must be DELTA sums here (the
bridge turns cumulative sums into deltas with its spool; a dry run has none)."""

_EPILOG = """\
example:
  python -m paygent_otel._cli.dry_run --frameworks pipecat,livekit \\
      --agent-id voice-bot traces.jsonl

exit status: 0 every record would be billed, 1 some would be refused, 2 unreadable input"""


def _documents(text: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, document) for the file's JSON object, or for each of its JSON lines."""
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        yield source, whole
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"{source} line {number} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidRequest(f"{source} line {number} is not a JSON object")
        yield f"{source} line {number}", document


def _extract(extractor: UsageExtractor, where: str, document: dict[str, Any]) -> Extraction:
    signals = [signal for key, signal in _SIGNAL_KEYS.items() if key in document]
    if len(signals) != 1:
        raise InvalidRequest(
            f"{where} holds no OTLP request (expected one of {', '.join(_SIGNAL_KEYS)})"
        )
    signal = signals[0]
    request = decode_request(signal, json.dumps(document).encode(), json_encoded=True)
    if signal is Signal.TRACES:
        return extractor.spans(request)
    if signal is Signal.METRICS:
        return extractor.metrics(request, None)
    return extractor.logs(request)


def _quantities(payload: dict[str, Any]) -> dict[str, Any]:
    raw = payload["rawUsage"]
    return {k: v for k, v in raw.items() if k not in ("provider", "model", "plan")}


def dry_run(
    texts: Sequence[tuple[str, str]], extractor: UsageExtractor, out: TextIO
) -> tuple[int, int]:
    """Print what ``texts`` ((source, OTLP/JSON text) pairs) would bill; (billed, refused).

    Raises :class:`~paygent_otel.bridge.otlp.InvalidRequest` for unreadable input.
    """
    billed = refused = 0
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for source, text in texts:
        for where, document in _documents(text, source):
            extraction = _extract(extractor, where, document)
            for record in extraction.records:
                billed += 1
                payload = record.payload
                raw = payload["rawUsage"]
                quantities = _quantities(payload)
                out.write(
                    f"BILL   customer={payload['customerId']} agent={payload['agentId']} "
                    f"indicator={payload['indicator']!r} {raw['provider']}/{raw['model']} "
                    f"plan={raw['plan']} {json.dumps(quantities, sort_keys=True)}\n"
                    f"       from {record.origin}\n"
                )
                _add(totals[(payload["customerId"], payload["agentId"])], quantities)
            for rejection in extraction.rejections:
                if rejection.reason is RejectReason.INVALID:
                    refused += 1
                    out.write(f"REFUSE {rejection.message}\n")
    out.write(f"\n{billed} records would be billed, {refused} refused\n")
    for (customer, agent), summed in sorted(totals.items()):
        listed = ", ".join(f"{name}={value:g}" for name, value in sorted(summed.items()))
        out.write(f"  customer {customer} (agent {agent}): {listed}\n")
    return billed, refused


def _add(totals: dict[str, float], node: dict[str, Any], prefix: str = "") -> None:
    for key, value in node.items():
        if isinstance(value, dict):
            _add(totals, value, f"{prefix}{key}.")
        elif key != "schemaVersion":
            totals[prefix + key] += value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="OTLP/JSON file(s); - reads standard input"
    )
    parser.add_argument(
        "--frameworks",
        default="",
        help=f"frameworks to read, comma-separated: {', '.join(FRAMEWORKS)} "
        "(each may end in :INDICATOR, the framework's indicator default)",
    )
    parser.add_argument(
        "--genai", action="store_true", help="also bill other spans' gen_ai.usage.* counts"
    )
    parser.add_argument("--agent-id", help="default agent id (as PAYGENT_AGENT_ID)")
    parser.add_argument("--customer-id", help="default customer id (as PAYGENT_CUSTOMER_ID)")
    parser.add_argument("--indicator", help="default indicator (as PAYGENT_INDICATOR)")


def _run(args: argparse.Namespace) -> int:
    extractor = UsageExtractor(
        IdentityDefaults(
            agent_id=args.agent_id, customer_id=args.customer_id, indicator=args.indicator
        ),
        genai=args.genai,
        frameworks=parse_frameworks(args.frameworks),
    )
    try:
        texts = [
            (name, sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8"))
            for name in args.files
        ]
        _, refused = dry_run(texts, extractor, sys.stdout)
    except (OSError, UnicodeDecodeError, InvalidRequest) as exc:
        print(f"paygent dry run: cannot read the input: {exc}", file=sys.stderr)
        return 2
    return 1 if refused else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dry-run`` command to the ``paygent-otel`` command line."""
    parser = add_command(
        commands,
        "dry-run",
        help="print what OTLP/JSON files would bill, without sending anything",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        handler=_run,
    )
    _add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the dry run as its own program; returns the exit status."""
    parser = program_parser(
        "python -m paygent_otel._cli.dry_run", description=_DESCRIPTION, epilog=_EPILOG
    )
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
