"""Fixtures for the framework tests: the real Pipecat and LiveKit Agents, run offline.

These tests need ``pipecat-ai`` and ``livekit-agents`` (``make test-frameworks`` installs
them in ``.venv-frameworks`` from the ``frameworks-test`` extra); elsewhere they are
skipped. Pipecat's tracers come from the *global* tracer provider, which a process can set
once: :data:`SWITCH` is that provider's only processor and forwards to the processors of
the running test.

- ``billing`` fixture: a factory ``billing(**exporter_kwargs) -> Billing`` wiring a
  :class:`ConversationIdentityProcessor`, an ``InMemorySpanExporter`` (what the framework
  put on its spans) and a ``BatchSpanProcessor(PaygentSpanExporter(...))`` aimed at the
  ``sandbox`` fixture into :data:`SWITCH` (``Billing.processors`` can join another provider).
- :data:`METRICS`: the reader of the global meter provider (delta temporality).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipecat", reason="needs pipecat-ai (make test-frameworks)")
pytest.importorskip("livekit.agents", reason="needs livekit-agents (make test-frameworks)")

from conftest import API_KEY
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paygent_otel import ConversationIdentityProcessor, PaygentSpanExporter
from paygent_otel.exporters.metric import USAGE_TEMPORALITY
from paygent_otel.sandbox import SandboxServer


class Switch(SpanProcessor):
    """Forwards to the processors of the test that runs now (none between tests)."""

    def __init__(self) -> None:
        self.processors: list[SpanProcessor] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for processor in self.processors:
            processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


SWITCH = Switch()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SWITCH)
trace.set_tracer_provider(PROVIDER)

METRICS = InMemoryMetricReader(preferred_temporality=dict(USAGE_TEMPORALITY))
"""The global meter provider's reader (LiveKit's counters are created at import, on the
global provider); tests hand what it collects to a PaygentMetricExporter."""
metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))


@dataclass
class Billing:
    """One test's span pipeline: identity, the framework's own spans, and Paygent."""

    exporter: PaygentSpanExporter
    spans: InMemorySpanExporter
    identity: ConversationIdentityProcessor
    processors: list[SpanProcessor] = field(default_factory=list)

    def flush(self) -> None:
        """Export every ended span and wait until its records are delivered."""
        assert SWITCH.force_flush(10_000)
        assert self.exporter.force_flush(10_000), self.exporter.stats

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def billing(sandbox: SandboxServer, tmp_path: Path) -> Iterator[Callable[..., Billing]]:
    built: list[Billing] = []

    def build(**exporter_kwargs: Any) -> Billing:
        exporter_kwargs.setdefault("endpoint", sandbox.url)
        exporter_kwargs.setdefault("api_key", API_KEY)
        exporter_kwargs.setdefault("agent_id", "voice-bot")
        exporter_kwargs.setdefault("spool_path", tmp_path / f"spool-{len(built)}.sqlite3")
        exporter = PaygentSpanExporter(**exporter_kwargs)
        spans = InMemorySpanExporter()
        identity = ConversationIdentityProcessor()
        result = Billing(exporter, spans, identity)
        result.processors = [identity, SimpleSpanProcessor(spans), BatchSpanProcessor(exporter)]
        SWITCH.processors = result.processors
        built.append(result)
        return result

    yield build
    SWITCH.processors = []
    for result in built:
        for processor in result.processors:
            processor.shutdown()
