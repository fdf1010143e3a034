"""Zero-code: ``OTEL_TRACES_EXPORTER=otlp,paygent opentelemetry-instrument python app.py``.

A real ``opentelemetry-instrument`` run in a subprocess: the SDK finds the exporter through
the ``opentelemetry_traces_exporter`` entry point and builds it with no arguments, so it
configures itself from the environment. The OTLP exporter beside it posts to a tiny local
capture server (a closed port would cost its retries at exit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import API_KEY

from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer

INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"

APP = """
from opentelemetry import trace
from paygent_otel import record_stt, record_tts

tracer = trace.get_tracer("voice-app")
with tracer.start_as_current_span("turn"):
    stt = record_stt(
        customer_id="cust_8812",
        indicator="voice-minutes",
        stt_usage_data={"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 0.45},
    )
    tts = record_tts(
        customer_id="cust_8812",
        indicator="voice-characters",
        service_provider="elevenlabs",
        model="eleven_turbo_v2_5",
        characters=1200,
    )
print("recorded", stt, tts, flush=True)
"""


class _Capture(BaseHTTPRequestHandler):
    """Answers OTLP/HTTP exports with 200 and an empty (valid) protobuf response."""

    paths: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def otlp_capture() -> Iterator[tuple[str, list[str]]]:
    """(endpoint, paths posted) of a loopback OTLP/HTTP receiver."""
    paths: list[str] = []
    handler = type("Capture", (_Capture,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def run_app(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    app = tmp_path / "app.py"
    app.write_text(APP)
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "OTEL_SERVICE_NAME": "voice-app",
        "OTEL_RESOURCE_ATTRIBUTES": "paygent.agent.id=voice-bot",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_PAYGENT_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
    }
    return subprocess.run(
        [str(INSTRUMENT), sys.executable, str(app)],
        env={**base, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def billed(sandbox: SandboxServer) -> list[tuple[str, str, str, str]]:
    return sorted(
        (r["agent_id"], r["customer_id"], r["kind"], r["provider"]) for r in sandbox.ledger.rows()
    )


EXPECTED = [
    ("voice-bot", "cust_8812", "stt", "deepgram"),
    ("voice-bot", "cust_8812", "tts", "elevenlabs"),
]


def test_otlp_and_paygent_side_by_side_with_no_code_change(
    sandbox: SandboxServer, otlp_capture: tuple[str, list[str]], tmp_path: Path
) -> None:
    endpoint, otlp_paths = otlp_capture
    result = run_app(
        tmp_path,
        {
            "OTEL_TRACES_EXPORTER": "otlp,paygent",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_PAYGENT_ENDPOINT": sandbox.url,
            "PAYGENT_API_KEY": API_KEY,
        },
    )
    assert result.returncode == 0, result.stderr
    assert "recorded True True" in result.stdout
    # Delivered before the process exited (the provider's atexit shutdown), agent id from
    # the resource, each with its idempotency key.
    assert billed(sandbox) == EXPECTED
    assert all(sandbox.ledger.keys())
    assert "/v1/traces" in otlp_paths  # the OTLP exporter ran alongside
    assert API_KEY not in result.stderr + result.stdout


def test_paygent_alone(sandbox: SandboxServer, tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        {
            "OTEL_TRACES_EXPORTER": "paygent",
            "OTEL_EXPORTER_PAYGENT_ENDPOINT": sandbox.url,
            "PAYGENT_API_KEY": API_KEY,
        },
    )
    assert result.returncode == 0, result.stderr
    assert billed(sandbox) == EXPECTED


def test_a_missing_api_key_is_reported_once_and_the_app_runs_on(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    result = run_app(
        tmp_path,
        {"OTEL_TRACES_EXPORTER": "paygent", "OTEL_EXPORTER_PAYGENT_ENDPOINT": sandbox.url},
    )
    assert result.returncode == 0, result.stderr
    assert "recorded True True" in result.stdout
    # Said once at start, and once at exit with what stays undelivered because of it.
    assert result.stderr.count("nothing is sent to") == 1, result.stderr
    assert result.stderr.count("no Paygent API key (set PAYGENT_API_KEY)") == 2, result.stderr
    assert "2 usage records were not delivered" in result.stderr
    # Not a stream of 401s: nothing was sent, and the usage waits in the spool.
    assert sandbox.ledger.request_log() == []
    spool = SqliteSpool(tmp_path / "spool.sqlite3", max_bytes=1 << 20)
    try:
        assert spool.pending() == 2
    finally:
        spool.close()
