"""The spool's journal and ``paygent-otel reconcile``: every record accounted for."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import API_KEY

from paygent_otel._cli.main import main
from paygent_otel.convention.mapping import Rejection, RejectReason, UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.reconcile import conservation_report
from paygent_otel.delivery.spool import SqliteSpool, destination_id
from paygent_otel.delivery.spool.journal import JOURNAL_RETENTION_SECONDS
from paygent_otel.sandbox import SandboxServer


def stt(i: int, customer: str = "cust-1", minutes: float = 0.5) -> UsageRecord:
    payload = {
        "agentId": "a", "customerId": customer, "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": minutes},
    }  # fmt: skip
    return UsageRecord(f"stt-{customer}-{i}", payload, f"span {i}")


def sts(i: int, tokens: int) -> UsageRecord:
    payload = {
        "agentId": "a", "customerId": "cust-2", "indicator": "tokens",
        "rawUsage": {"provider": "openai", "model": "gpt-realtime", "plan": "default",
                     "usageMetadata": {"schemaVersion": 1,
                                       "input": {"audio": {"tokens": tokens, "minutes": 0.25}},
                                       "cached": {"tokens": 10}}},
    }  # fmt: skip
    return UsageRecord(f"sts-{i}", payload, f"span {i}")


def test_every_outcome_is_journaled_and_the_report_balances(
    tmp_path: Path, sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.sqlite3"
    config = ExporterConfig.resolve(endpoint=sandbox.url, api_key=API_KEY, spool_path=path)
    dest = destination_id(config.endpoint)
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add(dest, [stt(i) for i in range(6)] + [sts(0, 100), sts(1, 200)])
    spool.add(dest, [stt(0), stt(1)])  # handed over again: acknowledged duplicates
    spool.add_rejected(
        [Rejection(RejectReason.INVALID, "bad", "span x", "bad-1",
                   {"paygent.customer.id": "cust-1", "paygent.usage.kind": "stt"})]
    )  # fmt: skip
    leased = {item.key: item for item in spool.lease(dest, 10, time.time())}
    spool.dead_letter([(leased["stt-cust-1-5"].rowid, "400", "no")], time.time())
    spool.dead_letter([(leased["stt-cust-1-4"].rowid, "422", "no")], time.time())
    spool.release()
    assert spool.retry_dead(status="422") == 1  # back to pending
    spool.close()
    full = SqliteSpool(path, max_bytes=1)
    full.add(dest, [stt(99, "cust-3", 2.0)])  # refused: the spool is at its cap
    full.close()

    pipeline = DeliveryPipeline(config, name="traces")
    pipeline.force_flush(10)
    pipeline.shutdown(2)
    report = conservation_report([path], ledger=sandbox.ledger)

    assert report.balanced, report.to_text()
    rows = {(r.customer, r.kind): r for r in report.rows}
    one = rows[("cust-1", "stt")]
    assert one.recorded.records == 6 + 2 + 1
    assert one.recorded.minutes == pytest.approx(4.0)
    assert {n: a.records for n, a in one.parts.items()} == {
        "delivered": 5, "duplicate": 2, "dead": 2, "pending": 0, "purged": 0, "refused": 0
    }  # fmt: skip
    assert one.parts["delivered"].minutes == pytest.approx(2.5)
    two = rows[("cust-2", "sts")]
    assert (two.parts["delivered"].tokens, two.parts["delivered"].minutes) == (320, 0.5)
    assert rows[("cust-3", "stt")].parts["refused"].records == 1
    assert [(c.customer, c.kind, c.delivered.records, c.ledger.records, c.same)
            for c in report.ledger_checks] == [("cust-1", "stt", 5, 5, True),
                                               ("cust-2", "sts", 2, 2, True)]  # fmt: skip

    assert main(["reconcile", "--spool", str(path), "--ledger", str(sandbox.db_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if " cust-1 " in line)
    assert line.split()[1:] == [
        "cust-1", "stt", "9", "(4", "min)", "5", "(2.5", "min)", "2", "(1", "min)", "2", "(0.5",
        "min)", "0", "0", "0", "ok",
    ]  # fmt: skip
    assert "BALANCED" in out and "UsageSampler" in out and "Queue is full" in out
    assert "counted here: 1 invalid records in the dead letters now" in out
    assert main(["reconcile", "--spool", str(path), "--csv", "--by", "hour"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["customer"] for r in table} == {"cust-1", "cust-2", "cust-3"}
    assert all(r["balanced"] == "True" for r in table) and table[0]["period"].endswith(":00")
    assert main(["reconcile", "--spool", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["balanced"] and document["cannot_see"]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[SqliteSpool]:
    """A spool file in ``tmp_path``, closed after the test (closing twice is fine)."""
    opened = SqliteSpool(tmp_path / "spool.sqlite3", max_bytes=1 << 30)
    yield opened
    opened.close()


def test_pending_and_purged_records_are_accounted_for(spool: SqliteSpool) -> None:
    path = spool.path
    spool.add("d", [stt(i) for i in range(4)])
    spool.add("d", [stt(4), stt(4), stt(0)])  # a copy within the batch, one of an earlier
    row = conservation_report([path]).rows[0]
    assert (row.recorded.records, row.parts["duplicate"].records) == (7, 2)
    assert (row.parts["pending"].records, row.balanced) == (5, True)
    spool.purge("pending")
    spool.close()
    row = conservation_report([path]).rows[0]
    assert (row.parts["pending"].records, row.parts["purged"].records, row.balanced) == (0, 5, True)


def test_a_record_that_vanished_is_a_loud_difference(
    spool: SqliteSpool, capsys: pytest.CaptureFixture[str]
) -> None:
    path = spool.path
    spool.add("d", [stt(i) for i in range(3)])
    spool.close()
    with sqlite3.connect(path) as db:  # lost behind the spool's back
        db.execute("DELETE FROM pending WHERE key = 'stt-cust-1-0'")

    assert main(["reconcile", "--spool", str(path)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCE" in out and "DIFFERENCE in 1 rows" in out
    assert main(["reconcile", "--spool", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"][0]["difference_records"] == 1
    assert "DIFFERENCE" in captured.err


def test_a_ledger_that_disagrees_with_the_spool_is_a_difference(
    tmp_path: Path, sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.sqlite3"
    config = ExporterConfig.resolve(endpoint=sandbox.url, api_key=API_KEY, spool_path=path)
    pipeline = DeliveryPipeline(config, name="traces")
    pipeline.submit([stt(i) for i in range(3)])
    assert pipeline.force_flush(10)
    pipeline.shutdown(2)
    import httpx

    extra = {**stt(7).payload, "customerId": "cust-1"}
    answer = httpx.post(
        f"{sandbox.url}/api/v2/usage", json=extra, headers={"paygent-api-key": API_KEY}
    )
    assert answer.status_code == 200

    assert main(["reconcile", "--spool", str(path), "--ledger", str(sandbox.db_path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("cust-1 "))
    assert line.split() == ["cust-1", "stt", "3", "(1.5", "min)", "4", "(2", "min)", "DIFFERENCE"]


def test_missing_spool_is_a_clear_error(
    tmp_path: Path, sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reconcile", "--spool", str(tmp_path / "none.sqlite3")]) == 1
    assert "no spool at" in capsys.readouterr().err
    ledger = sandbox.db_path
    before = ledger.read_bytes()
    assert main(["reconcile", "--spool", str(ledger)]) == 1
    assert "it looks like a sandbox ledger" in capsys.readouterr().err
    assert ledger.read_bytes() == before  # nothing was added to it


def test_the_journal_is_pruned_after_its_retention_but_not_under_a_pending_record(
    spool: SqliteSpool,
) -> None:
    path = spool.path
    spool.add("d", [stt(0)])
    later = time.time() + JOURNAL_RETENTION_SECONDS + 7200
    spool.prune_delivered(later)
    assert conservation_report([path]).rows[0].recorded.records == 1  # still pending
    spool.purge("pending")
    spool.prune_delivered(later)
    assert conservation_report([path]).rows == []
    spool.close()


def test_a_spool_from_before_the_journal_balances_from_its_first_run(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add("d", [stt(i) for i in range(4)])
    leased = spool.lease("d", 1, time.time())
    spool.dead_letter([(leased[0].rowid, "400", "no")], time.time())
    spool.add_rejected([Rejection(RejectReason.INVALID, "bad", "span x", "bad-1", {})])
    spool.close()
    with sqlite3.connect(path) as db:  # what an earlier version left: no journal, no audit
        db.execute("DROP TABLE journal")
        db.execute("DROP TABLE audit")

    report = conservation_report([path])
    assert report.balanced, report.to_text()
    totals = report.totals()
    assert (totals.recorded.records, totals.parts["pending"].records) == (5, 3)
    assert totals.parts["dead"].records == 2
    assert conservation_report([path]).totals().recorded.records == 5  # adopted once
