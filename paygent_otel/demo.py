"""``paygent-otel demo``: the whole span route on an embedded sandbox, no account needed.

Starts the sandbox in this process, runs a small instrumented program through a real
``TracerProvider`` + ``BatchSpanProcessor`` + ``PaygentSpanExporter``, shuts it down
cleanly, and prints what was billed and what was refused and why.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from . import semconv as sc
from .recording import record_sts, record_stt
from .trace_exporter import PaygentSpanExporter

__all__ = ["register", "run_demo"]

DEMO_API_KEY = "demo-key-not-secret"
"""The key the embedded sandbox expects."""
SPANS_AGENT = "demo-agent-spans"
"""Agent id of the span route's records (set once, on the resource)."""
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


def _span_route(url: str, spool: Path) -> dict[str, int]:
    """The seed's three calls, rewritten as attribute-setting code, plus bad input."""
    exporter = PaygentSpanExporter(
        endpoint=url, api_key=DEMO_API_KEY, spool_path=spool, trace_tags=True
    )
    provider = TracerProvider(resource=Resource.create({sc.AGENT_ID: SPANS_AGENT}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("paygent_otel.demo")

    # client.track_stt(agent, customer, "voice-minutes", {...}) becomes:
    with tracer.start_as_current_span("transcribe"):
        record_stt(
            None,
            CUSTOMER,
            "voice-minutes",
            {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 0.45},
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
                sc.TTS_CHARACTERS: 1200,
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
            input_text_tokens=120,
            input_audio_tokens=900,
            output_text_tokens=60,
            output_audio_tokens=1500,
            cached_text_tokens=40,
            connection_minutes=1.5,
        )
    # One of each kind of bad input: each is refused with a reason, nothing crashes.
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
    ]
    for name, attributes in bad:
        with tracer.start_as_current_span(f"bad-{name}") as span:
            span.set_attributes(
                {sc.CUSTOMER_ID: CUSTOMER, sc.PROVIDER: "p", sc.MODEL: "m", **attributes}  # type: ignore[dict-item]
            )
    with tracer.start_as_current_span("bad-no-customer") as span:
        span.set_attributes(
            {sc.USAGE_KIND: "tts", sc.PROVIDER: "p", sc.MODEL: "m", sc.TTS_CHARACTERS: 10}
        )
    provider.shutdown()  # flushes the batch processor, then delivers within the timeout
    return exporter.stats


Route = Callable[[str, Path], dict[str, int]]


def run_demo(workdir: Path | None = None) -> int:
    """Run the demo in ``workdir`` (a temporary folder by default); exit status."""
    from .sandbox.cli import format_totals
    from .sandbox.server import SandboxServer

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="paygent-demo-") as tmp:
        folder = workdir or Path(tmp)
        with SandboxServer(folder / "ledger.sqlite3", api_key=DEMO_API_KEY) as sandbox:
            print(f"sandbox (a local Paygent) listening on {sandbox.url}\n")
            routes: list[tuple[str, Route]] = [("spans", _span_route)]
            with _collecting() as refusals:
                stats = {
                    name: route(sandbox.url, folder / f"{name}.spool") for name, route in routes
                }
            by = ("agent_id", "kind", "provider", "model")
            print("Billed (the sandbox ledger):")
            print(format_totals(sandbox.ledger.totals(by=by), by))
            print(f"\nidempotent repeats: {sandbox.ledger.duplicate_count()}")
        for name, counters in stats.items():
            summary = ", ".join(f"{k}={v}" for k, v in sorted(counters.items()))
            print(f"{name} route: {summary}")
        print("\nRefused, and why:")
        for message in refusals.messages:
            print(f"  - {message}")
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    parser = commands.add_parser(
        "demo",
        help="bill sample usage to an embedded local Paygent and print the ledger",
        description=(
            "Start a local Paygent sandbox in this process, record speech-to-text, "
            "text-to-speech and speech-to-speech usage (and one of each kind of bad input) "
            "through a real OpenTelemetry TracerProvider + BatchSpanProcessor + "
            "PaygentSpanExporter, shut down cleanly, then print what was billed and what was "
            "refused and why. Needs no account, no key and no configuration."
        ),
        epilog="example:\n  paygent-otel demo\n  paygent-otel demo --workdir /tmp/demo  "
        "(keep the ledger and spool files)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the ledger and spool files (default: a temporary folder, removed)",
    )
    parser.set_defaults(handler=lambda args: run_demo(args.workdir))
