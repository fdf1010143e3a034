"""``paygent-otel spool status|dead|retry|purge`` on real spool files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import stt_usage

from paygent_otel._cli.main import main
from paygent_otel.convention.mapping import Rejection, RejectReason, UsageRecord
from paygent_otel.delivery.config import default_spool_path
from paygent_otel.delivery.spool import SqliteSpool

DEST = "dest-a"


def usage(i: int) -> UsageRecord:
    return stt_usage(f"key-{i:03d}", 1.0 + i, f"span transcribe #{i}")


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    """A spool with 5 pending records (1 of them in flight) and 3 dead letters.

    Dead letters: key-005 (400), key-006 (422), and one invalid record.
    """
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add(DEST, [usage(i) for i in range(7)])
    now = time.time()
    leased = {i.key: i for i in spool.lease(DEST, 7, now)}
    spool.dead_letter(
        [(leased["key-005"].rowid, "400", '{"error":"customerId: unknown"}'),
         (leased["key-006"].rowid, "422", '{"error":"plan: unknown plan"}')],
        now,
    )  # fmt: skip
    spool.reschedule([(leased[f"key-00{i}"].rowid, now, "HTTP 503") for i in range(1, 5)])
    spool.add_rejected(
        [Rejection(RejectReason.INVALID, "usage record from span x rejected: paygent.model is "
                   "missing", "span x", "bad-001", {"paygent.usage.kind": "stt"})]
    )  # fmt: skip
    # key-000 stays leased by this worker: "in flight". Not closed, so the lease is held.
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["spool", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_counts_pending_in_flight_dead_age_and_size(
    spool_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--spool", str(spool_path))

    assert code == 0
    assert f"spool           {spool_path}" in out
    assert "pending         5 (1 being sent now)" in out
    assert "dead letters    3 (400: 1, 422: 1, invalid: 1)" in out
    assert "oldest pending  " in out and " s ago" in out
    assert "KiB used" in out
    assert "paygent-otel spool dead" in out  # where to look next


def test_status_as_json(spool_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--spool", str(spool_path), "--json")

    status = json.loads(out)
    assert code == 0
    assert status["spool"] == str(spool_path)
    assert (status["pending"], status["in_flight"], status["dead_letters"]) == (5, 1, 3)
    assert status["dead_letters_by_status"] == {"400": 1, "422": 1, "invalid": 1}
    assert status["oldest_pending_age_seconds"] >= 0
    assert 0 < status["size_bytes"] <= status["file_bytes"]


def test_the_default_spool_is_the_exporters_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # conftest points XDG_STATE_HOME into tmp_path, where the exporters put their spool.
    default = tmp_path / "state" / "paygent-otel" / "spool.sqlite3"
    SqliteSpool(default, max_bytes=1 << 30).add(DEST, [usage(1)])

    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["spool"] == str(default)
    assert json.loads(out)["pending"] == 1

    elsewhere = tmp_path / "configured.sqlite3"
    SqliteSpool(elsewhere, max_bytes=1 << 30).add(DEST, [usage(1), usage(2)])
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_SPOOL_PATH", str(elsewhere))
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["spool"] == str(elsewhere)
    assert json.loads(out)["pending"] == 2


def test_a_missing_spool_is_reported_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "spool.sqlite3"

    for sub in ("status", "dead", "retry", "purge"):
        code, _, err = run(capsys, sub, "--spool", str(missing))
        assert code == 1 and f"no spool at {missing}" in err, sub
    assert not missing.parent.exists()


def test_memory_mode_has_no_spool_to_look_into(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_SPOOL_PATH", ":memory:")

    code, _, err = run(capsys, "status")

    assert code == 1 and "in memory" in err


def test_dead_lists_reasons_newest_first(
    spool_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "dead", "--spool", str(spool_path))

    assert code == 0
    assert out.startswith(f"3 dead letters in {spool_path}:")
    assert "400      attempts 1  key key-005" in out
    assert 'reason: {"error":"customerId: unknown"}' in out
    assert "from:   span transcribe #6" in out
    assert "reason: usage record from span x rejected: paygent.model is missing" in out


def test_dead_filters_by_status_and_limits(
    spool_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "dead", "--spool", str(spool_path), "--status", "422")
    assert code == 0 and "key-006" in out and "key-005" not in out

    _, out, _ = run(capsys, "dead", "--spool", str(spool_path), "--limit", "1")
    assert out.startswith("3 dead letters") and "showing the newest 1" in out
    assert out.count("attempts") == 1

    _, out, _ = run(capsys, "dead", "--spool", str(spool_path), "--status", "404")
    assert out.strip() == f"no dead letters with status 404 in {spool_path}"


def test_dead_as_json_carries_the_bodies(
    spool_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "dead", "--spool", str(spool_path), "--json", "--limit", "0")

    letters = {d["key"]: d for d in json.loads(out)}
    assert code == 0 and letters.keys() == {"key-005", "key-006", "bad-001"}
    assert letters["key-005"]["body"] == usage(5).payload
    assert letters["key-005"]["status"] == "400" and letters["key-005"]["attempts"] == 1
    assert letters["bad-001"]["body"] == {"paygent.usage.kind": "stt"}
    assert letters["key-006"]["died"].endswith("Z")


def test_retry_moves_dead_letters_back_but_never_invalid_ones(
    spool_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "retry", "--spool", str(spool_path), "--status", "422")
    assert code == 0 and out.startswith("1 dead letters moved back to pending")

    code, out, _ = run(capsys, "retry", "--spool", str(spool_path))
    assert code == 0 and out.startswith("1 dead letters moved back to pending")

    code, out, _ = run(capsys, "retry", "--spool", str(spool_path))
    assert code == 0 and out.startswith("no dead letters to retry")
    spool = SqliteSpool(spool_path, max_bytes=1 << 30)
    assert spool.pending() == 7
    assert [d.key for d in spool.dead_letters()] == ["bad-001"]
    spool.close()


def test_retry_by_key(spool_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "retry", "--spool", str(spool_path), "--key", "key-006")

    assert code == 0 and out.startswith("1 dead letters")
    spool = SqliteSpool(spool_path, max_bytes=1 << 30)
    assert sorted(d.key for d in spool.dead_letters()) == ["bad-001", "key-005"]
    spool.close()


def test_purge_asks_first_and_deletes_only_on_yes(
    spool_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, _ = run(capsys, "purge", "--spool", str(spool_path))
    assert code == 1 and "Delete 3 dead letters" in out and "nothing deleted" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal, no answer: no
    assert run(capsys, "purge", "--spool", str(spool_path))[0] == 1

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, out, _ = run(capsys, "purge", "--spool", str(spool_path))
    assert code == 0 and f"deleted 3 dead letters from {spool_path}" in out
    spool = SqliteSpool(spool_path, max_bytes=1 << 30)
    assert spool.stats().dead_letters == 0 and spool.pending() == 5  # pending untouched
    spool.close()


def test_purge_pending_with_yes_asks_nothing(
    spool_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    code, out, _ = run(capsys, "purge", "--spool", str(spool_path), "--pending", "--yes")

    assert code == 0 and "deleted 5 usage records waiting for delivery" in out
    assert "[y/N]" not in out
    spool = SqliteSpool(spool_path, max_bytes=1 << 30)
    assert spool.pending() == 0 and spool.stats().dead_letters == 3
    spool.close()
    code, out, _ = run(capsys, "purge", "--spool", str(spool_path), "--pending", "--yes")
    assert code == 0 and "nothing to delete" in out


@pytest.mark.parametrize("sub", ["status", "dead", "retry", "purge"])
def test_every_subcommand_explains_itself(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["spool", sub, "--help"])

    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--spool PATH" in out and "OTEL_EXPORTER_PAYGENT_SPOOL_PATH" in out
    # The actual default path, spelled out (argparse may wrap it anywhere).
    assert str(default_spool_path()) in "".join(out.split())


def test_the_installed_command_runs_the_spool_commands(spool_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", "spool", "status", "--spool",
         str(spool_path), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dead_letters"] == 3
