"""What a PostgreSQL spool holds, read without changing it: counts (the local fallback's
included), statuses per endpoint, dead letters and where given keys are."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypedDict, Unpack

import psycopg

from paygent_otel.delivery.spool.keys import dead_letter_of, endpoint_statuses, merged_stats
from paygent_otel.delivery.spool.pg_fallback import BATCH, Fallback
from paygent_otel.delivery.spool.pg_link import PgLink
from paygent_otel.delivery.spool.pg_pool import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_SIZE,
    ConnectionPool,
    SpoolUnavailable,
)
from paygent_otel.delivery.spool.types import DeadLetter, EndpointStatus, SpoolStats
from paygent_otel.delivery.spool.url import SpoolUrl

__all__ = ["PgOptions", "PostgresSpoolView"]

_TABLES: Final = ("paygent_pending", "paygent_dead", "paygent_keys")


class PgOptions(TypedDict, total=False):
    """How to reach a PostgreSQL spool, besides its URL."""

    fallback_path: str | os.PathLike[str] | None
    """The local SQLite file records go to while the server cannot be reached (None: the
    error is raised instead)."""
    pool_size: int
    """Connections this process opens at most (:data:`~._spool_pg_pool.DEFAULT_POOL_SIZE`)."""
    connect_timeout: float
    """Seconds a connection attempt may take
    (:data:`~._spool_pg_pool.DEFAULT_CONNECT_TIMEOUT`)."""


class PostgresSpoolView:
    """The read side of a PostgreSQL spool; opened on its own (``open_spool(url,
    readonly=True)``), it never changes the database: no migration, no lease released."""

    durable = True
    _migrates = False
    """Whether opening brings the schema up to date (the writing spool's job)."""

    def __init__(self, url: str, *, max_bytes: int, **options: Unpack[PgOptions]) -> None:
        """Connect (and, for a :class:`~._spool_pg.PostgresSpool`, migrate the schema)."""
        fallback_path = options.get("fallback_path")
        pool_size = options.get("pool_size", DEFAULT_POOL_SIZE)
        connect_timeout = options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        self.url = SpoolUrl(url)
        self.path = self.url
        """What status output and log lines show: the URL, password masked."""
        self.max_bytes = max_bytes
        self.pool = ConnectionPool(self.url, pool_size, connect_timeout)
        """The process's connections to the server (shared with the cumulative-metric state)."""
        self.fallback_path = Path(fallback_path) if fallback_path is not None else None
        self._link = PgLink(self.url, self.pool, self.fallback_path, migrate=self._migrates)
        self._size_cache = (0.0, 0)
        self._last_pending = 0
        self._last_stats = SpoolStats(0, 0, 0, None, 0)
        self._link.first_contact()
        self._fallback = Fallback(self.fallback_path, max_bytes)

    def close(self) -> None:
        """Close the connections and the fallback file, for good. Idempotent."""
        if not self._link.closed:
            self._link.close()
            self._fallback.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.url)!r})"

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection with the schema in place (also for the bridge's cumulative
        state); :class:`SpoolUnavailable` during an outage."""
        with self._link.connection() as conn:
            yield conn

    def size_bytes(self) -> int:
        """Bytes the spool's tables take (with indexes and TOAST); cached for a second."""
        at, size = self._size_cache
        if time.monotonic() - at < 1.0:
            return size
        with self.connection() as conn:
            row = conn.execute(
                "SELECT " + " + ".join(f"pg_total_relation_size('{t}')" for t in _TABLES)
            ).fetchone()
        size = int(row[0]) if row else 0
        self._size_cache = (time.monotonic(), size)
        return size

    def pending(self, dest: str | None = None) -> int:
        """Records waiting, the fallback's included. Never raises: during an outage, the
        last count PostgreSQL gave plus the fallback's."""
        fallback = self._fallback.spool
        local = fallback.pending(dest) if fallback is not None else 0
        try:
            with self.connection() as conn:
                if dest is None:
                    row = conn.execute("SELECT count(*) FROM paygent_pending").fetchone()
                else:
                    row = conn.execute(
                        "SELECT count(*) FROM paygent_pending WHERE dest = %s", (dest,)
                    ).fetchone()
            self._last_pending = int(row[0]) if row else 0
        except SpoolUnavailable:
            pass
        return self._last_pending + local

    def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are pending, dead, or delivered within the retention window."""
        found: set[str] = set()
        with self.connection() as conn:
            for start in range(0, len(keys), BATCH):
                rows = conn.execute(
                    "SELECT key FROM paygent_keys WHERE key = ANY(%s)",
                    (list(keys[start : start + BATCH]),),
                )
                found.update(key for (key,) in rows)
        return found

    def stats(self) -> SpoolStats:
        """Counts for ``spool status`` and the self-metrics, the fallback's included. With a
        fallback it never raises: during an outage, the last counts PostgreSQL gave."""
        now = time.time()
        try:
            with self.connection() as conn:
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE lease_until >= %s), min(created),"
                    " (SELECT count(*) FROM paygent_dead) FROM paygent_pending",
                    (now,),
                ).fetchone()
            assert row is not None
            self._last_stats = SpoolStats.at(now, row[:3], row[3], self.size_bytes())
        except SpoolUnavailable:
            if self._fallback.path is None:
                raise
        fallback = self._fallback.spool
        if fallback is None:
            return self._last_stats
        return merged_stats(self._last_stats, fallback.stats())

    def endpoints(self) -> list[EndpointStatus]:
        """Pending and dead records per destination, with the last error and next attempt."""
        now = time.time()
        with self.connection() as conn:
            urls = dict(conn.execute("SELECT dest, url FROM paygent_endpoints").fetchall())
            dead = dict(
                conn.execute(
                    "SELECT dest, count(*) FROM paygent_dead WHERE dest != '' GROUP BY dest"
                ).fetchall()
            )
            pending = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT dest, count(*), count(*) FILTER (WHERE lease_until >= %s),"
                    " min(created), min(next_attempt), (array_agg(last_error ORDER BY attempts"
                    " DESC, id DESC) FILTER (WHERE last_error IS NOT NULL))[1]"
                    " FROM paygent_pending GROUP BY dest",
                    (now,),
                ).fetchall()
            }
        return endpoint_statuses(urls, pending, dead, now)

    def key_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Where each of ``keys`` is: ``pending``, ``delivered``, ``dead`` (absent: unknown)."""
        states: dict[str, str] = {}
        wanted = list(keys)
        with self.connection() as conn:
            for sql, state in (
                ("SELECT key FROM paygent_keys WHERE key = ANY(%s) AND delivered IS NOT NULL",
                 "delivered"),
                ("SELECT key FROM paygent_dead WHERE key = ANY(%s)", "dead"),
                ("SELECT key FROM paygent_pending WHERE key = ANY(%s)", "pending"),
            ):  # fmt: skip
                states.update((key, state) for (key,) in conn.execute(sql, (wanted,)))
        return states

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters there are of each status."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM paygent_dead GROUP BY status ORDER BY status"
            ).fetchall()
        return {status: int(n) for status, n in rows}

    def dead_letters(self, limit: int = 100, status: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first, optionally only those with one status."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT id, key, status, reason, died, attempts, origin, body FROM paygent_dead"
                " WHERE %s::text IS NULL OR status = %s ORDER BY died DESC, id DESC LIMIT %s",
                (status, status, limit),
            ).fetchall()
        return [dead_letter_of(r) for r in rows]
