"""The PostgreSQL spool's link to its server: pooled connections with the schema in place,
and what an outage does.

After a failed connection, calls fail at once for a pause (or go to the local fallback)
before the server is tried again: an outage costs the application one connect timeout, not
one per export. The outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psycopg

from paygent_otel.delivery.spool.owner import owner_token
from paygent_otel.delivery.spool.pg_pool import ConnectionPool, SpoolUnavailable, describe
from paygent_otel.delivery.spool.schema import check_postgres_schema, migrate_postgres
from paygent_otel.delivery.spool.types import SpoolClosedError
from paygent_otel.delivery.spool.url import SpoolUrl, redact

__all__ = ["OUTAGE_PAUSE_MAX_SECONDS", "OUTAGE_PAUSE_SECONDS", "PgLink"]

_logger = logging.getLogger("paygent_otel.spool")

OUTAGE_PAUSE_SECONDS: Final = 2.0
"""After a failed connection, how long calls fail at once (or go to the fallback) before
the server is tried again. Doubles with each failed try, up to
:data:`OUTAGE_PAUSE_MAX_SECONDS`."""
OUTAGE_PAUSE_MAX_SECONDS: Final = 30.0
"""The longest pause between two tries during an outage."""


class PgLink:
    """Connections to one PostgreSQL spool, its schema, and this process's lease owner."""

    def __init__(
        self, url: SpoolUrl, pool: ConnectionPool, fallback_path: Path | None, *, migrate: bool
    ) -> None:
        """``migrate``: bring the schema up to date at the first connection; else only check
        that it is (a spool opened only to look never changes the database)."""
        self.url = url
        self.migrate = migrate
        self.pool = pool
        self.fallback_path = fallback_path
        self._owner = owner_token()
        self._pid = os.getpid()
        self._schema_ready = False
        self._down_until = 0.0
        self._pause = OUTAGE_PAUSE_SECONDS
        self._outage: str | None = None
        self.closed = False
        """Set by :meth:`close`: a later use raises :class:`SpoolClosedError`."""

    @property
    def owner(self) -> str:
        """Who this process's leases name (a forked child holds no lease of its parent's)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._owner = owner_token()
        return self._owner

    def reason(self, exc: BaseException) -> str:
        """``exc`` in words, the password masked."""
        return redact(describe(exc), self.url.dsn)

    def went_down(self, exc: BaseException) -> None:
        """Start (or lengthen) the pause of an outage; log its start."""
        # A server that drops packets costs a whole connect timeout per try: try less often.
        self._pause = (
            min(self._pause * 2, OUTAGE_PAUSE_MAX_SECONDS) if self._outage else OUTAGE_PAUSE_SECONDS
        )
        self._down_until = time.monotonic() + self._pause
        reason = self.reason(exc)
        if self._outage is None:
            where = (
                f"records go to the local fallback {self.fallback_path} and move to PostgreSQL "
                "once it answers"
                if self.fallback_path is not None
                else "nothing can be stored"
            )
            _logger.error("PostgreSQL spool %s is unreachable (%s); %s", self.url, reason, where)
        self._outage = reason

    def first_contact(self) -> None:
        """Connect once, migrating the schema. Without a fallback, any error is raised as
        :class:`SpoolUnavailable`; with one, it starts an outage (records go there)."""
        try:
            with self.connection():
                pass
        except (SpoolUnavailable, psycopg.Error) as exc:
            # Not only an outage: a user without CREATE rights, a database that is missing.
            error = (
                exc
                if isinstance(exc, SpoolUnavailable)
                else SpoolUnavailable(f"PostgreSQL spool {self.url}: {self.reason(exc)}")
            )
            if self.fallback_path is None:
                raise error from None
            self.went_down(error)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection with the schema in place; :class:`SpoolUnavailable` during an
        outage."""
        if self.closed:  # never connected again behind the caller's back
            raise SpoolClosedError(f"the spool {self.url} is closed")
        owner = self.owner
        if time.monotonic() < self._down_until:
            raise SpoolUnavailable(f"PostgreSQL spool {self.url} is unreachable: {self._outage}")
        try:
            with self.pool.connection() as conn:
                if not self._schema_ready:
                    if self.migrate:
                        migrate_postgres(conn, self.url, owner)
                    else:
                        check_postgres_schema(conn, self.url)
                    self._schema_ready = True
                yield conn
        except SpoolUnavailable as exc:
            self.went_down(exc)
            raise
        except psycopg.OperationalError as exc:
            # A dropped connection or a cancelled statement: the server is gone or stuck.
            self.went_down(exc)
            raise SpoolUnavailable(f"PostgreSQL spool {self.url}: {self.reason(exc)}") from None
        if self._outage is not None:
            _logger.warning("PostgreSQL spool %s answers again", self.url)
            self._outage = None

    def close(self) -> None:
        """Close the idle connections, for good."""
        self.closed = True
        self.pool.close()
