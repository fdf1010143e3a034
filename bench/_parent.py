"""The parent side: start the sandbox and a child application, follow it, poll the ledger."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from paygent_otel.sandbox import Ledger, SandboxProcess

API_KEY = "bench-key"
"""The key every client sends and the sandbox requires."""
ROOT = Path(__file__).resolve().parent.parent


class ChildFailed(RuntimeError):
    """A child application exited or went silent before it reported what it was asked."""


class Child:
    """One child application: ``python -m bench.<module> '<spec>'`` with piped stdin/stdout."""

    def __init__(self, module: str, spec: dict[str, Any], log: Path) -> None:
        self.module = module
        self._log = log.open("ab")
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"bench.{module}", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            cwd=ROOT,  # ``-m bench.x`` finds this checkout's bench and paygent_otel first
        )

    @property
    def stdout(self) -> IO[str]:
        assert self.process.stdout is not None
        return self.process.stdout

    def expect(self, event: str) -> dict[str, Any]:
        """The next line's JSON, which must be ``event``."""
        line = self.stdout.readline()
        if not line:
            raise ChildFailed(f"bench.{self.module} exited before {event!r}: {self.tail()}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise ChildFailed(f"bench.{self.module}: expected {event!r}, got {message}")
        return message

    def say(self, word: str) -> None:
        """Write one line to the child's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for the child to exit (kill it after ``timeout``)."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def tail(self) -> str:
        """The end of the child's stderr, for error messages."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-2000:]


@contextlib.contextmanager
def sandbox(workdir: Path, name: str, latency_ms: float = 0.0) -> Iterator[SandboxProcess]:
    """A fresh sandbox process (its own ledger file) for one measurement."""
    db = workdir / f"{name}.ledger.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with SandboxProcess(db, api_key=API_KEY, latency_ms=latency_ms) as process:
        yield process


def wait_for_ledger(ledger: Ledger, n: int, timeout: float, poll: float = 0.01) -> float | None:
    """Poll until the ledger holds ``n`` records; the monotonic time it did (None: timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.count() >= n:
            return time.monotonic()
        time.sleep(poll)
    return None
