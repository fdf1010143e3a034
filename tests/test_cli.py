"""The command line's habits: version, help, -v anywhere, units, human times, --json/--csv,
errors without tracebacks, progress on long work, and the sandbox ledger's views."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, wait_for

from paygent_otel._cli.main import main
from paygent_otel._version import __version__
from paygent_otel.bridge import BridgeApp, BridgeConfig
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery import reporting as _reporting
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.spool import SqliteSpool, destination_id
from paygent_otel.delivery.units import parse_duration, parse_instant, parse_size
from paygent_otel.sandbox import SandboxServer
from paygent_otel.sandbox.app import validate_usage
from paygent_otel.sandbox.ledger import LedgerWriter

# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h30m", 5400.0), ("1.5", 1.5),
     ("2 min", 120.0), ("250us", 0.00025), ("1d", 86400.0), (".5s", 0.5)],
)  # fmt: skip
def test_durations_take_units_and_a_bare_number_keeps_its_old_unit(
    text: str, seconds: float
) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_a_bare_duration_is_in_the_unit_the_option_always_had() -> None:
    assert parse_duration("250", bare_unit="ms") == pytest.approx(0.25)
    assert parse_duration("2s", bare_unit="ms") == 2.0


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1s", "1h30", "s", "1e400s", "nan"])
def test_a_bad_duration_is_an_error_naming_the_text_and_the_units(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 << 20), ("1GB", 10**9), ("512k", 512_000), ("1048576", 1 << 20),
     ("1.5GiB", 3 << 29), ("10 kib", 10240)],
)  # fmt: skip
def test_sizes_take_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "12 parsecs", "1..2GB"])
def test_a_bad_size_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_instants_are_iso_times_or_durations_ago() -> None:
    now = 1_790_000_000.0
    assert parse_instant("2h", now=now) == now - 7200
    assert parse_instant("2026-11-30", now=now) == datetime(2026, 11, 30, tzinfo=UTC).timestamp()
    assert (
        parse_instant("2026-11-30T14:00+01:00", now=now)
        == datetime(2026, 11, 30, 13, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValueError, match="neither a time"):
        parse_instant("yesterday", now=now)


def test_flags_take_units(capsys: pytest.CaptureFixture[str]) -> None:
    from paygent_otel._cli.main import _build_parser

    args = _build_parser().parse_args(
        ["serve", "--flush-timeout", "2m", "--spool-max-bytes", "64MiB", "--graceful-timeout",
         "1m", "--max-request-bytes", "1MiB"]
    )  # fmt: skip
    assert (args.flush_timeout, args.spool_max_bytes) == (120.0, 64 << 20)
    assert (args.graceful_timeout, args.max_request_bytes) == (60, 1 << 20)
    args = _build_parser().parse_args(["sandbox", "--latency-ms", "2s", "--retry-after", "1m"])
    assert (args.latency_ms, args.retry_after) == (2000.0, 60)
    assert _build_parser().parse_args(["sandbox", "--latency-ms", "250"]).latency_ms == 250.0
    with pytest.raises(SystemExit) as exit_info:
        _build_parser().parse_args(["serve", "--flush-timeout", "soon"])
    assert exit_info.value.code == 2
    assert "'soon' is not a duration" in capsys.readouterr().err


# ---------------------------------------------------------------- version, help, -v


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"paygent-otel {__version__}"


def test_a_bare_command_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: paygent-otel") and "demo" in out and "spool" in out
    assert main(["spool"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: paygent-otel spool")
    assert all(word in out for word in ("status", "dead", "retry", "purge", "audit"))


def spool_with_dead_letters(path: Path, count: int = 3) -> None:
    spool = SqliteSpool(path, max_bytes=1 << 30)
    dest = destination_id("http://127.0.0.1:9")
    spool.add(dest, [record(i) for i in range(count)])
    leased = spool.lease(dest, count, time.time())
    spool.dead_letter([(i.rowid, "400", '{"error":"no"}') for i in leased], time.time())
    spool.close()


@pytest.fixture
def dead_spool(tmp_path: Path) -> Path:
    """``tmp_path / "spool.sqlite3"`` holding three dead letters."""
    path = tmp_path / "spool.sqlite3"
    spool_with_dead_letters(path)
    return path


def record(i: int, customer: str = "cust-1", seconds: float = 60.0) -> UsageRecord:
    payload = {
        "agentId": "agent-voice", "customerId": customer, "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": seconds / 60},
    }  # fmt: skip
    origin = f"cli stream s interval {1_790_000_000_000_000_000 + i}..1790000060000000000"
    return UsageRecord(f"key-{customer}-{i:04d}", payload, origin)


def test_verbose_works_before_and_after_the_command(
    dead_spool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dead_spool
    assert main(["-v", "spool", "status", "--spool", str(path)]) == 0
    assert main(["spool", "status", "--spool", str(path), "-v"]) == 0
    assert main(["spool", "-v", "dead", "--spool", str(path)]) == 0
    assert "3 dead letters" in capsys.readouterr().out


def run_cli(
    *argv: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", *argv],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )  # fmt: skip


def test_errors_are_one_line_and_the_traceback_only_under_verbose(
    tmp_path: Path, dead_spool: Path
) -> None:
    spool = dead_spool
    not_a_ledger = run_cli("ledger", "--db", str(spool))
    assert not_a_ledger.returncode == 1
    assert "is not a sandbox ledger" in not_a_ledger.stderr
    assert "looks like a spool: see `paygent-otel spool status" in not_a_ledger.stderr
    assert "Traceback" not in not_a_ledger.stderr and "-v for the traceback" in not_a_ledger.stderr
    verbose = run_cli("ledger", "--db", str(spool), "-v")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr

    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database at all, just some words\n" * 200)
    assert "is not a sandbox ledger" in run_cli("ledger", "--db", str(garbage)).stderr

    no_folder = run_cli("sandbox", "--db", str(tmp_path / "nodir" / "x.sqlite3"), "--port", "0")
    assert no_folder.returncode == 1
    assert f"the folder {tmp_path / 'nodir'} does not exist" in no_folder.stderr
    assert "Traceback" not in no_folder.stderr


def test_the_demo_creates_its_workdir_and_a_second_run_does_not_double_the_totals(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "missing" / "dir"
    first = run_cli("demo", "--workdir", str(workdir))
    assert first.returncode == 0, first.stderr
    second = run_cli("demo", "--workdir", str(workdir))
    assert second.returncode == 0, second.stderr
    assert "replaced the files of an earlier demo run" in second.stdout
    assert "reconciled (paygent-otel reconcile): 141 records recorded, BALANCED" in second.stdout

    def billed(out: str) -> str:
        billed_part = out.split("Billed (the sandbox ledger)")[1]
        return billed_part.split("idempotent repeats", maxsplit=1)[0]

    assert billed(first.stdout) == billed(second.stdout)
    ledger = run_cli("ledger", "--db", str(workdir / "ledger.sqlite3"), "--by", "kind", "--json")
    calls = {g["kind"]: g["calls"] for g in json.loads(ledger.stdout)["groups"]}
    assert calls == {"stt": 111, "tts": 11, "sts": 11}  # one run's records, not two


def test_the_cli_reads_the_spool_path_the_span_exporter_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "traces.sqlite3"
    spool_with_dead_letters(path)
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_TRACES_SPOOL_PATH", str(path))
    assert ExporterConfig.resolve("traces").spool_path == str(path)
    assert main(["spool", "status"]) == 0
    assert f"spool           {path}" in capsys.readouterr().out
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_METRICS_SPOOL_PATH", str(tmp_path / "m.sqlite3"))
    main(["spool", "status"])
    assert f"another spool: {tmp_path / 'm.sqlite3'}" in capsys.readouterr().err


# ---------------------------------------------------------------- listings: times, json, csv


def test_dead_letters_show_human_times_and_come_as_csv_and_json(
    dead_spool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dead_spool
    assert main(["spool", "dead", "--spool", str(path)]) == 0
    out = capsys.readouterr().out
    assert " s ago)" in out and "Z (" in out
    # The metric stream's interval, nanoseconds in the origin, reads as times.
    assert "interval 2026-09-21T" in out and "1790000060000000000" not in out
    assert main(["spool", "dead", "--spool", str(path), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and rows[0]["status"] == "400" and rows[0]["died"].endswith("Z")
    assert main(["spool", "dead", "--spool", str(path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_retry_and_purge_leave_audit_lines(
    dead_spool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dead_spool
    assert main(["spool", "audit", "--spool", str(path)]) == 0
    assert "nobody retried or purged anything" in capsys.readouterr().out
    assert main(["spool", "retry", "--spool", str(path), "--status", "400"]) == 0
    assert main(["spool", "purge", "--pending", "--yes", "--spool", str(path)]) == 0
    capsys.readouterr()
    assert main(["spool", "audit", "--spool", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "purge" in lines[2] and "deleted every pending record" in lines[2]
    assert "retry" in lines[3] and "dead letters back to pending (status 400)" in lines[3]
    assert " 3 " in lines[2] and " 3 " in lines[3] and "@" in lines[2] and "pid" in lines[2]
    assert main(["spool", "audit", "--spool", str(path), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [(a["action"], a["records"]) for a in audit] == [("purge", 3), ("retry", 3)]


# ---------------------------------------------------------------- progress on long work


def test_retry_wait_follows_the_records_out_and_sums_up(
    tmp_path: Path, sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    config = ExporterConfig.resolve(endpoint=sandbox.url, api_key=API_KEY, spool_path=path)
    dest = destination_id(config.endpoint)
    spool.add(dest, [record(i) for i in range(4)])
    leased = spool.lease(dest, 4, time.time())
    spool.dead_letter([(i.rowid, "422", "plan unknown") for i in leased], time.time())
    spool.close()

    assert main(["spool", "retry", "--spool", str(path), "--wait", "500ms"]) == 1
    assert "0 of 4 delivered, 0 dead again, 4 still pending" in capsys.readouterr().out
    # Back to dead letters, then retried while an exporter runs on the spool.
    pipeline = DeliveryPipeline(config, name="traces")
    try:
        pipeline.force_flush(10)
        assert sandbox.ledger.count() == 4
    finally:
        pipeline.shutdown(2)
    assert main(["spool", "retry", "--spool", str(path), "--wait", "5s"]) == 0
    assert "no dead letters to retry" in capsys.readouterr().out


def test_shutdown_with_a_backlog_reports_progress_and_a_summary(
    tmp_path: Path, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(_reporting, "PROGRESS_SECONDS", 0.3)
    path = tmp_path / "spool.sqlite3"
    config = ExporterConfig.resolve(
        endpoint=sandbox.url, api_key=API_KEY, spool_path=path, max_in_flight=2
    )
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add(destination_id(config.endpoint), [record(i) for i in range(30)])
    spool.close()
    sandbox.set_faults(latency_ms=100)
    caplog.set_level(logging.INFO, logger="paygent_otel")

    pipeline = DeliveryPipeline(config, name="bridge")
    pipeline.start()
    assert "30 usage records wait in the spool" in caplog.text
    wait_for(lambda: "backlog: " in caplog.text, timeout=10, message="backlog progress")
    pipeline.shutdown(30)

    assert sandbox.ledger.count() == 30
    assert "pending usage records before shutdown" in caplog.text
    assert "delivery at shutdown: " in caplog.text
    summary = [r.getMessage() for r in caplog.records if " delivered in " in r.getMessage()]
    assert summary and summary[-1].endswith(", 0 left"), summary


def test_the_bridge_names_its_own_way_to_pass_a_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ExporterConfig.resolve(spool_path=tmp_path / "spool.sqlite3")
    app = BridgeApp(BridgeConfig(exporter=config))
    app.close()
    assert "pass --api-key-file FILE" in caplog.text and "api_key=" not in caplog.text
    key_file = tmp_path / "missing-key"
    serve = run_cli("serve", "--port", "0", "--api-key-file", str(key_file))
    assert serve.returncode == 2
    assert f"cannot read the API key file {key_file}" in serve.stderr


# ---------------------------------------------------------------- ledger views


def ledger_at(path: Path, usage: list[tuple[str, str, float, int]]) -> None:
    """A real ledger file with records (customer, kind, arrival time, quantity)."""
    writer = LedgerWriter(path)
    for i, (customer, kind, at, quantity) in enumerate(usage):
        raw: dict[str, object] = {"provider": "p", "model": f"m-{kind}", "plan": "default"}
        if kind == "stt":
            raw["audioDuration"] = quantity
        elif kind == "tts":
            raw["characterCount"] = quantity
        else:
            raw["usageMetadata"] = {"schemaVersion": 1, "input": {"audio": {"tokens": quantity}}}
        document = {"agentId": "a", "customerId": customer, "indicator": "i", "rawUsage": raw}
        text = json.dumps(document)
        writer.record_usage(
            validate_usage(document, body=text, received_at=at, idempotency_key=f"k{i}"),
            "POST", "/api/v2/usage",
        )  # fmt: skip
    writer.close()


def test_ledger_groups_by_day_and_hour_in_utc_or_a_time_zone_within_a_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.sqlite3"
    t = datetime(2026, 11, 29, 23, 30, tzinfo=UTC).timestamp()
    ledger_at(db, [("c1", "tts", t, 100), ("c1", "tts", t + 3600, 50), ("c2", "stt", t + 60, 2),
                   ("c2", "sts", t + 7200, 700), ("c1", "tts", t + 86400 * 40, 5)])  # fmt: skip

    assert main(["ledger", "--db", str(db), "--by", "day,customer", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["day"], r["customer_id"], r["calls"]) for r in rows] == [
        ("2026-11-29", "c1", "1"), ("2026-11-29", "c2", "1"), ("2026-11-30", "c1", "1"),
        ("2026-11-30", "c2", "1"), ("2027-01-08", "c1", "1"),
    ]  # fmt: skip
    assert main(["ledger", "--db", str(db), "--by", "day", "--tz", "Europe/Paris", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["day"], g["calls"]) for g in groups] == [("2026-11-30", 4), ("2027-01-09", 1)]
    assert main(["ledger", "--db", str(db), "--by", "month,kind", "--since", "2026-11-30",
                 "--until", "2026-12-01T00:00Z"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "month", "kind", "calls", "audio", "min", "chars", "sts", "tokens", "sts", "min"
    ]  # fmt: skip
    assert "2026-11  sts       1" in out and "2026-11  tts       1" in out
    assert "2026-11  stt" not in out  # 23:31 on the 29th is before --since
    assert main(["ledger", "--db", str(db), "--by", "hour,model", "--since", "2026-11-30T00:30",
                 "--until", "2026-11-30T01:30", "--json"]) == 0  # fmt: skip
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["hour"], g["model"], g["characters"]) for g in groups] == [
        ("2026-11-30T00:00", "m-tts", 50)
    ]


def test_ledger_rejects_an_unknown_time_zone_or_grouping(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["--tz", "Mars/Olympus"], ["--by", "week"]):
        with pytest.raises(SystemExit):
            main(["ledger", *argv])
    assert "'week': use a comma list of" in capsys.readouterr().err


def test_the_bridge_reports_its_delivery_at_shutdown(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    from conftest import serving
    from test_bridge_server import PB, spans

    sandbox.set_faults(latency_ms=300)
    flags = ("--spool", str(tmp_path / "spool.sqlite3"), "--endpoint", sandbox.url,
             "--max-in-flight", "1", "--flush-timeout", "1m", "--drain-grace", "0")  # fmt: skip
    with serving(*flags) as served:
        assert httpx.post(f"{served.url}/v1/traces", content=spans(20), headers=PB).is_success
        output = served.stop()
    assert served.process.returncode == 0, output
    assert "pending usage records before shutdown (at most 60 s)" in output
    assert "bridge: delivery at shutdown: " in output and " left (" in output  # progress
    summary = [line for line in output.splitlines() if " delivered in " in line]
    assert summary and summary[-1].endswith(", 0 left"), output
    assert sandbox.ledger.count() == 20
