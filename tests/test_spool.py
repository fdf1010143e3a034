"""The spool on real SQLite files: leases, outcomes, dead letters, limits, fork and sharing.

Every test reads the outcome back from the file (a fresh connection or a fresh
``SqliteSpool``), the way the next process or ``paygent-otel spool`` would see it. The
tests that take ``store`` or ``open_store`` run twice: on a SQLite file and on a real
PostgreSQL database (``tests/postgres.py``); what only PostgreSQL adds is in
``test_spool_pg.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import API_KEY
from postgres import pg_server, pg_url  # noqa: F401 (fixtures used by name)

from paygent_otel import PaygentSpanExporter
from paygent_otel.convention.mapping import Rejection, RejectReason, UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.delivery.spool import (
    DELIVERED_KEY_RETENTION,
    LEASE_SECONDS,
    MemorySpool,
    SpoolClosedError,
    SqliteSpool,
    open_spool,
)
from paygent_otel.delivery.spool.postgres import PostgresSpool
from paygent_otel.delivery.spool.schema import SQLITE_SCHEMA_VERSION
from paygent_otel.sandbox import SandboxServer

DEST = "dest-a"
FAULT_APPS = Path(__file__).parent / "fault_apps"


def record(i: int, key: str | None = None) -> UsageRecord:
    payload = {
        "agentId": "agent-voice",
        "customerId": f"cust-{i % 3}",
        "indicator": "voice-minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": 0.5 + i},
        "metaTags": {"seq": str(i)},
    }  # fmt: skip
    return UsageRecord(key or f"key-{i:05d}", payload, f"span transcribe #{i}")


def records(n: int, start: int = 0) -> list[UsageRecord]:
    return [record(i) for i in range(start, start + n)]


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the file with a connection of its own, as another process would."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "spool.sqlite3"


@pytest.fixture
def spool(spool_path: Path) -> SqliteSpool:
    opened = SqliteSpool(spool_path, max_bytes=1 << 30)
    yield opened
    opened.close()


Store = SqliteSpool | PostgresSpool


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, spool_path: Path) -> Callable[..., Store]:
    """Factory of spools on one shared store (a file, or a database): call it twice for two
    processes' views. Each test that takes it runs on both backends."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None

    def make(max_bytes: int = 1 << 30) -> Store:
        if url is None:
            opened.append(SqliteSpool(spool_path, max_bytes=max_bytes))
        else:
            fallback = spool_path.with_name("fallback.sqlite3")
            opened.append(PostgresSpool(url, max_bytes=max_bytes, fallback_path=fallback))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


def pending_rows(store: Store, columns: str) -> list[Any]:
    """``columns`` of every pending record, read with a connection of its own."""
    if isinstance(store, SqliteSpool):
        return raw_rows(store.path, f"SELECT {columns} FROM pending ORDER BY id")
    with psycopg.connect(store.url.dsn) as conn:
        return conn.execute(f"SELECT {columns} FROM paygent_pending ORDER BY id").fetchall()


def location(store: Store) -> str:
    """What another process opens the same store with."""
    return store.url.dsn if isinstance(store, PostgresSpool) else str(store.path)


# ---------------------------------------------------------------- add, lease, outcomes


def test_add_commits_key_and_exact_payload_before_returning(
    spool: SqliteSpool, spool_path: Path
) -> None:
    result = spool.add(DEST, records(3))

    assert (result.accepted, result.duplicates, result.refused) == (3, 0, 0)
    rows = raw_rows(spool_path, "SELECT key, dest, body, attempts FROM pending ORDER BY key")
    assert [(k, d, a) for k, d, _, a in rows] == [
        ("key-00000", DEST, 0), ("key-00001", DEST, 0), ("key-00002", DEST, 0)
    ]  # fmt: skip
    assert [json.loads(body) for _, _, body, _ in rows] == [r.payload for r in records(3)]


