"""The commands that only look at a spool change nothing in it: ``spool status``, ``spool
dead``, ``spool audit``, ``doctor`` and ``reconcile`` open it read-only (no ``opened``
mark, no mode change, no lease taken back, no table added), on a spool file, an empty
file, a file an earlier version wrote, and a sandbox ledger."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import API_KEY, stt_usage

from paygent_otel._cli.main import main
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery.spool import SqliteSpool, open_spool
from paygent_otel.sandbox.ledger import LedgerWriter

LOOKING = [
    pytest.param(["spool", "status"], id="spool status"),
    pytest.param(["spool", "status", "--json"], id="spool status --json"),
    pytest.param(["spool", "dead"], id="spool dead"),
    pytest.param(["spool", "audit"], id="spool audit"),
    pytest.param(["reconcile"], id="reconcile"),
    pytest.param(["doctor", "--endpoint", "http://127.0.0.1:1", "--timeout", "1s"], id="doctor"),
]


def usage(i: int) -> UsageRecord:
    return stt_usage(f"key-{i:03d}", 1.0 + i, f"span transcribe #{i}")


def state(path: Path) -> tuple[list[str], int, list[str]]:
    """Everything a reader could change: the content (WAL included), the mode, the files."""
    with sqlite3.connect(path) as db:
        dump = list(db.iterdump())
    db.close()
    mode = stat.S_IMODE(path.stat().st_mode)
    return dump, mode, sorted(p.name for p in path.parent.iterdir() if p.suffix != ".lock")


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def look(argv: list[str], path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    main([*argv, "--spool", str(path)])


@pytest.fixture
def spool_file(tmp_path: Path) -> Path:
    """A spool with a pending record leased by a process that died, a dead letter, and a
    mode the writers would tighten."""
    path = tmp_path / "spool" / "spool.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add("dest-a", [usage(i) for i in range(3)])
    leased = spool.lease("dest-a", 2, time.time())
    spool.dead_letter([(leased[0].rowid, "400", "customerId: unknown")], time.time())
    spool.close()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE pending SET lease_owner = ?, lease_until = ? WHERE id = ?",
            (f"{socket.gethostname()}:{dead_pid()}:0000:0000", time.time() + 60, leased[1].rowid),
        )
    db.close()
    path.chmod(0o640)
    return path


@pytest.mark.parametrize("argv", LOOKING)
def test_a_command_that_looks_changes_nothing_in_the_spool(
    argv: list[str], spool_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = state(spool_file)

    look(argv, spool_file, monkeypatch)

    assert state(spool_file) == before  # no mark, no lease taken back, mode still 0640


def test_doctor_changes_nothing_in_a_private_spool(
    spool_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool_file.chmod(0o600)  # else the check fails on the mode before it reads the file
    before = state(spool_file)

    look(["doctor", "--endpoint", "http://127.0.0.1:1", "--timeout", "1s"], spool_file, monkeypatch)

    assert state(spool_file) == before


@pytest.mark.parametrize("argv", LOOKING)
def test_a_command_that_looks_adds_no_table_to_an_empty_file(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch(mode=0o600)

    look(argv, path, monkeypatch)

    assert path.stat().st_size == 0


@pytest.mark.parametrize("argv", LOOKING)
def test_a_command_that_looks_adds_no_table_to_a_sandbox_ledger(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.sqlite3"
    LedgerWriter(path).close()
    path.chmod(0o600)
    before = state(path)

    look(argv, path, monkeypatch)

    assert state(path) == before


def test_an_older_spool_file_is_read_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file written before the journal, the audit and the endpoints tables existed: read
    without adding them (its journal is computed as a writer would first fill it)."""
    path = tmp_path / "old.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add("dest-a", [usage(i) for i in range(2)])
    spool.close()
    with sqlite3.connect(path) as db:
        db.executescript("DROP TABLE journal; DROP TABLE audit; DROP TABLE endpoints;")
    db.close()
    before = state(path)

    look(["reconcile", "--json"], path, monkeypatch)
    assert '"balanced": true' in capsys.readouterr().out
    look(["spool", "status"], path, monkeypatch)
    assert "pending         2" in capsys.readouterr().out
    assert state(path) == before


def test_open_spool_readonly_reads_and_refuses_what_is_not_a_spool(
    spool_file: Path, tmp_path: Path
) -> None:
    before = state(spool_file)
    view = open_spool(str(spool_file), max_bytes=1 << 30, readonly=True)
    assert (view.pending(), view.dead_letter_counts()) == (2, {"400": 1})
    view.close()
    assert state(spool_file) == before
    with pytest.raises(FileNotFoundError):
        open_spool(str(tmp_path / "missing.sqlite3"), max_bytes=1, readonly=True)
    LedgerWriter(tmp_path / "ledger.sqlite3").close()
    with pytest.raises(ValueError, match="sandbox ledger"):
        open_spool(str(tmp_path / "ledger.sqlite3"), max_bytes=1, readonly=True)
    with pytest.raises(ValueError, match="in-memory"):
        open_spool(":memory:", max_bytes=1, readonly=True)
    assert not os.path.exists(tmp_path / "missing.sqlite3")
