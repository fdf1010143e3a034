"""Serve the bridge with uvicorn; stop it gracefully.

:class:`BridgeServer` runs uvicorn in a background thread of this process (tests, embedding,
and the ``serve`` command, whose main thread waits for signals). Stopping it closes the
listening socket, lets requests in progress finish (bounded by ``graceful_timeout``), then
runs the app's shutdown: pending records are delivered within the flush timeout and the rest
stays in the durable spool for the next start.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Self

import uvicorn

from .._serving import HTTP_IMPLEMENTATION, LOOP_IMPLEMENTATION, base_url, bind_socket
from .app import BridgeApp
from .config import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_HOST

__all__ = [
    "BridgeServer",
    "bind_socket",
    "run_until_signalled",
]

_logger = logging.getLogger("paygent_otel.bridge")


class BridgeServer:
    """The bridge app served by uvicorn in a background thread."""

    def __init__(
        self,
        app: BridgeApp,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self.graceful_timeout = graceful_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one once started with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL for OTLP/HTTP senders (``{url}/v1/traces`` ...)."""
        return base_url(self.host, self._port)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the end of :meth:`stop`."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0, sock: socket.socket | None = None) -> Self:
        """Bind (unless ``sock`` is given) and return once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the bridge is already running")
        sock = sock or bind_socket(self.host, self._port)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app.asgi,
            http=HTTP_IMPLEMENTATION,
            loop=LOOP_IMPLEMENTATION,
            ws="none",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=self.graceful_timeout,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="paygent-bridge", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop(1.0)
                sock.close()
                raise RuntimeError(f"the bridge did not start listening on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: no new connections, requests in progress finish, records flushed.

        Blocks at most about ``timeout`` seconds (default: graceful + flush timeouts).
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        if timeout is None:
            timeout = self.graceful_timeout + self.app.config.flush_timeout + 5.0
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(2.0)
        self.app.close()  # idempotent; covers a server that never ran its lifespan
        self._server = self._thread = None

    def force_exit(self) -> None:
        """Cancel the requests still in progress during a stop (a second Ctrl-C)."""
        if self._server is not None:
            self._server.force_exit = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_until_signalled(server: BridgeServer) -> bool:
    """Wait for SIGINT/SIGTERM in the main thread, then stop ``server`` gracefully.

    A second signal during the stop cancels the requests still in progress. Returns False
    when the server stopped on its own (it failed) instead of on a signal.
    """
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        if stop.is_set():
            server.force_exit()
        stop.set()
        _logger.info("bridge: %s received, stopping", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # A timed wait returns to the interpreter regularly, where signal handlers run.
        while not stop.wait(0.5):
            if not server.running:
                _logger.error("bridge: the server stopped unexpectedly")
                break
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stop.is_set()
