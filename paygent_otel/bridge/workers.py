"""``serve --workers N``: N bridge processes accepting on one socket, sharing one spool.

One Python process accepts and spools about 8,000 usage spans a second on this kind of
machine (``bench/RESULTS.md``), bound by its GIL. The parent binds the listening socket,
then forks N workers; each runs its own :class:`~.app.BridgeApp` (decoding, its delivery
worker) and accepts from the inherited socket, so the kernel spreads connections over
them. They share the spool (SQLite: a file several processes may use; or PostgreSQL) and
the cumulative-metric state, which serializes them per batch. The parent only supervises:
SIGINT/SIGTERM go to every worker, which finishes its requests and flushes as ``serve``
does; a worker that dies is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Final

from paygent_otel.bridge.config import BridgeConfig

__all__ = ["RESPAWN_PAUSE_SECONDS", "run_workers"]

_logger = logging.getLogger("paygent_otel.bridge")

RESPAWN_PAUSE_SECONDS: Final = 1.0
"""Wait before replacing a worker that died, so one failing at start does not spin."""


def _work(config: BridgeConfig, sock: socket.socket, host: str, graceful_timeout: int) -> int:
    """One worker process: serve on the inherited socket until signalled."""
    from paygent_otel.bridge.app import BridgeApp
    from paygent_otel.bridge.server import BridgeServer, run_until_signalled

    server = BridgeServer(BridgeApp(config), host, graceful_timeout=graceful_timeout)
    server.start(sock=sock)
    parent = os.getppid()

    def stop_when_orphaned() -> None:
        # A supervisor killed outright (SIGKILL, OOM) cannot forward a signal: stop anyway.
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_orphaned, name="paygent-orphan-watch", daemon=True).start()
    return 0 if run_until_signalled(server) else 1


def _spawn(config: BridgeConfig, sock: socket.socket, host: str, graceful_timeout: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker's side is seen through its behaviour
        status = 1
        try:
            # Its own process group: a Ctrl-C at the terminal reaches the parent only, which
            # forwards it once (twice would cancel the requests in progress).
            os.setpgid(0, 0)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # the parent's handlers are not ours
            status = _work(config, sock, host, graceful_timeout)
        except BaseException:
            _logger.exception("bridge worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(status)
    return pid


def run_workers(
    config: BridgeConfig, sock: socket.socket, host: str, graceful_timeout: int, count: int
) -> int:
    """Fork ``count`` workers on ``sock`` and supervise them until SIGINT/SIGTERM.

    Returns 0 once every worker stopped after a signal. Call it before any thread starts.
    """
    stopping: list[int] = []
    workers: set[int] = set()

    def forward(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)
        _logger.info("bridge: %s received, stopping %d workers", signal.Signals(signum).name,
                     len(workers))  # fmt: skip
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(count):
            workers.add(_spawn(config, sock, host, graceful_timeout))
        while workers:
            pid, status = os.wait()
            workers.discard(pid)
            if stopping:
                continue
            _logger.error(
                "bridge worker %d exited (%s); starting another",
                pid,
                os.waitstatus_to_exitcode(status),
            )
            time.sleep(RESPAWN_PAUSE_SECONDS)
            if not stopping:
                workers.add(_spawn(config, sock, host, graceful_timeout))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0
