"""Run the sandbox: in a background thread of this process, or as a separate process.

:class:`SandboxServer` is for tests that want the sandbox's counters and faults in reach
(``with SandboxServer(tmp_path / "ledger.sqlite3") as sandbox: ...``). :class:`SandboxProcess`
runs ``python -m paygent_otel.sandbox`` for benchmarks and tests that need the server's CPU
and event loop apart from the client's. Both can be stopped and started again on the same
port and ledger file, which is how tests simulate a Paygent outage.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, Self

import httpx
import uvicorn

from paygent_otel._web.serving import (
    HTTP_IMPLEMENTATION,
    LOOP_IMPLEMENTATION,
    StartStop,
    UvicornThread,
    base_url,
    bind_socket,
)
from paygent_otel.sandbox.app import Faults, SandboxApp
from paygent_otel.sandbox.ledger import Ledger, LedgerWriter

__all__ = [
    "DEFAULT_HOST",
    "HTTP_IMPLEMENTATION",
    "LISTENING_LINE",
    "LOOP_IMPLEMENTATION",
    "SandboxProcess",
    "SandboxServer",
]

_log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
"""Loopback only: the sandbox has no business on other interfaces."""

LISTENING_LINE: Final = re.compile(r"listening on (?P<url>https?://\S+)")
"""The line ``python -m paygent_otel.sandbox`` prints once it accepts connections."""

_GRACEFUL_SHUTDOWN_S = 2
"""How long in-flight requests (say, under injected latency) may finish on stop."""


class SandboxServer(StartStop):
    """The sandbox served by uvicorn in a background thread of this process.

    ``faults`` are :class:`~paygent_otel.sandbox.app.Faults` fields (``latency_ms=50``, ...);
    they survive :meth:`stop` and :meth:`start`. Port 0 picks a free port on the first
    :meth:`start`; later starts reuse it, so :attr:`url` stays the same.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        host: str = DEFAULT_HOST,
        port: int = 0,
        api_key: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_client_ca: str | os.PathLike[str] | None = None,
        page_spools: Sequence[str | os.PathLike[str]] = (),
        **faults: Any,
    ) -> None:
        self.db_path = Path(db_path)
        """The ledger file."""
        self.host = host
        self._port = port
        self._api_key = api_key
        self._tls = _tls_files(tls_cert, tls_key)
        self._client_ca = os.fspath(tls_client_ca) if tls_client_ca else None
        if self._client_ca and not self._tls:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        self._page_spools = [Path(p) for p in page_spools]
        self._faults = Faults().replace(**faults)
        self.ledger = Ledger(self.db_path)
        """Read access to the ledger file (works while running and after stop)."""
        self._app: SandboxApp | None = None
        self._runner: UvicornThread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one once started with port 0)."""
        if self._port == 0:
            raise RuntimeError("port 0 is only resolved by start()")
        return self._port

    @property
    def url(self) -> str:
        """Base URL to give clients, such as ``http://127.0.0.1:40213`` (``https`` with TLS)."""
        return base_url(self.host, self.port, "https" if self._tls else "http")

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._runner is not None and self._runner.alive

    @property
    def faults(self) -> Faults:
        """The fault settings in force (or that the next start will use)."""
        return self._app.faults if self._app is not None else self._faults

    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault settings now (see :meth:`SandboxApp.set_faults`); the new ones."""
        if self._app is not None:
            self._faults = self._app.set_faults(**changes)
        else:
            self._faults = self._faults.replace(**changes)
        return self._faults

    def stats(self) -> dict[str, Any]:
        """Counters since the last :meth:`start` (see :meth:`SandboxApp.stats`)."""
        if self._app is None:
            raise RuntimeError("the sandbox is not running")
        return self._app.stats()

    def start(self, timeout: float = 10.0) -> Self:
        """Open the ledger, bind the port and return once uvicorn accepts connections."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        writer = LedgerWriter(self.db_path)
        try:
            sock = bind_socket(self.host, self._port)
        except BaseException:
            writer.close()
            raise
        self._port = sock.getsockname()[1]
        app = SandboxApp(
            writer, api_key=self._api_key, faults=self._faults, page_spools=self._page_spools
        )
        config = uvicorn.Config(
            app.asgi,
            http=HTTP_IMPLEMENTATION,
            loop=LOOP_IMPLEMENTATION,
            ws="none",
            lifespan="off",
            # Leave the host application's logging alone; uvicorn still logs errors.
            log_config=None,
            log_level="warning",
            access_log=False,
            # Every header costs h11 a validation pass per response, and nothing reads these;
            # no proxy stands in front of a loopback sandbox.
            server_header=False,
            date_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            ssl_certfile=self._tls[0] if self._tls else None,
            ssl_keyfile=self._tls[1] if self._tls else None,
            ssl_ca_certs=self._client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if self._client_ca else ssl.CERT_NONE,
        )
        runner = UvicornThread(config, sock, "paygent-sandbox")
        self._app, self._runner = app, runner
        if not runner.start(timeout):
            self._halt(timeout=1.0)
            sock.close()
            raise RuntimeError(f"the sandbox did not start listening on {self.url}")
        _log.debug("paygent sandbox listening on %s (ledger %s)", self.url, self.db_path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: finish in-flight requests (bounded), close the port and the ledger.

        Idempotent. Blocks at most about ``timeout`` seconds.
        """
        if self._runner is None:
            return
        self._halt(timeout)

    def _halt(self, timeout: float) -> None:
        runner, app = self._runner, self._app
        assert runner is not None and app is not None
        self._faults = app.faults
        if not runner.stop(timeout, 1.0):
            # Closing the ledger under a running loop would break its last requests.
            _log.warning("paygent sandbox thread did not stop; leaving its ledger open")
        else:
            app.writer.close()
        self._app = self._runner = None


class SandboxProcess(StartStop):
    """The sandbox as a child process (``python -m paygent_otel.sandbox``).

    Same constructor as :class:`SandboxServer`. Faults change over HTTP
    (``POST /_sandbox/faults``); the ledger is read from the file as usual.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        host: str = DEFAULT_HOST,
        port: int = 0,
        api_key: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        **faults: Any,
    ) -> None:
        self.db_path = Path(db_path)
        """The ledger file."""
        self.host = host
        self._port = port
        self._api_key = api_key
        self._tls = _tls_files(tls_cert, tls_key)
        self._faults = Faults().replace(**faults)
        self.ledger = Ledger(self.db_path)
        """Read access to the ledger file."""
        self._process: subprocess.Popen[str] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL the child process printed on its listening line."""
        if self._url is None:
            raise RuntimeError("the sandbox process has not been started")
        return self._url

    @property
    def pid(self) -> int:
        """The child's process id."""
        if self._process is None:
            raise RuntimeError("the sandbox process is not running")
        return self._process.pid

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        faults = self._faults
        argv = [
            sys.executable, "-m", "paygent_otel.sandbox",
            "--db", str(self.db_path), "--host", self.host, "--port", str(self._port),
            "--latency-ms", str(faults.latency_ms),
            "--fail-rate", str(faults.fail_rate),
            "--fail-status", str(faults.fail_status),
            "--reject-rate", str(faults.reject_rate),
        ]  # fmt: skip
        if faults.retry_after is not None:
            argv += ["--retry-after", str(faults.retry_after)]
        if faults.seed is not None:
            argv += ["--seed", str(faults.seed)]
        if self._api_key:
            argv += ["--api-key", self._api_key]
        if self._tls:
            argv += ["--tls-cert", self._tls[0], "--tls-key", self._tls[1]]
        return argv

    def start(self, timeout: float = 20.0) -> Self:
        """Start the child and return once it prints its listening line."""
        if self._process is not None:
            raise RuntimeError("the sandbox process is already running")
        process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, text=True, bufsize=1)
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(
            target=_pump, args=(process.stdout, lines), name="paygent-sandbox-stdout", daemon=True
        ).start()
        self._process = process
        deadline = time.monotonic() + timeout
        for line in _lines_until(lines, deadline):
            match = LISTENING_LINE.search(line)
            if match:
                self._url = match["url"]
                self._port = int(self._url.rsplit(":", 1)[1])
                return self
        self.stop(timeout=1.0)
        raise RuntimeError(
            f"the sandbox process did not report listening within {timeout:g} s "
            f"(exit status {process.poll()})"
        )

    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault settings of the running child; returns the new settings."""
        response = httpx.post(f"{self.url}/_sandbox/faults", json=changes, timeout=5.0)
        if response.status_code != 200:
            raise ValueError(response.json()["error"])
        self._faults = Faults(**response.json())
        return self._faults

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the child, SIGKILL it after ``timeout``; its exit status (None if not run)."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return process.returncode


def _tls_files(
    cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None
) -> tuple[str, str] | None:
    """(certificate chain, key) PEM files to serve HTTPS with, or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    return os.fspath(cert), os.fspath(key)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Forward the child's stdout lines; keeps draining so the child never blocks on it."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _lines_until(lines: queue.Queue[str | None], deadline: float) -> Iterator[str]:
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            return
        if line is None:
            return
        yield line
