"""The PostgreSQL spool: one queue, one dead-letter table and one set of keys for many hosts.

Selected by a ``postgresql://`` URL wherever a spool path is accepted. Any number of bridge
replicas and exporters on any number of hosts share it:

- a record is committed (key + JSON body) before ``export()`` or the bridge's ack returns;
  its key is inserted into ``paygent_keys`` in the same transaction, so the same record
  handed to two replicas is stored, and therefore sent, once;
- :meth:`PostgresSpool.lease` reserves due records with ``FOR UPDATE SKIP LOCKED``: two
  workers never hold one record;
- a live worker renews its leases every ``lease_seconds / 4`` (a heartbeat carried by its
  own spool calls); the leases of a replica that died expire after ``lease_seconds`` and
  another replica sends those records, with the same key;
- the schema is versioned (``paygent_schema_version``) and migrated under an advisory lock
  by the first process that opens the database;
- at most ``pool_size`` connections per process; each has a connect timeout and a statement
  timeout, so a slow or unreachable server costs a bounded wait;
- while PostgreSQL cannot be reached, :meth:`PostgresSpool.add` commits records to a local
  SQLite file (the *fallback*) instead, and the worker moves them into PostgreSQL once it
  answers again: ``export()`` neither stalls nor loses records during an outage;
- the URL's password never appears in a log line or a repr (:class:`~._spool_url.SpoolUrl`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, Unpack

import psycopg

from paygent_otel.convention.mapping import Rejection, UsageRecord
from paygent_otel.delivery.config import (
    OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH,
    OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS,
    read_setting,
)
from paygent_otel.delivery.spool.keys import excerpt, record_body, rejected_row
from paygent_otel.delivery.spool.pg_fallback import (
    MoveResult,
    default_fallback_path,
    move_sqlite_records,
)
from paygent_otel.delivery.spool.pg_pool import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_SIZE,
    SpoolUnavailable,
)
from paygent_otel.delivery.spool.pg_sql import (
    ADD_COLUMNS,
    DEAD_COLUMNS,
    IMPORT_COLUMNS,
    REJECTED_COLUMNS,
    Columns,
    insert_new,
    move_dead_to_pending,
    purge_table,
    ref_conflicts,
    retarget_records,
    set_endpoint,
)
from paygent_otel.delivery.spool.pg_views import PgOptions, PostgresSpoolView
from paygent_otel.delivery.spool.schema import PG_SCHEMA_VERSION
from paygent_otel.delivery.spool.types import DELIVERED_KEY_RETENTION, AddResult, SpooledItem

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH",
    "OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS",
    "SCHEMA_VERSION",
    "MoveResult",
    "PostgresSpool",
    "PostgresSpoolView",
    "SpoolUnavailable",
    "default_fallback_path",
    "move_sqlite_records",
]

SCHEMA_VERSION: Final = PG_SCHEMA_VERSION
"""The newest schema this version creates and understands."""
FALLBACK_DRAIN_SECONDS: Final = 1.0
"""How often the worker looks for records the fallback took during an outage."""
PRUNE_SECONDS: Final = 600.0
"""How often delivered keys past the retention window are deleted."""


def _lease_seconds() -> float:
    return float(read_setting(OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS))


def _columns(items: Sequence[tuple[int, Any, str]]) -> list[list[Any]]:
    """(rowid, value, text) items as three arrays for ``unnest``, the text cut to an excerpt."""
    rowids, values, texts = ([*column] for column in zip(*items, strict=True))
    return [rowids, values, [excerpt(text) for text in texts]]


class PostgresSpool(PostgresSpoolView):
    """The shared durable spool in a PostgreSQL database (same contract as ``SqliteSpool``).

    What it reads is :class:`~._spool_pg_views.PostgresSpoolView`'s; the connections and
    outages are :class:`~._spool_pg_link.PgLink`'s; the local fallback is
    :class:`~._spool_pg_fallback.Fallback`'s.
    """

    def __init__(
        self,
        url: str,
        *,
        max_bytes: int,
        lease_seconds: float | None = None,
        **options: Unpack[PgOptions],
    ) -> None:
        """Connect and migrate the schema (``options``: :class:`~._spool_pg_views.PgOptions`).

        With ``fallback_path``, an unreachable server is logged and records go to that
        SQLite file until it answers; without it (the ``spool`` commands) the error is
        raised as :class:`SpoolUnavailable`.
        """
        self.lease_seconds = lease_seconds if lease_seconds is not None else _lease_seconds()
        self._last_beat = 0.0
        self._last_prune = 0.0
        self._last_drain = 0.0
        super().__init__(url, max_bytes=max_bytes, **options)

    _migrates = True

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """Renew this process's leases: only a replica that stopped lets them expire."""
        now = time.time()
        if now - self._last_beat < self.lease_seconds / 4:
            return
        self._last_beat = now
        conn.execute(
            "UPDATE paygent_pending SET lease_until = %s WHERE lease_owner = %s",
            (now + self.lease_seconds, self._link.owner),
        )

    def _housekeeping(self) -> None:
        """Prune old keys and move the fallback's records in, each when it is time."""
        now = time.time()
        if now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            self.prune_delivered(now)
        if self.fallback_path is None or now - self._last_drain < FALLBACK_DRAIN_SECONDS:
            return
        self._last_drain = now
        self._fallback.drain(self)

    # ------------------------------------------------------------------ producer side

    def add(self, dest: str, records: Sequence[UsageRecord]) -> AddResult:
        """Commit valid records (each key once, ever, across every replica)."""
        if not records:
            return AddResult()
        unique = {r.idempotency_key: r for r in records}
        try:
            if self.size_bytes() >= self.max_bytes:
                return AddResult(refused=len(records))
            now = time.time()
            with self.connection() as conn:
                conflicts = ref_conflicts(conn, list(unique.values()))
            for conflict in conflicts:
                unique.pop(conflict.idempotency_key, None)
            accepted = self._insert_new(
                "paygent_pending",
                ADD_COLUMNS,
                [
                    (r.idempotency_key, dest, record_body(r), r.origin, now, now)
                    for r in unique.values()
                ],
            )
        except SpoolUnavailable:
            if self.fallback_path is None:
                raise
            return self._fallback.open().add(dest, records)
        duplicates = len(records) - accepted - len(conflicts)
        return AddResult(accepted=accepted, duplicates=duplicates, conflicts=tuple(conflicts))

    def add_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid records (their attributes) as dead letters with status ``invalid``."""
        if not rejections:
            return
        now = time.time()
        unique = {r.idempotency_key: r for r in rejections}
        try:
            self._insert_new(
                "paygent_dead",
                REJECTED_COLUMNS,
                [rejected_row(r, now) for r in unique.values()],
            )
        except SpoolUnavailable:
            if self.fallback_path is None:
                raise
            self._fallback.open().add_rejected(rejections)

    def _insert_new(self, table: str, columns: Columns, rows: Sequence[tuple[Any, ...]]) -> int:
        """:func:`~._spool_pg_sql.insert_new` on a connection of the pool."""
        if not rows:
            return 0
        with self.connection() as conn:
            return insert_new(conn, table, columns, rows)

    def import_records(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert pending records moved from a SQLite spool, attempts and schedule kept.

        ``rows``: (key, dest, body, origin, created, next_attempt, attempts, last_error).
        Returns how many were new (the others' keys were already known here).
        """
        return self._insert_new("paygent_pending", IMPORT_COLUMNS, rows)

    def import_dead_letters(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert dead letters moved from a SQLite spool; returns how many were new.

        ``rows``: (key, dest, body, origin, created, died, status, reason, attempts).
        """
        return self._insert_new("paygent_dead", DEAD_COLUMNS, rows)

    # ------------------------------------------------------------------ worker side

    def lease(self, dest: str, limit: int, now: float) -> list[SpooledItem]:
        """Reserve up to ``limit`` due records nobody holds (or whose holder stopped)."""
        if limit <= 0:
            return []
        self._housekeeping()
        with self.connection() as conn:
            self._beat(conn)
            rows = conn.execute(
                "UPDATE paygent_pending p SET lease_owner = %s, lease_until = %s FROM ("
                " SELECT id FROM paygent_pending WHERE dest = %s AND next_attempt <= %s"
                " AND (lease_until IS NULL OR lease_until < %s) ORDER BY next_attempt LIMIT %s"
                " FOR UPDATE SKIP LOCKED) due WHERE p.id = due.id"
                " RETURNING p.id, p.key, p.body, p.attempts, p.created, p.origin",
                (self._link.owner, now + self.lease_seconds, dest, now, now, limit),
            ).fetchall()
        return [SpooledItem(i, k, bytes(b), a, c, o) for i, k, b, a, c, o in rows]

    def next_due(self, dest: str) -> float | None:
        """Earliest next-attempt time of a record nobody holds."""
        with self.connection() as conn:
            self._beat(conn)
            row = conn.execute(
                "SELECT min(next_attempt) FROM paygent_pending WHERE dest = %s"
                " AND (lease_until IS NULL OR lease_until < %s)",
                (dest, time.time()),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def complete(self, rowids: Sequence[int], keys: Sequence[str], now: float) -> None:
        """Delete delivered records; their keys stay (marked delivered) for the window."""
        if not rowids:
            return
        with self.connection() as conn, conn.transaction():
            self._beat(conn)  # a worker whose every slot is busy still says it lives
            conn.execute("DELETE FROM paygent_pending WHERE id = ANY(%s)", (list(rowids),))
            conn.execute(
                "UPDATE paygent_keys SET delivered = %s WHERE key = ANY(%s)", (now, list(keys))
            )

    def prune_delivered(self, now: float) -> None:
        """Forget keys delivered before the retention window."""
        with self.connection() as conn:
            conn.execute(
                "DELETE FROM paygent_keys WHERE delivered < %s", (now - DELIVERED_KEY_RETENTION,)
            )

    def reschedule(self, items: Sequence[tuple[int, float, str]]) -> None:
        """Count a failed attempt and release the lease, for records this worker holds."""
        if not items:
            return
        with self.connection() as conn:
            conn.execute(
                "UPDATE paygent_pending p SET attempts = p.attempts + 1, next_attempt = u.due,"
                " last_error = u.error, lease_owner = NULL, lease_until = NULL"
                " FROM unnest(%s::bigint[], %s::float8[], %s::text[]) AS u(id, due, error)"
                " WHERE p.id = u.id AND p.lease_owner = %s",
                (*_columns(items), self._link.owner),
            )

    def dead_letter(self, items: Sequence[tuple[int, str, str]], now: float) -> None:
        """Move records this worker holds to the dead letters, with status and reason."""
        if not items:
            return
        with self.connection() as conn:
            conn.execute(
                "WITH moved AS (DELETE FROM paygent_pending p"
                " USING unnest(%s::bigint[], %s::text[], %s::text[]) AS u(id, status, reason)"
                " WHERE p.id = u.id AND p.lease_owner = %s"
                " RETURNING p.key, p.dest, p.body, p.origin, p.created, p.attempts, u.status,"
                " u.reason)"
                " INSERT INTO paygent_dead (key, dest, body, origin, created, died, attempts,"
                " status, reason) SELECT key, dest, body, origin, created, %s, attempts + 1,"
                " status, reason FROM moved ON CONFLICT (key) DO NOTHING",
                (*_columns(items), self._link.owner, now),
            )

    def release(self) -> None:
        """Hand this process's leases back (shutdown); during an outage they expire instead."""
        with contextlib.suppress(SpoolUnavailable), self.connection() as conn:
            conn.execute(
                "UPDATE paygent_pending SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = %s",
                (self._link.owner,),
            )

    def remember_endpoint(self, dest: str, url: str) -> None:
        """Record which URL ``dest`` stands for (status output, ``spool retarget``)."""
        with self.connection() as conn:
            set_endpoint(conn, dest, url)

    # ------------------------------------------------------------------ what people change

    def retarget(self, from_dest: str, to_dest: str, to_url: str) -> tuple[int, int]:
        """File the pending records and dead letters of ``from_dest`` under ``to_dest``;
        pending ones fall due now. Returns (pending moved, dead letters moved)."""
        with self.connection() as conn:
            return retarget_records(conn, from_dest, to_dest, to_url)

    def retry_dead(self, status: str | None = None, keys: Iterable[str] = ()) -> int:
        """Move dead letters back to pending (not invalid ones: they have no payload)."""
        with self.connection() as conn:
            return move_dead_to_pending(conn, status, list(keys))

    def purge(self, what: str) -> int:
        """Delete ``dead`` letters or ``pending`` records (and their keys); returns how many."""
        with self.connection() as conn:
            return purge_table(conn, what)

    def close(self) -> None:
        """Release leases and close the connections and the fallback file, for good: a
        later use raises :class:`~._spool_types.SpoolClosedError`. Idempotent."""
        if self._link.closed:
            return
        try:
            self.release()
        finally:
            super().close()


def open_postgres_spool(url: str, *, max_bytes: int) -> PostgresSpool:
    """The spool the exporters and the bridge use: with the local fallback for outages."""
    fallback = read_setting(OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH)
    return PostgresSpool(
        url, max_bytes=max_bytes, fallback_path=fallback or default_fallback_path()
    )
