"""What the sandbox and the bridge share to serve HTTP with uvicorn in a thread.

One way to run uvicorn in a background thread and stop it (:class:`UvicornThread`), and one
way for a foreground command to wait for SIGINT/SIGTERM (:func:`caught_signals`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "HTTP_IMPLEMENTATION",
    "LOOP_IMPLEMENTATION",
    "SignalWait",
    "StartStop",
    "UvicornThread",
    "base_url",
    "bind_socket",
    "caught_signals",
]

HTTP_IMPLEMENTATION: Final = "httptools" if importlib.util.find_spec("httptools") else "h11"
"""The sandbox's uvicorn HTTP parser: httptools (the ``server`` extra) when installed, h11
otherwise (far slower: bench/README.md). The bridge always uses httptools, through its own
guarded protocol (``bridge/server.py``)."""

LOOP_IMPLEMENTATION: Final = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
"""uvicorn's event loop: uvloop when installed."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets copy it from this one. Without it, Nagle holds each response body
    # for the client's delayed ACK: 40 ms per request on a keep-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # A restarted server takes its port back while old connections are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def base_url(host: str, port: int, scheme: str = "http") -> str:
    """``http://host:port`` (or ``https``), with brackets around an IPv6 address."""
    host = host.strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"


class StartStop:
    """Mixin of the servers: ``with Server(...) as server:`` starts it, and stops it after."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class UvicornThread:
    """uvicorn serving ``sock`` in a daemon thread of this process (named ``name``)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, name: str) -> None:
        import uvicorn  # the server extra

        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name=name, daemon=True
        )

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self.thread.is_alive()

    def start(self, timeout: float) -> bool:
        """Start the thread; True once uvicorn accepts connections, False if it stopped or
        did not within ``timeout`` seconds (then :meth:`stop` it)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float | None, force_timeout: float) -> bool:
        """Stop gracefully within ``timeout``, then cancel what is left (``force_timeout``
        more); True when the thread ended."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(force_timeout)
        return not self.thread.is_alive()

    def force_exit(self) -> None:
        """Cancel the requests still in progress during a stop."""
        self.server.force_exit = True


class SignalWait:
    """SIGINT and SIGTERM as they arrive, while :func:`caught_signals` is in force."""

    def __init__(self, on_signal: Callable[[int, bool], None] | None) -> None:
        self._on_signal = on_signal
        self._stop = threading.Event()
        self._received: list[int] = []

    def handle(self, signum: int, _: FrameType | None) -> None:
        repeated = self._stop.is_set()
        self._received.append(signum)
        self._stop.set()
        if self._on_signal is not None:
            self._on_signal(signum, repeated)

    @property
    def signalled(self) -> bool:
        """True once a signal was received."""
        return self._stop.is_set()

    def wait(self, alive: Callable[[], bool] | None = None) -> int | None:
        """The first signal received; None when ``alive()`` turned false first (checked
        every half second)."""
        # A timed wait returns to the interpreter regularly, where signal handlers run.
        while not self._stop.wait(0.5):
            if alive is not None and not alive():
                return None
        return self._received[0]


@contextlib.contextmanager
def caught_signals(
    on_signal: Callable[[int, bool], None] | None = None,
) -> Iterator[SignalWait]:
    """SIGINT and SIGTERM caught in the main thread until the block ends (a stop made in it
    still sees a second signal); the previous handlers are back after it.

    ``on_signal(signum, repeated)`` runs in the handler for every signal (``repeated`` from
    the second on).
    """
    waiter = SignalWait(on_signal)
    previous = {sig: signal.signal(sig, waiter.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield waiter
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
