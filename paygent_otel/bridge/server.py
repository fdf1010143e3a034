"""Serve the bridge with uvicorn; guard every phase of a connection; stop gracefully.

:class:`BridgeServer` runs uvicorn in a background thread of this process (tests, embedding,
and the ``serve`` command, whose main thread waits for signals). Its HTTP protocol is
uvicorn's httptools protocol with the limits of :class:`~.config.Limits` added: the
connection count (:class:`~.guard.ConnectionGuard`), a deadline and a size cap for the
request head (checked before the app, so before authentication), and a minimum rate for the
body, also while a body the app already answered is discarded. uvicorn closes idle
keep-alive connections. Stopping it first *drains* (``/health`` and exports answer 503 for
the drain grace), then closes the listening socket, lets requests in progress finish
(bounded by ``graceful_timeout``), then runs the app's shutdown: pending records are
delivered within the flush timeout and the rest stays in the durable spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from paygent_otel._web.serving import (
    LOOP_IMPLEMENTATION,
    StartStop,
    UvicornThread,
    base_url,
    bind_socket,
    caught_signals,
)
from paygent_otel.bridge.app import CONNECTION_EXTENSION, BridgeApp
from paygent_otel.bridge.config import (
    DEFAULT_DRAIN_GRACE,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HOST,
    Limits,
)

__all__ = [
    "BridgeServer",
    "TlsFiles",
    "bind_socket",
    "keep_large_buffers_returnable",
    "raise_open_file_limit",
    "run_until_signalled",
]

_logger = logging.getLogger("paygent_otel.bridge")


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The bridge's own TLS: certificate chain and key (PEM); optionally the CA whose client
    certificates are required (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A server context: TLS 1.2 or later; client certificates required with a CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the new limit.

    Each connection is a file descriptor: 1024 (a common soft limit) is reached by a
    connection flood long before memory or CPU are.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def keep_large_buffers_returnable() -> None:
    """Tune glibc's malloc so request buffers go back to the system when freed.

    Large blocks (128 KiB and up: bodies, inflated bytes) are always mmapped, so freeing one
    unmaps it and growing one remaps it without a copy; worker threads share two arenas.
    Without this, 16 concurrent gzip bombs under a 48 MiB budget left about 160 MB resident
    (glibc raises its mmap threshold after each large free, then fragments per-thread
    arenas). Other C libraries: nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(_M_ARENA_MAX, 2)


_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_M_ARENA_MAX = -8


