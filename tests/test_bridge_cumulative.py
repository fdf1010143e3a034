"""The cumulative-metric state file: private from its first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from paygent_otel.bridge.cumulative import CumulativeStore


def test_the_state_file_and_its_wal_files_are_private_from_creation(tmp_path: Path) -> None:
    """The state file is created 0600 before SQLite opens it: its WAL and shared-memory files
    take their mode from it, so they are never readable by others (the usual umask 022)."""
    previous = os.umask(0o022)
    try:
        store = CumulativeStore(tmp_path / "state" / "cumulative.sqlite3")
        try:
            store.prune()  # a write: the WAL and shared-memory files exist now
            files = sorted(store.path.parent.glob("cumulative.sqlite3*"))
            names = {f.name.removeprefix("cumulative.sqlite3") for f in files}
            assert {"", "-wal", "-shm"} <= names
            for file in files:
                assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        finally:
            store.close()
    finally:
        os.umask(previous)
