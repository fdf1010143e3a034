"""``paygent-otel demo``: the span, metric and sampled routes on an embedded sandbox.

Starts the sandbox in this process, runs a small instrumented program through a real
``TracerProvider`` + ``BatchSpanProcessor`` + ``PaygentSpanExporter``, the same usage
through a ``MeterProvider`` + ``PaygentMetricExporter``, and a service that samples its
traces; shuts them down cleanly, and prints what was billed and what was refused and why.
No account needed.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer

from paygent_otel._cli.sampled_demo import run_sampled_service_demo
from paygent_otel._output import add_command
from paygent_otel.convention import semconv as sc
from paygent_otel.exporters.metric import PaygentMetricExporter
from paygent_otel.exporters.trace import PaygentSpanExporter
from paygent_otel.recording.helpers import record_sts, record_stt
from paygent_otel.recording.instruments import UsageInstruments

__all__ = ["register", "run_demo"]

DEMO_API_KEY = "demo-key-not-secret"
"""The key the embedded sandbox expects."""
SPANS_AGENT = "demo-agent-spans"
"""Agent id of the span route's records (set once, on the resource)."""
METRICS_AGENT = "demo-agent-metrics"
"""Agent id of the metric route's records."""
CUSTOMER = "cust_acme"


class _Collect(logging.Handler):
    """Keeps the bridge's warnings so the demo can print every refusal and its reason."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _collecting() -> Iterator[_Collect]:
    handler = _Collect()
    logger = logging.getLogger("paygent_otel")
    previous = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # the demo prints them itself, once, at the end
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


TURNS = 10
"""Conversation turns the demo's voice agent serves; each turn is STT, TTS and STS usage."""


class _StsTokens(TypedDict):
    input_text_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    cached_text_tokens: int


def _turn_usage(turn: int) -> tuple[float, int, _StsTokens]:
    """The usage of one turn: audio seconds, characters, speech-to-speech tokens."""
    sts = _StsTokens(
        input_text_tokens=120 + turn,
        input_audio_tokens=900 + 10 * turn,
        output_audio_tokens=1500 + 20 * turn,
        cached_text_tokens=40,
    )
    return 27.0 + turn, 1200 + 10 * turn, sts


