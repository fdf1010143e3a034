"""Customer and agent ids carried in OpenTelemetry Baggage, across processes and services.

The two-process test runs this file as two programs: a caller (the edge, which knows the
customer and puts it in baggage) and a callee (an HTTP service that records usage with no
customer id of its own, on a span and on a counter). The sandbox ledger must show the
caller's customer. The other tests pin the precedence, validation and the off switch.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import QuietHandler
from opentelemetry import baggage, context
from opentelemetry.propagate import extract, inject

from paygent_otel.convention import semconv as sc
from paygent_otel.recording.baggage import (
    MAX_BAGGAGE_VALUE_LENGTH,
    OTEL_EXPORTER_PAYGENT_BAGGAGE,
    PaygentBaggageSpanProcessor,
    identity_from_baggage,
)

AGENT = "agent-worker"
CALLEE_READY = "callee listening on "

# ----------------------------------------------------------------- the two programs


def run_callee(sandbox_url: str, api_key: str, spool: str) -> None:
    """An instrumented service: extracts the caller's context, records usage, no customer."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    from paygent_otel import PaygentSpanExporter, record_stt
    from paygent_otel.exporters.metric import PaygentMetricExporter
    from paygent_otel.recording.instruments import UsageInstruments

    resource = Resource.create({sc.AGENT_ID: AGENT})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(PaygentBaggageSpanProcessor())
    tracer_provider.add_span_processor(
        BatchSpanProcessor(
            PaygentSpanExporter(endpoint=sandbox_url, api_key=api_key, spool_path=spool)
        )
    )
    tracer = tracer_provider.get_tracer("callee")
    reader = PeriodicExportingMetricReader(
        PaygentMetricExporter(endpoint=sandbox_url, api_key=api_key, spool_path=spool),
        export_interval_millis=3_600_000,  # exported once, at shutdown
    )
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    usage = UsageInstruments(meter_provider.get_meter("callee"), baggage=True)

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            parent = extract(self.headers)
            token = context.attach(parent)
            try:
                with tracer.start_as_current_span("transcribe", kind=SpanKind.SERVER) as span:
                    record_stt(
                        service_provider="deepgram",
                        model="nova-2",
                        audio_seconds=body["seconds"],
                    )
                    usage.add_tts(
                        characters=body["characters"],
                        provider="elevenlabs",
                        model="eleven_flash_v2_5",
                    )
                    trace_id = format(span.get_span_context().trace_id, "032x")
                reply = json.dumps({"trace_id": trace_id, "identity": identity_from_baggage()})
            finally:
                context.detach(token)
            self.reply(reply.encode(), "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{CALLEE_READY}http://127.0.0.1:{server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    tracer_provider.shutdown()  # exports the spans, delivers the records
    meter_provider.shutdown()  # exports the counters, delivers the records


def run_caller(callee_url: str, customers: list[str]) -> None:
    """The edge: knows the customer, puts it in baggage, calls the service."""
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("caller")
    results = []
    for n, customer in enumerate(customers, start=1):
        token = context.attach(baggage.set_baggage(sc.CUSTOMER_ID, customer))
        try:
            with tracer.start_as_current_span("edge-request") as span:
                headers = {"Content-Type": "application/json"}
                inject(headers)
                body = json.dumps({"seconds": 6.0 * n, "characters": 100 * n}).encode()
                request = urllib.request.Request(callee_url, body, headers, method="POST")
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                answer["caller_trace_id"] = format(span.get_span_context().trace_id, "032x")
                answer["sent_headers"] = sorted(headers)
                results.append(answer)
        finally:
            context.detach(token)
    print(json.dumps(results), flush=True)


# ----------------------------------------------------------------- the two-process test


def test_customer_set_in_baggage_by_the_caller_bills_the_callees_usage(
    sandbox: Any, tmp_path: Path
) -> None:
    from conftest import API_KEY, wait_for

    script = str(Path(__file__).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PAYGENT_"))}
    callee = subprocess.Popen(
        [sys.executable, script, "callee", sandbox.url, API_KEY, str(tmp_path / "callee.spool")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout = callee.stdout
        assert stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        line = lines.get(timeout=30)
        assert line.startswith(CALLEE_READY), f"callee did not start: {line!r}"
        callee_url = line[len(CALLEE_READY) :].strip()
        caller = subprocess.run(
            [sys.executable, script, "caller", callee_url, "cust_edge_a", "cust_edge_b"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert caller.returncode == 0, caller.stderr
        answers = json.loads(caller.stdout)
    finally:
        callee.send_signal(signal.SIGTERM)
        callee.wait(timeout=30)
    assert callee.returncode == 0

    # The callee saw the caller's trace and baggage (the default propagators carried them).
    assert [a["sent_headers"] for a in answers] == [["Content-Type", "baggage", "traceparent"]] * 2
    assert [a["trace_id"] == a["caller_trace_id"] for a in answers] == [True, True]
    assert [a["identity"] for a in answers] == [
        {sc.CUSTOMER_ID: "cust_edge_a"},
        {sc.CUSTOMER_ID: "cust_edge_b"},
    ]
    # Billed to the caller's customers: spans (STT) and counters (TTS).
    rows = wait_for(lambda: sandbox.ledger.count() == 4 and sandbox.ledger.rows())
    billed = sorted(
        (r["customer_id"], r["agent_id"], r["kind"], r["audio_minutes"] or r["characters"])
        for r in rows
    )
    assert billed == [
        ("cust_edge_a", AGENT, "stt", 0.1),
        ("cust_edge_a", AGENT, "tts", 100),
        ("cust_edge_b", AGENT, "stt", 0.2),
        ("cust_edge_b", AGENT, "tts", 200),
    ]
    stt_traces = {
        r["customer_id"]: r["meta_tags"]["otel_trace_id"] for r in rows if r["kind"] == "stt"
    }
    assert stt_traces == {
        "cust_edge_a": answers[0]["caller_trace_id"],
        "cust_edge_b": answers[1]["caller_trace_id"],
    }


# ----------------------------------------------------------------- precedence and validation


def in_baggage(entries: dict[str, str]) -> context.Context:
    ctx = context.get_current()
    for key, value in entries.items():
        ctx = baggage.set_baggage(key, value, ctx)
    return ctx


def billed_customers(
    tracing: Callable[..., Any], sandbox: Any, spans: Callable[[Any], None], **kw: Any
) -> list[tuple[str, str]]:
    pipeline = tracing(
        resource=kw.pop("resource", {sc.AGENT_ID: AGENT}),
        trace_tags=False,
        **kw.pop("exporter", {}),
    )
    pipeline.provider.add_span_processor(PaygentBaggageSpanProcessor(**kw))
    spans(pipeline.tracer)
    pipeline.flush()
    return sorted((r["customer_id"], r["model"]) for r in sandbox.ledger.rows())


STT = {
    sc.USAGE_KIND: "stt",
    sc.PROVIDER: "deepgram",
    sc.STT_AUDIO_SECONDS: 30.0,
}


def test_precedence_record_over_span_over_baggage_over_resource_over_default(
    tracing: Any, sandbox: Any
) -> None:
    def spans(tracer: Any) -> None:
        token = context.attach(in_baggage({sc.CUSTOMER_ID: "cust_baggage"}))
        try:
            # baggage beats the resource and the exporter default
            tracer.start_span("from-baggage", attributes={**STT, sc.MODEL: "m1"}).end()
            # a span attribute given at start is never overwritten
            tracer.start_span(
                "span-start", attributes={**STT, sc.MODEL: "m2", sc.CUSTOMER_ID: "cust_span"}
            ).end()
            # a span attribute set later replaces the copied value
            with tracer.start_as_current_span("span-later") as span:
                span.set_attributes({**STT, sc.MODEL: "m3", sc.CUSTOMER_ID: "cust_later"})
            # a record (span event) beats its span
            with tracer.start_as_current_span("event") as span:
                span.add_event(
                    sc.USAGE_EVENT_NAME, {**STT, sc.MODEL: "m4", sc.CUSTOMER_ID: "cust_record"}
                )
        finally:
            context.detach(token)
        # no baggage: the resource
        tracer.start_span("resource", attributes={**STT, sc.MODEL: "m5"}).end()

    billed = billed_customers(
        tracing,
        sandbox,
        spans,
        resource={sc.AGENT_ID: AGENT, sc.CUSTOMER_ID: "cust_resource"},
        exporter={"customer_id": "cust_default"},
    )
    assert billed == [
        ("cust_baggage", "m1"),
        ("cust_later", "m3"),
        ("cust_record", "m4"),
        ("cust_resource", "m5"),
        ("cust_span", "m2"),
    ]


def test_only_identity_keys_are_taken_and_invalid_values_are_ignored(
    tracing: Any, sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = tracing(resource={sc.AGENT_ID: AGENT})
    pipeline.provider.add_span_processor(PaygentBaggageSpanProcessor())
    cases = {
        "overlong": "c" * (MAX_BAGGAGE_VALUE_LENGTH + 1),
        "control": "cust\x00evil",
        "blank": "   ",
    }
    spans = {}
    with caplog.at_level(logging.WARNING, logger="paygent_otel.baggage"):
        for name, value in cases.items():
            entries = {sc.CUSTOMER_ID: value, sc.PROVIDER: "evil", "paygent.meta.x": "y"}
            token = context.attach(in_baggage(entries))
            try:
                with pipeline.tracer.start_as_current_span(name) as span:
                    spans[name] = span
            finally:
                context.detach(token)
        token = context.attach(in_baggage({sc.CUSTOMER_ID: "  cust_ok  ", sc.PLAN: "pro"}))
        try:
            with pipeline.tracer.start_as_current_span("ok") as span:
                spans["ok"] = span
        finally:
            context.detach(token)
    assert {name: dict(span.attributes) for name, span in spans.items()} == {
        "overlong": {},
        "control": {},
        "blank": {},
        "ok": {sc.CUSTOMER_ID: "cust_ok", sc.PLAN: "pro"},
    }
    warnings = [m for m in caplog.messages if "ignoring baggage entry" in m]
    assert any("longer than 256" in m for m in warnings)
    assert any("control characters" in m for m in warnings)
    assert not any("cust\x00evil" in m or "c" * 257 in m for m in caplog.messages)


def test_identity_from_baggage_for_the_metric_helpers() -> None:
    ctx = in_baggage(
        {sc.CUSTOMER_ID: " cust_1 ", sc.AGENT_ID: "agent-1", sc.MODEL: "nope", "other": "x"}
    )
    assert identity_from_baggage(ctx) == {sc.AGENT_ID: "agent-1", sc.CUSTOMER_ID: "cust_1"}
    assert identity_from_baggage() == {}
    token = context.attach(ctx)
    try:
        assert identity_from_baggage()[sc.CUSTOMER_ID] == "cust_1"
    finally:
        context.detach(token)


def test_turned_off_by_the_environment_or_the_constructor(
    tracing: Any, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = in_baggage({sc.CUSTOMER_ID: "cust_baggage"})
    monkeypatch.setenv(OTEL_EXPORTER_PAYGENT_BAGGAGE, "false")
    assert identity_from_baggage(ctx) == {}
    assert not PaygentBaggageSpanProcessor().enabled
    assert PaygentBaggageSpanProcessor(enabled=True).enabled
    monkeypatch.delenv(OTEL_EXPORTER_PAYGENT_BAGGAGE)
    assert identity_from_baggage(ctx) == {sc.CUSTOMER_ID: "cust_baggage"}

    def spans(tracer: Any) -> None:
        tracer.start_span("off", context=ctx, attributes={**STT, sc.MODEL: "m"}).end()

    # Off: the baggage customer is not used, the exporter default is.
    billed = billed_customers(
        tracing, sandbox, spans, enabled=False, exporter={"customer_id": "cust_default"}
    )
    assert billed == [("cust_default", "m")]


def test_keys_can_be_narrowed_but_not_widened() -> None:
    processor = PaygentBaggageSpanProcessor(keys=(sc.CUSTOMER_ID,))
    assert "paygent.customer.id" in repr(processor)
    with pytest.raises(ValueError, match="not identity keys"):
        PaygentBaggageSpanProcessor(keys=(sc.PROVIDER,))


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    if role == "callee":
        run_callee(*arguments)
    else:
        run_caller(arguments[0], arguments[1:])
