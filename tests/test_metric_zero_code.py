"""Zero-code: ``OTEL_METRICS_EXPORTER=paygent opentelemetry-instrument python app.py``.

A real ``opentelemetry-instrument`` run in a subprocess, configured only through the
environment, fills the sandbox ledger; the app exits in the middle of an interval and the
exit-time shutdown still exports that partial interval.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paygent_otel.sandbox import SandboxServer

APP = textwrap.dedent(
    """
    from opentelemetry import metrics

    from paygent_otel import UsageInstruments

    usage = UsageInstruments(metrics.get_meter("zero-code-app"))


    def batch():
        for i in range(ROUNDS):
            customer = f"cust-{i % 3}"
            usage.add_stt(seconds=1.5, customer_id=customer, provider="deepgram", model="nova-2")
            usage.add_tts(characters=7, customer_id=customer, provider="elevenlabs", model="turbo")
            usage.add_sts(input_audio_tokens=10, output_audio_tokens=20, customer_id=customer,
                          provider="openai", model="gpt-realtime")


    batch()
    metrics.get_meter_provider().force_flush()  # one interval ends here for certain
    batch()
    # No flush, no shutdown: the process ends mid-interval and the SDK's exit handler
    # must export the partial interval.
    """
)
ROUNDS = 300


def test_opentelemetry_instrument_with_the_paygent_metrics_exporter_fills_the_ledger(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP.replace("ROUNDS", str(ROUNDS)))
    venv_bin = Path(sys.executable).parent
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "PAYGENT_"))
    }
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        OTEL_METRICS_EXPORTER="paygent",
        OTEL_TRACES_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_SERVICE_NAME="zero-code",
        OTEL_RESOURCE_ATTRIBUTES="paygent.agent.id=zero-code-agent",
        # Read by the OTLP exporters only; must not turn the Paygent reader cumulative.
        OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="cumulative",
        PAYGENT_API_KEY="zero-code-key",
        PAYGENT_INDICATOR="voice",
        OTEL_EXPORTER_PAYGENT_ENDPOINT=sandbox.url,
        OTEL_EXPORTER_PAYGENT_METRICS_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )
    result = subprocess.run(
        [str(venv_bin / "opentelemetry-instrument"), "python", str(app)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "paygent" not in result.stderr.lower(), result.stderr  # no warning, no error

    per_customer = {f"cust-{c}": sum(1 for i in range(ROUNDS) if i % 3 == c) * 2 for c in range(3)}
    totals = {
        (row["customer_id"], row["kind"]): row
        for row in sandbox.ledger.totals(by=("customer_id", "kind"))
    }
    assert set(totals) == {(c, k) for c in per_customer for k in ("stt", "tts", "sts")}
    for customer, calls in per_customer.items():
        assert totals[customer, "stt"]["audio_minutes"] == pytest.approx(calls * 1.5 / 60, rel=1e-9)
        assert totals[customer, "tts"]["characters"] == calls * 7
        assert totals[customer, "sts"]["sts_tokens"] == calls * 30
    rows = sandbox.ledger.rows()
    assert {(r["agent_id"], r["indicator"]) for r in rows} == {("zero-code-agent", "voice")}
    # At least the forced interval and the partial one at exit: several calls per identity.
    assert len(rows) >= 2 * len(totals)
    assert sandbox.ledger.duplicate_count() == 0
