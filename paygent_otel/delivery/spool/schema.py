"""The spool's tables and their versioned migrations, for SQLite and PostgreSQL.

SQLite: the version is the file's ``PRAGMA user_version``. A file an earlier version wrote
(version 0, before the schema was numbered) is brought up to date by the same migrations,
which only add what is missing; a file newer than this version understands is refused.

PostgreSQL: the schema is versioned (``paygent_schema_version``, one row per migration
applied, when and by whom) and migrated under an advisory lock by the first process that
opens the database; a database newer than this version understands is refused.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from paygent_otel.delivery.spool import journal as _journal

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "PG_SCHEMA_VERSION",
    "SQLITE_SCHEMA",
    "SQLITE_SCHEMA_VERSION",
    "check_postgres_schema",
    "migrate_postgres",
    "migrate_sqlite",
    "sqlite_schema_version",
]

_logger = logging.getLogger("paygent_otel.spool")

_SQLITE_RECORD: Final = """
    key TEXT NOT NULL UNIQUE,
    dest TEXT NOT NULL,
    body BLOB NOT NULL,
    origin TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0"""
"""The columns a pending record and a dead letter share."""

SQLITE_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,{_SQLITE_RECORD},
    next_attempt REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (dest, next_attempt);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY,{_SQLITE_RECORD},
    died REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_at ON delivered (at);
CREATE TABLE IF NOT EXISTS endpoints (
    dest TEXT PRIMARY KEY,
    url TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""

SQLITE_SCHEMA_VERSION: Final = 2
"""The newest SQLite schema this version creates and understands: 1, the records, dead
letters, delivered keys, endpoints and meta tables; 2, the journal and audit tables."""


def sqlite_schema_version(conn: sqlite3.Connection, where: object) -> int:
    """The schema version of the file behind ``conn`` (named ``where`` in messages);
    :class:`sqlite3.DatabaseError` if it is newer than this version understands."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SQLITE_SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"the spool schema in {where} is version {version}, newer than this "
            f"paygent-otel understands ({SQLITE_SCHEMA_VERSION}): upgrade paygent-otel"
        )
    return int(version)


def migrate_sqlite(conn: sqlite3.Connection, where: object) -> None:
    """Bring the file behind ``conn`` to :data:`SQLITE_SCHEMA_VERSION` (nothing to do when
    it is there: a file is migrated once, not at every open)."""
    migrations: tuple[tuple[int, Callable[[sqlite3.Connection], object]], ...] = (
        (1, lambda c: c.executescript(SQLITE_SCHEMA)),
        (2, _journal.create),  # records a file already holds are journaled as recorded
    )
    current = sqlite_schema_version(conn, where)
    if current >= SQLITE_SCHEMA_VERSION:
        return
    for version, migrate in migrations:
        if version > current:
            migrate(conn)
    conn.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION}")
    if current:
        _logger.info("spool %s: schema migrated to version %d", where, SQLITE_SCHEMA_VERSION)


PG_SCHEMA_VERSION: Final = 2
"""The newest PostgreSQL schema this version creates and understands."""
_MIGRATION_LOCK: Final = 0x7061_7967  # "payg": one advisory lock id for migrations
_PG_RECORD: Final = """
            key text NOT NULL UNIQUE,
            dest text NOT NULL,
            body bytea NOT NULL,
            origin text NOT NULL DEFAULT '',
            created double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0"""
"""The columns a pending record and a dead letter share."""
_PG_MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        f"""
        CREATE TABLE paygent_keys (
            key text PRIMARY KEY,
            delivered double precision
        );
        CREATE INDEX paygent_keys_delivered ON paygent_keys (delivered)
            WHERE delivered IS NOT NULL;
        CREATE TABLE paygent_pending (
            id bigserial PRIMARY KEY,{_PG_RECORD},
            next_attempt double precision NOT NULL,
            lease_owner text,
            lease_until double precision,
            last_error text
        );
        CREATE INDEX paygent_pending_due ON paygent_pending (dest, next_attempt);
        CREATE INDEX paygent_pending_owner ON paygent_pending (lease_owner)
            WHERE lease_owner IS NOT NULL;
        CREATE TABLE paygent_dead (
            id bigserial PRIMARY KEY,{_PG_RECORD},
            died double precision NOT NULL,
            status text NOT NULL,
            reason text NOT NULL
        );
        CREATE TABLE paygent_streams (
            stream text PRIMARY KEY,
            start_ns bigint NOT NULL,
            time_ns bigint NOT NULL,
            int_value bigint,
            float_value double precision,
            updated double precision NOT NULL
        );
        CREATE TABLE paygent_stream_journal (
            batch text NOT NULL,
            stream text NOT NULL,
            start_ns bigint NOT NULL,
            time_ns bigint NOT NULL,
            int_value bigint,
            float_value double precision,
            PRIMARY KEY (batch, stream)
        );
        CREATE TABLE paygent_stream_journal_keys (
            batch text NOT NULL,
            key text NOT NULL,
            PRIMARY KEY (batch, key)
        );
        """,
    ),
    (
        2,
        """
        CREATE TABLE paygent_endpoints (
            dest text PRIMARY KEY,
            url text NOT NULL
        );
        """,
    ),
)


def migrate_postgres(conn: psycopg.Connection[Any], where: str, owner: str) -> None:
    """Bring the schema of the database behind ``conn`` (named ``where`` in messages) to
    :data:`PG_SCHEMA_VERSION`; ``owner`` is recorded as who applied each migration.

    :class:`~._spool_pg_pool.SpoolUnavailable` when the database is newer than this version.
    """
    from paygent_otel.delivery.spool.pg_pool import SpoolUnavailable

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS paygent_schema_version ("
            " version integer PRIMARY KEY, applied double precision NOT NULL,"
            " applied_by text NOT NULL)"
        )
        row = conn.execute("SELECT max(version) FROM paygent_schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > PG_SCHEMA_VERSION:
            raise SpoolUnavailable(
                f"the spool schema in {where} is version {current}, newer than this "
                f"paygent-otel understands ({PG_SCHEMA_VERSION}): upgrade paygent-otel"
            )
        for version, sql in _PG_MIGRATIONS:
            if version > current:
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO paygent_schema_version VALUES (%s, %s, %s)",
                    (version, time.time(), owner),
                )
                _logger.info("spool %s: schema migrated to version %d", where, version)


def check_postgres_schema(conn: psycopg.Connection[Any], where: str) -> None:
    """Raise :class:`~._spool_pg_pool.SpoolUnavailable` unless the database behind ``conn``
    holds a spool of exactly :data:`PG_SCHEMA_VERSION`; changes nothing."""
    from paygent_otel.delivery.spool.pg_pool import SpoolUnavailable

    current = 0
    exists = conn.execute("SELECT to_regclass('paygent_schema_version') IS NOT NULL").fetchone()
    if exists and exists[0]:
        row = conn.execute("SELECT max(version) FROM paygent_schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
    if current == PG_SCHEMA_VERSION:
        return
    if current == 0:
        raise SpoolUnavailable(f"{where} holds no paygent-otel spool (no spool tables)")
    raise SpoolUnavailable(
        f"the spool schema in {where} is version {current}, and this paygent-otel reads "
        f"version {PG_SCHEMA_VERSION}: "
        + (
            "upgrade paygent-otel"
            if current > PG_SCHEMA_VERSION
            else "a process that writes to it (an exporter, `paygent-otel serve`) migrates it"
        )
    )