def _span_route(url: str, spool: Path) -> dict[str, int]:
    """The seed's three calls as recording helpers and attributes, one record per call."""
    exporter = PaygentSpanExporter(endpoint=url, api_key=DEMO_API_KEY, spool_path=spool)
    provider = TracerProvider(resource=Resource.create({sc.AGENT_ID: SPANS_AGENT}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("paygent_otel._cli.demo")
    for turn in range(TURNS):
        seconds, characters, sts = _turn_usage(turn)
        # client.track_stt(agent, customer, "voice-minutes", {...}) becomes:
        with tracer.start_as_current_span("transcribe"):
            record_stt(
                None,
                CUSTOMER,
                "voice-minutes",
                {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": seconds / 60},
            )
        # Plain attributes work too: the convention is just names.
        with tracer.start_as_current_span("synthesize") as span:
            span.set_attributes(
                {
                    sc.USAGE_KIND: "tts",
                    sc.CUSTOMER_ID: CUSTOMER,
                    sc.INDICATOR: "voice-characters",
                    sc.PROVIDER: "elevenlabs",
                    sc.MODEL: "eleven_multilingual_v2",
                    sc.TTS_CHARACTERS: characters,
                    "paygent.meta.channel": "phone",
                }
            )
        with tracer.start_as_current_span("realtime-turn"):
            record_sts(
                None,
                CUSTOMER,
                "realtime-tokens",
                service_provider="openai",
                model="gpt-4o-realtime-preview",
                **sts,
            )
    _bad_input(tracer)
    provider.shutdown()  # flushes the batch processor, then delivers within the timeout
    return exporter.stats


def _bad_input(tracer: Tracer) -> None:
    """One of each kind of bad input: each is refused with a reason, nothing crashes."""
    bad: list[tuple[str, dict[str, object]]] = [
        ("negative", {sc.USAGE_KIND: "stt", sc.STT_AUDIO_MINUTES: -1.0}),
        ("nan", {sc.USAGE_KIND: "stt", sc.STT_AUDIO_SECONDS: float("nan")}),
        ("string-number", {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: "1200"}),
        ("unknown-kind", {sc.USAGE_KIND: "video", sc.TTS_CHARACTERS: 5}),
        (
            "both-units",
            {sc.USAGE_KIND: "stt", sc.STT_AUDIO_MINUTES: 1.0, sc.STT_AUDIO_SECONDS: 60.0},
        ),
        (
            "cached-twice",
            {sc.USAGE_KIND: "sts", sc.STS_CACHED_TOKENS: 5, sc.STS_CACHED_TEXT_TOKENS: 5},
        ),
        ("no-quantity", {sc.USAGE_KIND: "sts"}),
        ("zero", {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 0}),
        ("no-customer", {sc.USAGE_KIND: "tts", sc.CUSTOMER_ID: " ", sc.TTS_CHARACTERS: 10}),
    ]
    for name, attributes in bad:
        with tracer.start_as_current_span(f"bad-{name}") as span:
            span.set_attributes(
                {sc.CUSTOMER_ID: CUSTOMER, sc.PROVIDER: "p", sc.MODEL: "m", **attributes}  # type: ignore[dict-item]
            )


def _metric_route(url: str, spool: Path) -> dict[str, int]:
    """The same usage as counter increments: one call per identity and interval."""
    exporter = PaygentMetricExporter(endpoint=url, api_key=DEMO_API_KEY, spool_path=spool)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({sc.AGENT_ID: METRICS_AGENT})
    )
    usage = UsageInstruments(provider.get_meter("paygent_otel._cli.demo"))
    for turn in range(TURNS):
        seconds, characters, sts = _turn_usage(turn)
        # Counters take increments as they happen: audio second by second, and so on.
        for _ in range(int(seconds)):
            usage.add_stt(
                seconds=1.0,
                customer_id=CUSTOMER,
                indicator="voice-minutes",
                provider="deepgram",
                model="nova-2",
            )
        usage.add_tts(
            characters=characters,
            customer_id=CUSTOMER,
            indicator="voice-characters",
            provider="elevenlabs",
            model="eleven_multilingual_v2",
            meta_tags={"channel": "phone"},
        )
        usage.add_sts(
            customer_id=CUSTOMER,
            indicator="realtime-tokens",
            provider="openai",
            model="gpt-4o-realtime-preview",
            **sts,
        )
    provider.shutdown()  # exports the partial interval, then delivers
    return exporter.stats


def _compare_routes(totals: list[dict[str, Any]]) -> str:
    """One line: the metric route's calls against the span route's, and whether totals match."""
    by_agent: dict[str, dict[str, dict[str, Any]]] = {}
    for row in totals:
        by_agent.setdefault(row["agent_id"], {})[row["kind"]] = row
    spans, metrics = by_agent.get(SPANS_AGENT, {}), by_agent.get(METRICS_AGENT, {})
    same = spans.keys() == metrics.keys() and all(
        spans[k]["characters"] == metrics[k]["characters"]
        and spans[k]["sts_tokens"] == metrics[k]["sts_tokens"]
        and math.isclose(spans[k]["audio_minutes"], metrics[k]["audio_minutes"], rel_tol=1e-9)
        for k in spans
    )
    calls = [sum(r["calls"] for r in route.values()) for route in (spans, metrics)]
    return (
        f"metric route: {calls[1]} calls for what the span route billed in {calls[0]} calls; "
        f"totals identical: {'yes' if same else 'NO'}"
    )


Route = Callable[[str, Path], dict[str, int]]


def _reconciled(spools: list[Path], ledger: Path) -> str:
    """One line: the spools' conservation report, checked against the ledger."""
    from paygent_otel.delivery.reconcile import conservation_report
    from paygent_otel.sandbox.ledger import Ledger

    report = conservation_report(spools, ledger=Ledger(ledger))
    recorded = report.totals().recorded.records
    verdict = "BALANCED" if report.balanced else "DIFFERENCE (see `paygent-otel reconcile`)"
    return f"reconciled (paygent-otel reconcile): {recorded} records recorded, {verdict}"


_ROUTES = ("spans", "metrics", "sampled")
_LEDGER = "ledger.sqlite3"


def _clear_earlier_run(folder: Path) -> list[Path]:
    """Delete the files an earlier demo left in ``folder`` (so totals are this run's only)."""
    names = [_LEDGER, *(f"{route}.spool" for route in _ROUTES)]
    earlier = [
        path
        for name in names
        for path in folder.glob(f"{name}*")  # the SQLite file, its -wal/-shm, cumulative state
        if path.is_file()
    ]
    for path in earlier:
        path.unlink()
    return earlier


def run_demo(workdir: Path | None = None) -> int:
    """Run the demo in ``workdir`` (a temporary folder by default); exit status."""
    from paygent_otel._cli.sandbox import format_totals
    from paygent_otel.sandbox.server import SandboxServer

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="paygent-demo-") as tmp:
        folder = workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if _clear_earlier_run(folder):
            print(f"replaced the files of an earlier demo run in {folder}")
        with SandboxServer(folder / _LEDGER, api_key=DEMO_API_KEY) as sandbox:
            print(f"sandbox (a local Paygent) listening on {sandbox.url}\n")
            routes: list[tuple[str, Route]] = list(
                zip(
                    _ROUTES,
                    (
                        _span_route,
                        _metric_route,
                        partial(run_sampled_service_demo, api_key=DEMO_API_KEY),
                    ),
                    strict=True,
                )
            )
            with _collecting() as refusals:
                stats = {
                    name: route(sandbox.url, folder / f"{name}.spool") for name, route in routes
                }
            by = ("kind", "agent_id", "model")
            print("Billed (the sandbox ledger): the same usage through spans and through metrics")
            print(format_totals(sandbox.ledger.totals(by=by), by))
            print(f"\nidempotent repeats: {sandbox.ledger.duplicate_count()}")
            print(_compare_routes(sandbox.ledger.totals(by=("agent_id", "kind"))))
            print(_reconciled([folder / f"{name}.spool" for name in _ROUTES], sandbox.db_path))
        for name, counters in stats.items():
            summary = ", ".join(f"{k}={v}" for k, v in sorted(counters.items()))
            print(f"{name} route: {summary}")
        sampled = stats["sampled"]
        print(
            f"sampled service (10% of traces kept): {sampled['requests']} requests, "
            f"{sampled['spans_sampled_to_backend']} spans reached the tracing backend, "
            f"{sampled['delivered']} of {sampled['usage_spans_recorded']} usage records billed"
        )
        print("\nRefused, and why:")
        for message in refusals.messages:
            print(f"  - {message}")
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


_DESCRIPTION = """\
Start a local Paygent sandbox in this process and bill sample speech-to-text,
text-to-speech and speech-to-speech usage to it three ways: as spans, through a real
OpenTelemetry TracerProvider + BatchSpanProcessor + PaygentSpanExporter (with one of
each kind of bad input); as metrics, through a MeterProvider + PaygentMetricExporter;
and from a service that keeps only 10% of its traces. Shut down cleanly, then print
what was billed, what was refused and why, and whether every record is accounted for.
Needs no account, no key and no configuration.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    parser = add_command(
        commands,
        "demo",
        help="bill sample usage to an embedded local Paygent and print the ledger",
        description=_DESCRIPTION,
        epilog="example:\n  paygent-otel demo\n  paygent-otel demo --workdir /tmp/demo  "
        "(keep the ledger and spool files)",
        handler=lambda args: run_demo(args.workdir),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the ledger and spool files, created if missing; the files of an "
        "earlier demo there are replaced (default: a temporary folder, removed)",
    )