def test_a_record_already_pending_is_a_duplicate_not_a_second_row(store: Store) -> None:
    store.add(DEST, records(2))

    result = store.add(DEST, [*records(3), record(2)])  # and one twice in the batch

    assert (result.accepted, result.duplicates) == (1, 3)
    assert store.pending(DEST) == 3
    keys = sorted(k for (k,) in pending_rows(store, "key"))
    assert keys == [r.idempotency_key for r in records(3)]


def test_lease_takes_due_records_once_and_only_up_to_the_limit(
    open_store: Callable[..., Store],
) -> None:
    first, second = open_store(), open_store()
    first.add(DEST, records(5))
    first.add("dest-b", [record(99)])
    now = time.time()

    leased = first.lease(DEST, 3, now)
    rest = second.lease(DEST, 10, now)

    assert len(leased) == 3 and len(rest) == 2
    assert {i.key for i in leased}.isdisjoint(i.key for i in rest)
    assert second.lease(DEST, 10, now) == []  # everything is held; dest-b is not ours
    assert first.stats().in_flight == 5


def test_complete_deletes_and_keeps_the_key_for_the_dedup_window(store: Store) -> None:
    store.add(DEST, records(2))
    items = store.lease(DEST, 10, time.time())

    store.complete([i.rowid for i in items], [i.key for i in items], time.time())

    assert store.pending() == 0 and pending_rows(store, "key") == []
    assert store.known_keys(["key-00000", "unknown"]) == {"key-00000"}
    # The same records handed over again (a Collector retrying its request) are not re-sent.
    again = store.add(DEST, records(2))
    assert (again.accepted, again.duplicates) == (0, 2)
    # After the retention window the keys are forgotten.
    store.prune_delivered(time.time() + DELIVERED_KEY_RETENTION + 1)
    assert store.known_keys(["key-00000"]) == set()
    assert store.add(DEST, records(2)).accepted == 2


def test_reschedule_counts_the_attempt_and_holds_the_record_until_its_time(
    store: Store,
) -> None:
    store.add(DEST, [record(0)])
    now = time.time()
    (item,) = store.lease(DEST, 1, now)

    store.reschedule([(item.rowid, now + 30, "HTTP 503: busy")])

    assert store.lease(DEST, 1, now + 29) == []
    assert store.next_due(DEST) == pytest.approx(now + 30)
    (again,) = store.lease(DEST, 1, now + 31)
    assert (again.key, again.attempts, again.body) == (item.key, 1, item.body)
    assert pending_rows(store, "last_error") == [("HTTP 503: busy",)]


def test_outcomes_of_a_worker_whose_lease_expired_do_not_touch_the_new_holder(
    open_store: Callable[..., Store],
) -> None:
    slow, other = open_store(), open_store()
    slow.add(DEST, records(2))
    now = time.time()
    stale = slow.lease(DEST, 2, now)
    taken = other.lease(DEST, 2, now + LEASE_SECONDS + 1)  # the leases expired

    slow.reschedule([(stale[0].rowid, now + 5, "timeout")])
    slow.dead_letter([(stale[1].rowid, "400", "late answer")], now)

    assert len(taken) == 2
    assert other.stats().in_flight == 2 and other.stats().dead_letters == 0
    assert pending_rows(other, "attempts") == [(0,), (0,)]


def test_dead_letter_keeps_status_reason_and_payload_and_blocks_the_key(
    store: Store,
) -> None:
    store.add(DEST, records(3))
    items = store.lease(DEST, 3, time.time())

    store.dead_letter([(items[0].rowid, "400", '{"error":"customerId: unknown"}')], time.time())

    assert store.pending() == 2
    (dead,) = store.dead_letters()
    assert (dead.key, dead.status, dead.reason, dead.attempts) == (
        items[0].key, "400", '{"error":"customerId: unknown"}', 1
    )  # fmt: skip
    assert json.loads(dead.body) == record(0).payload
    assert store.dead_letter_counts() == {"400": 1}
    assert store.add(DEST, [record(0)]).duplicates == 1  # not re-queued behind a person's back