def _raw_response(status: int, phrase: str, message: str, extra: str = "") -> bytes:
    body = message.encode("ascii", "replace")
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    ).encode("ascii") + body


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bridge's connection limits.

    Phases: *head* (from the connection's opening, or a request's first byte, to its
    complete head: deadline and size cap), *body* (minimum rate until the body is complete,
    whether the app reads it or has already answered), *busy* (the app works; no timer),
    *idle* (uvicorn's keep-alive timeout). A connection in *head* or *idle* may be evicted
    by a new one when the connection limit is reached.
    """

    app_ref: ClassVar[BridgeApp]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._limits: Limits = self.app_ref.config.limits
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0
        self._body_done = False
        self._body_started = 0.0
        self._body_bytes = 0
        self._closed_reason: dict[object, object] = {}
        guard = self.app_ref.connections
        if not guard.admit(self):
            peer = transport.get_extra_info("peername")
            self.app_ref.refusals_log.log(
                logging.WARNING,
                "max_connections",
                "bridge: refused a connection from %s: %d connections are open and all have "
                "a request in progress (--max-connections)",
                _format_peer(peer),
                guard.open,
            )
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            self.transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    f"too many connections (--max-connections {guard.max_connections})",
                    "retry-after: 1\r\n",
                )
            )
            self.transport.close()
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm(self._limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.app_ref.connections.forget(self)
        if self.flow is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close a connection without a request in progress (to admit a new one)."""
        self._disarm()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused (bad framing, bad request line): counted, and logged
        rate-limited here instead of once per request by uvicorn."""
        self.app_ref.connections.closed["malformed_request"] += 1
        self.app_ref.refusals_log.log(
            logging.WARNING,
            "malformed_request",
            "bridge: answered 400 to a malformed request from %s (%s), connection closed",
            _format_peer(self.client),
            msg,
        )
        super().send_400_response(msg)

    # ---------------------------------------------------------------- timers

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _close_with(self, reason: str, status: int, phrase: str, message: str) -> None:
        """Close the connection for ``reason``; answer ``status`` unless the app answers."""
        self.app_ref.connections.closed[reason] += 1
        self.app_ref.refusals_log.log(
            logging.INFO,
            reason,
            "bridge: closed the connection from %s: %s",
            _format_peer(self.client),
            message,
        )
        cycle = None if self._in_head else self.cycle  # in a head: no cycle of its own yet
        if cycle is None or not cycle.response_started:
            if cycle is not None:
                # The app is waiting for the body: it sees a disconnect, and its answer
                # (none is needed) is not written after this one.
                self._closed_reason["closed"] = reason
                cycle.disconnected = True
                cycle.message_event.set()
            if self._head_bytes or cycle is not None:
                self.transport.write(_raw_response(status, phrase, message))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self._close_with(
                "header_timeout",
                408,
                "Request Timeout",
                f"the request head took longer than {self._limits.header_timeout:g} s "
                "(--header-timeout)",
            )

    def _check_body_rate(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        limits = self._limits
        allowed_until = (
            self._body_started + limits.body_timeout + self._body_bytes / limits.min_body_rate
        )
        now = self.loop.time()
        if now < allowed_until:
            self._arm(allowed_until - now, self._check_body_rate)
            return
        self._close_with(
            "body_timeout",
            408,
            "Request Timeout",
            f"the request body arrived slower than {limits.min_body_rate} bytes/s after "
            f"{limits.body_timeout:g} s (--min-body-rate, --body-timeout)",
        )

    # ---------------------------------------------------------------- phases

    def data_received(self, data: bytes) -> None:
        if self.flow is None:  # refused in connection_made; closing
            return
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # Counted after parsing, so a chunk that completes the head (with some body) is not.
        self._head_bytes += len(data)
        if self._head_bytes > self._limits.max_header_bytes:
            self._close_with(
                "header_too_large",
                431,
                "Request Header Fields Too Large",
                f"the request head exceeds {self._limits.max_header_bytes} bytes "
                "(--max-header-bytes)",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._closed_reason = {}
        self.scope["extensions"] = {CONNECTION_EXTENSION: self._closed_reason}
        if not self._in_head:  # a request after an idle keep-alive: its own head deadline
            self._in_head = True
            self._head_bytes = 0
            self._arm(self._limits.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = self._body_done = False
        self.app_ref.connections.busy(self)
        self._body_started = self.loop.time()
        self._body_bytes = 0
        self._arm(self._limits.body_timeout, self._check_body_rate)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._body_done = True
        answered = self.cycle is not None and self.cycle.response_complete
        super().on_message_complete()
        if answered and not self.transport.is_closing():
            # The app answered before the body ended (a refusal); the rest was discarded.
            # Every byte of it cancelled uvicorn's keep-alive timer: arm it again.
            self._idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.pipeline:
            return
        if self._body_done:
            self._idle()
        else:
            # Answered before its body ended (a refusal): the rest is discarded under the
            # body rate, and nothing is in progress, so the connection may be evicted.
            self.app_ref.connections.waiting(self)

    def _idle(self) -> None:
        self._in_head = False
        self.app_ref.connections.waiting(self)
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "an unknown peer"


class BridgeServer(StartStop):
    """The bridge app served by uvicorn in a background thread."""

    def __init__(
        self,
        app: BridgeApp,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
        tls: TlsFiles | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self.graceful_timeout = graceful_timeout
        self.drain_grace = drain_grace
        """Seconds :meth:`drain` keeps listening (answering 503) before the stop."""
        self.tls = tls
        self._ssl_context = tls.context() if tls is not None else None  # fails early
        self._runner: UvicornThread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one once started with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL for OTLP/HTTP senders (``{url}/v1/traces`` ...)."""
        url = base_url(self.host, self._port)
        return url.replace("http://", "https://", 1) if self.tls is not None else url

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the end of :meth:`stop`."""
        return self._runner is not None and self._runner.alive

    def start(self, timeout: float = 10.0, sock: socket.socket | None = None) -> Self:
        """Bind (unless ``sock`` is given) and return once uvicorn accepts connections."""
        if self._runner is not None:
            raise RuntimeError("the bridge is already running")
        sock = sock or bind_socket(self.host, self._port)
        self._port = sock.getsockname()[1]
        protocol = type("BridgeHttpProtocol", (_GuardedProtocol,), {"app_ref": self.app})
        context = self._ssl_context
        config = uvicorn.Config(
            self.app.asgi,
            http=protocol,
            loop=LOOP_IMPLEMENTATION,
            ws="none",
            lifespan="on",
            log_config=None,
            # uvicorn warns once per malformed request; the protocol logs those rate-limited.
            log_level="error",
            access_log=False,
            timeout_keep_alive=max(1, round(self.app.config.limits.keep_alive_timeout)),
            timeout_graceful_shutdown=self.graceful_timeout,
            ssl_context_factory=None if context is None else lambda _config, _default: context,
        )
        runner = UvicornThread(config, sock, "paygent-bridge")
        self._runner = runner
        if not runner.start(timeout):
            self.stop(1.0)
            sock.close()
            raise RuntimeError(f"the bridge did not start listening on {self.url}")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: no new connections, requests in progress finish, records flushed.

        Blocks at most about ``timeout`` seconds (default: graceful + flush timeouts).
        """
        runner = self._runner
        if runner is None:
            return
        if timeout is None:
            timeout = self.graceful_timeout + self.app.config.flush_timeout + 5.0
        runner.stop(timeout, 2.0)
        self.app.close()  # idempotent; covers a server that never ran its lifespan
        self._runner = None

    def drain(self) -> None:
        """Refuse new usage and answer ``/health`` 503 for the drain grace, then :meth:`stop`."""
        self.app.drain()
        if self.drain_grace > 0 and self.running:
            _logger.info(
                "bridge: draining for %g s (/health answers 503) before closing the listener",
                self.drain_grace,
            )
            time.sleep(self.drain_grace)
        self.stop()

    def force_exit(self) -> None:
        """Cancel the requests still in progress during a stop (a second Ctrl-C)."""
        if self._runner is not None:
            self._runner.force_exit()


def run_until_signalled(server: BridgeServer) -> bool:
    """Wait for SIGINT/SIGTERM in the main thread, then stop ``server`` gracefully.

    SIGTERM drains first (:meth:`BridgeServer.drain`); Ctrl-C stops at once. A second
    signal during the stop cancels the requests still in progress. Returns False
    when the server stopped on its own (it failed) instead of on a signal.
    """

    def on_signal(signum: int, repeated: bool) -> None:
        if repeated:
            server.force_exit()
        _logger.info("bridge: %s received, stopping", signal.Signals(signum).name)

    with caught_signals(on_signal) as signals:
        first = signals.wait(lambda: server.running)
        if first is None:
            _logger.error("bridge: the server stopped unexpectedly")
        if first == signal.SIGTERM:
            server.drain()  # an orchestrator's stop: let load balancers notice first
        else:
            server.stop()
    return signals.signalled
