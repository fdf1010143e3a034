"""Settings declared once: the table, its docs, units, strict booleans, what bad values do."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import API_KEY
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paygent_otel import PaygentSpanExporter, record_stt
from paygent_otel._cli.main import _build_parser
from paygent_otel.delivery import config as config_module
from paygent_otel.delivery.config import SETTINGS, ExporterConfig, ExporterSettings, flag_values
from paygent_otel.delivery.config_doc import BEGIN_MARKER, END_MARKER, render_table
from paygent_otel.delivery.units import parse_duration, parse_size
from paygent_otel.recording.baggage import baggage_enabled

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def fresh_warnings() -> None:
    """Each bad value is warned about once per process; every test starts afresh."""
    config_module._warned.clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------- one table


def test_doc_table_is_the_generated_one() -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER)
    assert text[start:end] == render_table(), (
        "docs/configuration.md is stale: paste `python -m paygent_otel.delivery.config_doc`"
    )


def test_table_fields_and_arguments_are_the_same_settings() -> None:
    table = {s.name for s in SETTINGS if s.name}
    config_fields = {f.name for f in fields(ExporterConfig)} - {"delivery_blocked"}
    arguments = set(typing.get_type_hints(ExporterSettings))
    assert table == config_fields == arguments


def test_every_environment_variable_is_read_in_the_config_module_only() -> None:
    readers = []
    for path in (ROOT / "paygent_otel").rglob("*.py"):
        if path == ROOT / "paygent_otel" / "delivery" / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == [], "read environment variables through paygent_otel.delivery.config"
    # ... and each variable it defines is a row of the table (XDG_STATE_HOME is not ours).
    defined = {
        value
        for name, value in vars(config_module).items()
        if isinstance(value, str) and name == value and name.isupper()
    }
    assert defined - {s.env for s in SETTINGS} == {"XDG_STATE_HOME"}


def test_old_import_names_still_work() -> None:
    from paygent_otel._cli.serve import PAYGENT_BRIDGE_TOKEN
    from paygent_otel.bridge.config import DEFAULT_FLUSH_TIMEOUT
    from paygent_otel.exporters.base import ExporterSettings as from_exporter
    from paygent_otel.recording.baggage import OTEL_EXPORTER_PAYGENT_BAGGAGE

    assert from_exporter is ExporterSettings
    assert (OTEL_EXPORTER_PAYGENT_BAGGAGE, PAYGENT_BRIDGE_TOKEN) == (
        "OTEL_EXPORTER_PAYGENT_BAGGAGE",
        "PAYGENT_BRIDGE_TOKEN",
    )
    assert DEFAULT_FLUSH_TIMEOUT == 10.0


# ----------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("1m30s", 90.0), ("10", 10.0), (" 2 s ", 2.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_bare_duration_takes_the_given_unit() -> None:
    assert parse_duration("250", bare_unit="ms") == 0.25


@pytest.mark.parametrize("text", ["soon", "-5s", "5x", "", "1e3", "nan", "s"])
def test_bad_durations_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=f"{text!r} is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 << 20), ("1GiB", 1 << 30), ("512KB", 512_000), ("1000", 1000), ("2 kib", 2048)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1e3", "big", "0.5B"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_size(text)


# ----------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "500ms", "timeout", 0.5),
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "2.5", "timeout", 2.5),
        ("OTEL_EXPORTER_PAYGENT_TRACES_TIMEOUT", "1m", "timeout", 60.0),
        ("OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES", "64MiB", "spool_max_bytes", 64 << 20),
        ("OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS", "5m", "max_retry_seconds", 300.0),
        ("OTEL_EXPORTER_PAYGENT_MAX_RETRY_SECONDS", "0", "max_retry_seconds", None),
        ("OTEL_EXPORTER_PAYGENT_FLUSH_TIMEOUT", "1500ms", "flush_timeout", 1.5),
        ("OTEL_EXPORTER_PAYGENT_GENAI", "ON", "genai", True),
        ("OTEL_EXPORTER_PAYGENT_TRACE_TAGS", "0", "trace_tags", False),
        ("OTEL_EXPORTER_PAYGENT_HEADERS", "x-a=1, x-b=2", "headers", {"x-a": "1", "x-b": "2"}),
    ],
)
def test_environment_values_with_units(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(name, value)
    # In memory mode the retry limit defaults to 300 s: "0" must still mean never.
    config = ExporterConfig.resolve("traces", spool_path=":memory:")
    assert getattr(config, field) == expected


def test_the_signal_variable_wins_over_the_generic_one_for_its_signal_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TIMEOUT", "3s")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_METRICS_TIMEOUT", "7s")
    assert ExporterConfig.resolve("metrics").timeout == 7.0
    assert ExporterConfig.resolve("traces").timeout == 3.0
    assert ExporterConfig.resolve(None).timeout == 3.0  # the bridge: generic only


@pytest.mark.parametrize(
    ("name", "value", "field", "default", "says"),
    [
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "10000", "timeout", 10.0, "did you mean 10000ms?"),
        ("OTEL_EXPORTER_PAYGENT_TIMEOUT", "soon", "timeout", 10.0, "is not a duration"),
        ("OTEL_EXPORTER_PAYGENT_GENAI", "ture", "genai", False, "must be true or false"),
        ("OTEL_EXPORTER_PAYGENT_TRACE_TAGS", "nope", "trace_tags", True, "must be true or false"),
        ("OTEL_EXPORTER_PAYGENT_SPOOL_MAX_BYTES", "lots", "spool_max_bytes", 1 << 30, "size"),
        ("OTEL_EXPORTER_PAYGENT_MAX_IN_FLIGHT", "2.5", "max_in_flight", 128, "whole number"),
        ("OTEL_EXPORTER_PAYGENT_HEADERS", "x-a", "headers", {}, "not name=value"),
    ],
)
def test_a_bad_environment_value_warns_naming_it_and_keeps_the_default(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: str,
    field: str,
    default: object,
    says: str,
) -> None:
    monkeypatch.setenv(name, value)
    config = ExporterConfig.resolve("traces")
    assert getattr(config, field) == default
    assert config.delivery_blocked is None
    assert [m for m in warnings_of(caplog) if name in m and repr(value) in m and says in m]


def test_a_boolean_typo_in_the_baggage_switch_warns_and_keeps_it_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_BAGGAGE", "ture")
    assert baggage_enabled() is True
    assert baggage_enabled() is True
    said = [m for m in warnings_of(caplog) if "OTEL_EXPORTER_PAYGENT_BAGGAGE='ture'" in m]
    assert len(said) == 1  # once, not at every metric helper call
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_BAGGAGE", "off")
    assert baggage_enabled() is False


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("cp-api.withpaygent.com", "must start with http:// or https://"),
        ("ftp://paygent.example", "must start with http:// or https://"),
        ("http://", "has no host name"),
        ("http://127.0.0.1:8787/api/v2/usage", "leave out /api/v2/usage"),
        ("http://127.0.0.1:port", "bad port"),
    ],
)
def test_a_bad_endpoint_variable_blocks_delivery_and_never_falls_back(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TRACES_ENDPOINT", value)
    config = ExporterConfig.resolve("traces")
    assert config.delivery_blocked is not None
    assert "OTEL_EXPORTER_PAYGENT_TRACES_ENDPOINT" in config.delivery_blocked
    assert says in config.delivery_blocked
    assert config.endpoint != config_module.DEFAULT_ENDPOINT  # records filed as written


def test_a_bad_api_key_variable_blocks_delivery_without_showing_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PAYGENT_API_KEY", f"{API_KEY} {API_KEY}")
    config = ExporterConfig.resolve("traces")
    assert config.api_key is None
    assert config.delivery_blocked is not None
    assert "PAYGENT_API_KEY" in config.delivery_blocked
    assert "HTTP header" in config.delivery_blocked
    assert API_KEY not in config.delivery_blocked + repr(config) + caplog.text


def test_tls_files_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_CERTIFICATE", str(bundle))
    config = ExporterConfig.resolve("traces")
    assert (config.certificate, config.delivery_blocked) == (str(bundle), None)

    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_CERTIFICATE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_CLIENT_KEY", str(bundle))
    blocked = ExporterConfig.resolve("traces").delivery_blocked
    assert blocked is not None
    assert "OTEL_EXPORTER_PAYGENT_CERTIFICATE" in blocked and "no such file" in blocked
    assert "OTEL_EXPORTER_PAYGENT_CLIENT_KEY: a client key without a client certificate" in (
        blocked
    )


# ----------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("argument", "value", "says"),
    [
        ("timeout", 10000, "did you mean 10000ms?"),
        ("timeout", "10000", "did you mean 10000ms?"),
        ("timeout", 0, "must be more than 0"),
        ("timeout", float("nan"), "finite"),
        ("max_in_flight", 0, "at least 1"),
        ("spool_max_bytes", "lots", "is not a size"),
        ("endpoint", "paygent.example", "must start with http"),
        ("endpoint", "https://cp-api.withpaygent.com/api/v2/usage/", "leave out /api/v2/usage"),
        ("genai", "ture", "must be true or false"),
        ("headers", {"bad header": "x"}, "not a valid header name"),
        ("certificate", "/nonexistent/ca.pem", "no such file"),
        ("client_key", __file__, "a client key without a client certificate"),
    ],
)
def test_a_bad_argument_raises_when_the_exporter_is_built(
    argument: str, value: object, says: str
) -> None:
    settings: dict[str, object] = {argument: value, "spool_path": ":memory:"}
    with pytest.raises(ValueError, match=f"{argument}.*{says}"):
        PaygentSpanExporter(**settings)  # type: ignore[arg-type]


def test_arguments_take_units_and_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TIMEOUT", "3s")
    config = ExporterConfig.resolve(
        "traces", timeout="750ms", spool_max_bytes="64MiB", max_retry_seconds="1h"
    )
    assert (config.timeout, config.spool_max_bytes, config.max_retry_seconds) == (
        0.75,
        64 << 20,
        3600.0,
    )


# ----------------------------------------------------------------- flush timeout


def test_flush_timeout_bounds_the_wait_at_exit(tmp_path: Path) -> None:
    """The SDK's processor gives the exporter 30 s at shutdown; flush_timeout caps it."""
    provider = TracerProvider()
    exporter = PaygentSpanExporter(
        endpoint="http://127.0.0.1:9",  # discard port: nothing listens, every attempt fails
        api_key=API_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        flush_timeout="300ms",
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("transcribe"):
        record_stt("agent", "cust", "", {"serviceProvider": "p", "model": "m", "audioDuration": 1})
    started = time.monotonic()
    provider.shutdown()
    assert time.monotonic() - started < 5.0
    assert exporter.pipeline.spool.durable


# ----------------------------------------------------------------- flags


def test_duration_and_size_flags_take_units() -> None:
    args = _build_parser().parse_args(
        ["serve", "--flush-timeout", "30s", "--graceful-timeout", "1m", "--timeout", "500ms",
         "--max-retry", "6h", "--spool-max-bytes", "64MiB", "--max-request-bytes", "8MiB"]
    )  # fmt: skip
    assert (args.flush_timeout, args.graceful_timeout, args.timeout, args.max_retry_seconds) == (
        30.0,
        60,
        0.5,
        21600.0,
    )
    assert (args.spool_max_bytes, args.max_request_bytes) == (64 << 20, 8 << 20)
    # What `serve` builds its delivery from: flags first, then the variables, then defaults.
    resolved = ExporterConfig.resolve(None, **flag_values(args))
    assert (resolved.flush_timeout, resolved.timeout, resolved.max_retry_seconds) == (
        30.0,
        0.5,
        21600.0,
    )
    assert resolved.endpoint == config_module.DEFAULT_ENDPOINT  # no flag: the default
    sandbox = _build_parser().parse_args(["sandbox", "--latency-ms", "0.2s", "--retry-after", "1m"])
    assert (sandbox.latency_ms, sandbox.retry_after) == (200.0, 60)
    assert _build_parser().parse_args(["sandbox", "--latency-ms", "150"]).latency_ms == 150.0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--flush-timeout", "soon"], "argument --flush-timeout: 'soon' is not a duration"),
        (["--timeout", "10000"], "argument --timeout: '10000': a bare timeout"),
        (["--endpoint", "localhost:8787"], "argument --endpoint: 'localhost:8787': must start"),
        (["--max-request-bytes", "8 megs"], "argument --max-request-bytes: '8 megs' is not a"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(argv: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", "serve", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PAYGENT_API_KEY": API_KEY},
    )
    assert done.returncode == 2
    assert says in done.stderr