def test_invalid_records_are_dead_letters_without_a_payload(store: Store) -> None:
    rejection = Rejection(
        RejectReason.INVALID,
        "usage record from span x rejected: paygent.customer.id is missing",
        "span x",
        "bad-key",
        {"paygent.usage.kind": "stt"},
    )

    store.add_rejected([rejection])

    (dead,) = store.dead_letters(status="invalid")
    assert dead.reason == rejection.message
    assert json.loads(dead.body) == {"paygent.usage.kind": "stt"}
    assert store.retry_dead() == 0  # nothing to send: it never was a Paygent document


def test_retry_dead_moves_letters_back_filtered_by_status_or_key(store: Store) -> None:
    store.add(DEST, records(4))
    items = store.lease(DEST, 4, time.time())
    now = time.time()
    store.dead_letter(
        [(items[0].rowid, "400", "a"), (items[1].rowid, "400", "b"),
         (items[2].rowid, "422", "c"), (items[3].rowid, "gave_up", "d")],
        now,
    )  # fmt: skip

    assert store.retry_dead(status="422") == 1
    assert store.retry_dead(keys=[items[0].key]) == 1
    assert store.dead_letter_counts() == {"400": 1, "gave_up": 1}
    assert store.retry_dead() == 2
    assert store.dead_letter_counts() == {}
    back = store.lease(DEST, 10, time.time())
    assert sorted(i.key for i in back) == sorted(i.key for i in items)
    assert all(i.attempts == 0 for i in back)


def test_purge_deletes_dead_letters_or_pending_records(store: Store) -> None:
    store.add(DEST, records(3))
    (item,) = store.lease(DEST, 1, time.time())
    store.dead_letter([(item.rowid, "400", "no")], time.time())

    assert store.purge("dead") == 1
    assert store.stats().dead_letters == 0 and store.pending() == 2
    assert store.purge("pending") == 2
    assert store.pending() == 0
    with pytest.raises(KeyError):
        store.purge("delivered")


def test_release_hands_this_workers_leases_back(open_store: Callable[..., Store]) -> None:
    holder = open_store()
    holder.add(DEST, records(3))
    holder.lease(DEST, 3, time.time())

    holder.close()  # a clean shutdown

    other = open_store()
    assert len(other.lease(DEST, 10, time.time())) == 3


def test_a_closed_spool_stays_closed_instead_of_opening_again(
    open_store: Callable[..., Store],
) -> None:
    store = open_store()
    store.add(DEST, records(1))
    store.close()

    with pytest.raises(SpoolClosedError, match="is closed"):
        store.add(DEST, records(1, start=1))
    with pytest.raises(SpoolClosedError, match="is closed"):
        store.lease(DEST, 10, time.time() + 1)
    store.close()  # a second close changes nothing
    assert pending_rows(store, "key, lease_owner") == [("key-00000", None)]


def test_a_new_file_carries_its_schema_version(spool: SqliteSpool, spool_path: Path) -> None:
    assert raw_rows(spool_path, "PRAGMA user_version") == [(SQLITE_SCHEMA_VERSION,)]


