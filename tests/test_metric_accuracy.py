"""The metric route bills exactly what was recorded, to the last unit.

Real SDK counters (through ``UsageInstruments`` and the raw counters), a real
``PeriodicExportingMetricReader`` whose intervals are forced with ``reader.collect()``, a
SQLite spool, and the sandbox's ledger as the judge.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from paygent_otel.convention import semconv as sc
from paygent_otel.exporters.metric import PaygentMetricExporter
from paygent_otel.recording.instruments import UsageInstruments
from paygent_otel.sandbox import SandboxServer

INCREMENTS = 102_000
INTERVALS = 6
CUSTOMERS = [f"cust-{i:02d}" for i in range(50)]
MODELS = {
    "stt": [("deepgram", "nova-2"), ("deepgram", "nova-3"), ("assemblyai", "universal")],
    "tts": [("elevenlabs", "turbo-v2"), ("elevenlabs", "multilingual-v2"), ("openai", "tts-1")],
    "sts": [("openai", "gpt-realtime"), ("google", "gemini-live")],
}
RELATIVE = 1e-9


Metered = tuple[
    SandboxServer, PaygentMetricExporter, PeriodicExportingMetricReader, UsageInstruments
]


@pytest.fixture
def metered(tmp_path: Path, sandbox: SandboxServer) -> Iterator[Metered]:
    exporter = PaygentMetricExporter(
        endpoint=sandbox.url,
        api_key=API_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        max_in_flight=64,
        meter_provider=NoOpMeterProvider(),
    )
    # An hour-long interval: only the test's collect() calls end an interval.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({sc.AGENT_ID: "agent-accuracy", "service.name": "acc"}),
    )
    yield sandbox, exporter, reader, UsageInstruments(provider.get_meter("accuracy"))
    provider.shutdown()


class Expected:
    """What was recorded, per (customer, kind, model): exact ints, minutes as terms."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self.minutes: dict[tuple[str, str, str], list[float]] = defaultdict(list)

    def total_minutes(self, group: tuple[str, str, str]) -> float:
        return math.fsum(self.minutes[group])


def _record_one(
    rng: random.Random, usage: UsageInstruments, expected: Expected
) -> tuple[str, str, str, str]:
    customer = rng.choice(CUSTOMERS)
    kind = rng.choice(("stt", "tts", "sts"))
    provider, model = rng.choice(MODELS[kind])
    who: dict[str, Any] = {"customer_id": customer, "provider": provider, "model": model}
    attributes = {sc.CUSTOMER_ID: customer, sc.PROVIDER: provider, sc.MODEL: model}
    group = (customer, kind, model)
    raw = rng.random() < 0.1  # one in ten through the raw counters, same attribute set
    if kind == "stt":
        if rng.random() < 0.5:
            seconds = rng.uniform(0.01, 9.0)
            if raw:
                usage.counters[sc.STT_AUDIO_SECONDS].add(seconds, attributes)
            else:
                assert usage.add_stt(seconds=seconds, **who)
            expected.minutes[group].append(seconds / 60.0)
        else:
            minutes = rng.uniform(0.0001, 0.2)
            if raw:
                usage.counters[sc.STT_AUDIO_MINUTES].add(minutes, attributes)
            else:
                assert usage.add_stt(minutes=minutes, **who)
            expected.minutes[group].append(minutes)
    elif kind == "tts":
        characters = rng.randint(1, 800)
        if raw:
            usage.counters[sc.TTS_CHARACTERS].add(characters, attributes)
        else:
            assert usage.add_tts(characters=characters, **who)
        expected.counts[group] += characters
    else:
        tokens = {
            "input_text_tokens": rng.randint(0, 300),
            "input_audio_tokens": rng.randint(1, 2000),
            "output_audio_tokens": rng.randint(1, 3000),
            "cached_text_tokens": rng.randint(0, 50),
        }
        seconds = rng.uniform(0.1, 30.0)
        if raw:
            usage.counters[sc.STS_OUTPUT_AUDIO_TOKENS].add(
                tokens["output_audio_tokens"], attributes
            )
            usage.counters[sc.STS_INPUT_AUDIO_SECONDS].add(seconds, attributes)
            tokens = {"output_audio_tokens": tokens["output_audio_tokens"]}
        else:
            assert usage.add_sts(input_audio_seconds=seconds, **tokens, **who)
        expected.counts[group] += sum(tokens.values())
        expected.minutes[group].append(seconds / 60.0)
    return customer, kind, provider, model


def test_ledger_totals_equal_recorded_sums_across_intervals(metered: Metered) -> None:
    sandbox, exporter, reader, usage = metered
    rng = random.Random(20240611)
    expected = Expected()
    identity_sets_per_interval: list[int] = []
    per_interval = INCREMENTS // INTERVALS
    for _ in range(INTERVALS):
        identities = {_record_one(rng, usage, expected) for _ in range(per_interval)}
        identity_sets_per_interval.append(len(identities))
        reader.collect()  # end of one export interval; delivery proceeds in the background
    assert exporter.force_flush(timeout_millis=60_000)

    totals = {
        (row["customer_id"], row["kind"], row["model"]): row
        for row in sandbox.ledger.totals(by=("customer_id", "kind", "model"))
    }
    assert set(totals) == set(expected.counts) | set(expected.minutes)
    assert len({customer for customer, _, _ in totals}) == 50
    for group, row in totals.items():
        kind = group[1]
        if kind == "tts":
            assert row["characters"] == expected.counts[group], group
        elif kind == "stt":
            assert row["audio_minutes"] == pytest.approx(
                expected.total_minutes(group), rel=RELATIVE
            ), group
        else:
            assert row["sts_tokens"] == expected.counts[group], group
            assert row["sts_minutes"] == pytest.approx(
                expected.total_minutes(group), rel=RELATIVE
            ), group

    calls = sandbox.ledger.count()
    # One call per identity set per interval, never one per modality or per increment.
    assert calls <= sum(identity_sets_per_interval)
    assert calls == sum(identity_sets_per_interval)
    assert exporter.stats == {"accepted": calls, "delivered": calls}
    assert sandbox.ledger.duplicate_count() == 0


def test_minutes_from_many_small_increments_do_not_drift(metered: Metered) -> None:
    sandbox, exporter, reader, usage = metered
    rng = random.Random(7)
    increments = [0.1] * 50_000 + [rng.uniform(1e-6, 0.5) for _ in range(50_000)]
    rng.shuffle(increments)
    who = {"customer_id": "cust-drift", "provider": "deepgram", "model": "nova-2"}
    for start in range(0, len(increments), 25_000):
        for seconds in increments[start : start + 25_000]:
            assert usage.add_stt(seconds=seconds, **who)
        reader.collect()
    assert exporter.force_flush(timeout_millis=30_000)

    (row,) = sandbox.ledger.totals(by=("customer_id",))
    recorded = math.fsum(increments) / 60.0
    assert row["calls"] == 4
    assert abs(row["audio_minutes"] - recorded) <= RELATIVE * recorded
