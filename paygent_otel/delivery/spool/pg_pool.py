"""The PostgreSQL spool's connections: a small pool per process, each connection with a
connect timeout and a statement timeout, so a slow or unreachable server costs a bounded
wait; the password never appears in an error (:func:`~._spool_url.redact`)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Final

import psycopg

from paygent_otel.delivery.forking import register_at_fork_once
from paygent_otel.delivery.spool.url import SpoolUrl, redact

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "STATEMENT_TIMEOUT_MS",
    "ConnectionPool",
    "SpoolUnavailable",
    "describe",
]

DEFAULT_POOL_SIZE: Final = 4
"""Connections one process opens at most (the application's exports, the delivery worker,
the bridge's cumulative-metric state); a caller past it waits up to the connect timeout."""
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
"""Seconds a connection attempt may take before the server counts as unreachable."""
STATEMENT_TIMEOUT_MS: Final = 5000
"""Milliseconds one statement may run (``statement_timeout``) before it is cancelled."""


class SpoolUnavailable(OSError):
    """The PostgreSQL server cannot be reached (or the URL cannot be used); the message says
    why, with the password masked."""


def describe(exc: BaseException) -> str:
    # libpq's messages name host, port, user and database, never the password.
    return f"{type(exc).__name__}: {str(exc).strip()}"


_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork()


class ConnectionPool:
    """At most ``size`` autocommit connections, reused; broken ones are dropped.

    A forked child starts with no connection: the parent's sockets are not used (psycopg
    does not close a connection garbage-collected in another process).
    """

    def __init__(self, url: SpoolUrl, size: int, connect_timeout: float) -> None:
        self.url = url
        self.size = size
        self.connect_timeout = connect_timeout
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self.opened = 0
        """Connections opened by this process (for tests and status)."""
        register_at_fork_once("postgres-pools", after_in_child=_after_fork_in_child)
        _live_pools.add(self)

    def _after_fork(self) -> None:
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.size)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.url.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
            )
        except psycopg.Error as exc:
            reason = redact(describe(exc), self.url.dsn)
            raise SpoolUnavailable(f"cannot connect to {self.url}: {reason}") from None
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        self.opened += 1
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one unit of work; back to the pool afterwards unless broken."""
        slots = self._slots
        if not slots.acquire(timeout=self.connect_timeout):
            raise SpoolUnavailable(
                f"all {self.size} connections to {self.url} are busy (waited "
                f"{self.connect_timeout:g} s)"
            )
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            try:
                yield conn
            finally:
                if not conn.closed and not conn.broken:
                    with self._lock:
                        self._idle.append(conn)
        finally:
            slots.release()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error):
                conn.close()