def test_a_file_of_an_earlier_version_is_migrated_with_its_records(tmp_path: Path) -> None:
    """A file written before the schema was numbered, without the journal, audit and
    endpoints tables: they are added, its record journaled as recorded, the version set."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE pending (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,"
            " dest TEXT NOT NULL, body BLOB NOT NULL, origin TEXT NOT NULL DEFAULT '',"
            " created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt REAL NOT NULL, lease_owner TEXT, lease_until REAL, last_error TEXT);"
        )
        body = json.dumps(record(1).payload).encode()
        db.execute(
            "INSERT INTO pending (key, dest, body, created, next_attempt) VALUES (?, ?, ?, ?, ?)",
            ("key-old", DEST, body, time.time(), time.time()),
        )
    db.close()

    spool = SqliteSpool(path, max_bytes=1 << 30)
    leased = spool.lease(DEST, 10, time.time())
    spool.close()

    assert [item.key for item in leased] == ["key-old"]
    assert raw_rows(path, "PRAGMA user_version") == [(SQLITE_SCHEMA_VERSION,)]
    assert raw_rows(path, "SELECT outcome, records FROM journal") == [("recorded", 1)]
    assert {"dead", "delivered", "endpoints", "audit"} <= {
        name for (name,) in raw_rows(path, "SELECT name FROM sqlite_master")
    }


def test_a_file_newer_than_this_version_is_refused_untouched(spool_path: Path) -> None:
    SqliteSpool(spool_path, max_bytes=1 << 30).close()
    with sqlite3.connect(spool_path) as db:
        db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION + 1}")
    db.close()
    before = raw_rows(spool_path, "SELECT name, value FROM meta")

    with pytest.raises(sqlite3.DatabaseError, match="newer than this paygent-otel understands"):
        SqliteSpool(spool_path, max_bytes=1 << 30)
    with pytest.raises(sqlite3.DatabaseError, match="upgrade paygent-otel"):
        open_spool(str(spool_path), max_bytes=1 << 30, readonly=True)
    assert raw_rows(spool_path, "SELECT name, value FROM meta") == before


def test_stats_count_pending_in_flight_dead_oldest_and_size(store: Store) -> None:
    assert store.stats().pending == 0 and store.stats().oldest_pending_age is None
    store.add(DEST, records(4))
    items = store.lease(DEST, 2, time.time())
    store.dead_letter([(items[0].rowid, "400", "x")], time.time())
    time.sleep(0.05)

    stats = store.stats()

    assert (stats.pending, stats.in_flight, stats.dead_letters) == (3, 1, 1)
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age >= 0.05
    assert stats.size_bytes == store.size_bytes() > 0


# ---------------------------------------------------------------- limits and hygiene


def test_size_cap_refuses_whole_batches_and_never_evicts(spool_path: Path) -> None:
    capped = SqliteSpool(spool_path, max_bytes=64 * 1024)
    accepted = refused = 0
    batch = 0
    while refused == 0:
        result = capped.add(DEST, records(50, start=batch * 50))
        accepted += result.accepted
        refused += result.refused
        batch += 1
        assert batch < 100, "the cap never refused anything"

    assert refused == 50  # the batch that found the spool full, all of it
    assert capped.pending() == accepted  # nothing stored was dropped to make room
    kept = raw_rows(spool_path, "SELECT key FROM pending")
    assert len(kept) == accepted and ("key-00000",) in kept
    # Delivering frees room (free pages do not count): new records are accepted again.
    items = capped.lease(DEST, accepted, time.time())
    capped.complete([i.rowid for i in items], [i.key for i in items], time.time())
    assert capped.add(DEST, [record(100_000)]).accepted == 1
    assert raw_rows(spool_path, "PRAGMA integrity_check") == [("ok",)]
    capped.close()


def test_the_spool_folder_is_private_and_so_are_its_files(tmp_path: Path) -> None:
    path = tmp_path / "state" / "paygent-otel" / "spool.sqlite3"
    opened = SqliteSpool(path, max_bytes=1 << 30)
    opened.add(DEST, records(2))  # the -wal and -shm files exist once something is written

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
    opened.close()


def test_an_unusable_path_fails_at_construction_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")

    with pytest.raises(OSError, match="not-a-folder"):
        SqliteSpool(blocker / "spool.sqlite3", max_bytes=1 << 30)


def test_open_spool_selects_memory_or_file(tmp_path: Path) -> None:
    assert isinstance(open_spool(":memory:", max_bytes=1), MemorySpool)
    on_disk = open_spool(str(tmp_path / "s.sqlite3"), max_bytes=1 << 20)
    assert isinstance(on_disk, SqliteSpool) and on_disk.durable
    on_disk.close()


# ---------------------------------------------------------------- crash recovery and sharing


def test_leases_of_a_killed_process_are_taken_back_at_once(spool_path: Path) -> None:
    SqliteSpool(spool_path, max_bytes=1 << 30).add(DEST, records(4))
    code = (
        "import sys, time, os, signal\n"
        "from paygent_otel.delivery.spool import SqliteSpool\n"
        f"s = SqliteSpool({str(spool_path)!r}, max_bytes=1 << 30)\n"
        f"print(len(s.lease({DEST!r}, 3, time.time())), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30
    )
    assert child.returncode == -signal.SIGKILL and child.stdout.strip() == "3"
    assert len(raw_rows(spool_path, "SELECT 1 FROM pending WHERE lease_owner IS NOT NULL")) == 3

    successor = SqliteSpool(spool_path, max_bytes=1 << 30)

    # Not after LEASE_SECONDS: the owner is gone, so its records are due now.
    assert len(successor.lease(DEST, 10, time.time())) == 4
    successor.close()


def test_leases_of_an_earlier_process_with_our_pid_are_taken_back(spool_path: Path) -> None:
    # A restarted container's process often has the pid the crashed one had (pid 1).
    first = SqliteSpool(spool_path, max_bytes=1 << 30)
    first.add(DEST, records(2))
    first.lease(DEST, 2, time.time())
    earlier = f"{socket.gethostname()}:{os.getpid()}:0ld0ld00:abcdef12"
    with sqlite3.connect(spool_path) as conn:
        conn.execute("UPDATE pending SET lease_owner = ?", (earlier,))

    successor = SqliteSpool(spool_path, max_bytes=1 << 30)

    assert len(successor.lease(DEST, 10, time.time())) == 2
    first.close()
    successor.close()


def test_leases_of_a_live_worker_are_respected_by_a_new_one(spool_path: Path) -> None:
    holder = SqliteSpool(spool_path, max_bytes=1 << 30)
    holder.add(DEST, records(2))
    holder.lease(DEST, 2, time.time())

    newcomer = SqliteSpool(spool_path, max_bytes=1 << 30)

    assert newcomer.lease(DEST, 10, time.time()) == []
    holder.close()
    newcomer.close()


def test_processes_sharing_a_spool_never_lease_a_record_twice(store: Store, tmp_path: Path) -> None:
    store.add(DEST, records(600))
    out = tmp_path / "leased.txt"
    drainers = [
        subprocess.Popen(
            [sys.executable, str(FAULT_APPS / "spool_drainer.py"), location(store), DEST, str(out)]
        )
        for _ in range(3)
    ]
    for drainer in drainers:
        assert drainer.wait(timeout=60) == 0

    leased = Counter(out.read_text().split())
    assert sum(leased.values()) == 600 and len(leased) == 600  # each exactly once
    assert store.pending() == 0
    if isinstance(store, SqliteSpool):
        assert raw_rows(store.path, "PRAGMA integrity_check") == [("ok",)]


# ---------------------------------------------------------------- fork


def _fork(child: Any, timeout: float = 10.0) -> int:
    """Run ``child()`` in a forked process; its exit code (1 on exception, -9 if it hung)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            child()
        except BaseException:
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    # Stuck on a lock a thread of the parent held at fork time: fail, do not hang the suite.
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def test_a_forked_child_writes_through_its_own_connection_while_the_parent_writes(
    spool: SqliteSpool, spool_path: Path
) -> None:
    spool.add(DEST, records(10))
    stop = threading.Event()
    written = [0]

    def parent_writer() -> None:
        # Holds the spool's lock most of the time (each commit is fsynced): without the
        # fork hook, forks land in the middle of transactions.
        i = 1000
        while not stop.is_set():
            spool.add(DEST, [record(i)])
            written[0] += 1
            i += 1
            time.sleep(0.0005)  # a Python lock is not fair: let fork() have it sometimes

    writer = threading.Thread(target=parent_writer)
    writer.start()
    try:
        statuses = [
            _fork(lambda n=n: spool.add(DEST, records(5, start=100 + 10 * n))) for n in range(8)
        ]
    finally:
        stop.set()
        writer.join()

    assert statuses == [0] * 8  # none hung, none failed
    assert raw_rows(spool_path, "PRAGMA integrity_check") == [("ok",)]
    assert spool.pending() == 10 + 8 * 5 + written[0]
    assert raw_rows(spool_path, "SELECT count(*) FROM pending WHERE key LIKE 'key-001%'") == [(40,)]


def test_a_forked_child_does_not_reuse_the_parents_leases_or_lock(store: Store) -> None:
    spool = store
    spool.add(DEST, records(4))
    held = spool.lease(DEST, 2, time.time())  # PostgreSQL: the pooled connection is idle now

    def child() -> None:
        mine = spool.lease(DEST, 10, time.time())
        # Only the two free records: the parent's leases belong to a live process.
        assert sorted(i.key for i in mine) == ["key-00002", "key-00003"]
        spool.complete([i.rowid for i in mine], [i.key for i in mine], time.time())
        spool.close()  # closes nothing of the parent's (its connection, its file)

    assert _fork(child) == 0
    assert spool.pending() == 2
    spool.complete([i.rowid for i in held], [i.key for i in held], time.time())
    assert spool.pending() == 0


def test_a_forked_child_starts_with_an_empty_memory_spool() -> None:
    memory = MemorySpool()
    memory.add(DEST, records(3))

    def child() -> None:
        # The parent delivers its own records; a copy here would send them twice.
        assert memory.pending() == 0 and memory.lease(DEST, 10, time.time()) == []
        assert memory.add(DEST, [record(7)]).accepted == 1

    assert _fork(child) == 0
    assert memory.pending() == 3


def test_a_forked_child_of_a_delivering_exporter_delivers_its_own_records(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    # gunicorn --preload: the exporter and its worker thread exist before the fork.
    exporter = PaygentSpanExporter(
        endpoint=sandbox.url,
        api_key=API_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        retry_policy=RetryPolicy(initial_interval=0.05, max_interval=0.5),
    )
    pipeline = exporter.pipeline
    pipeline.submit(records(5))
    assert pipeline.force_flush(10)

    def child() -> None:
        assert pipeline.submit(records(5, start=500)) == 0
        if not pipeline.force_flush(10):
            os._exit(3)
        pipeline.shutdown(2)

    assert _fork(child) == 0
    pipeline.submit(records(5, start=900))
    assert pipeline.force_flush(10)
    exporter.shutdown(2000)

    seqs = sorted(int(row["meta_tags"]["seq"]) for row in sandbox.ledger.rows())
    assert seqs == [*range(5), *range(500, 505), *range(900, 905)]
    assert sandbox.ledger.duplicate_count() == 0


# ---------------------------------------------------------------- the in-memory queue


def test_memory_spool_keeps_the_same_contract() -> None:
    memory = MemorySpool(max_records=3)
    assert not memory.durable

    result = memory.add(DEST, records(4))

    assert (result.accepted, result.refused) == (3, 1)
    now = time.time()
    first, second, third = memory.lease(DEST, 10, now)
    memory.reschedule([(first.rowid, now + 5, "HTTP 503")])
    memory.complete([second.rowid], [second.key], now)
    memory.dead_letter([(third.rowid, "400", "no")], now)
    assert memory.lease(DEST, 10, now) == []
    assert memory.next_due(DEST) == pytest.approx(now + 5)
    (again,) = memory.lease(DEST, 10, now + 6)
    assert (again.key, again.attempts) == (first.key, 1)
    assert memory.add(DEST, [record(1)]).duplicates == 1  # delivered: remembered
    assert [(d.key, d.status, d.reason) for d in memory.dead_letters()] == [
        (third.key, "400", "no")
    ]
    stats = memory.stats()
    assert (stats.pending, stats.in_flight, stats.dead_letters) == (1, 1, 1)


def test_memory_mode_loses_what_is_undelivered_at_shutdown_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ExporterConfig.resolve(
        "traces", endpoint="http://127.0.0.1:9", api_key=API_KEY, spool_path=":memory:"
    )
    pipeline = DeliveryPipeline(config, name="traces")

    pipeline.submit(records(3))
    pipeline.shutdown(0.2)

    assert pipeline.stats.snapshot()["dropped_at_shutdown"] == 3
    assert "3 usage records were not delivered before shutdown and are lost" in caplog.text
