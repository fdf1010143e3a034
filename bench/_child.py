"""What every benchmark child process shares: its protocol with the parent and its clocks.

A child is started as ``python -m bench.<module> '<json spec>'``. It prints one JSON object
per line on stdout (``{"event": ...}``); the parent answers on stdin when it needs to (for
example ``done`` once the sandbox ledger holds every record). Measurements are taken in the
child with ``resource.getrusage(RUSAGE_SELF)``, which counts every thread of the process
(the exporter's workers included), and ``time.thread_time()`` on the application thread.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import statistics
import sys
import time
from array import array
from typing import Any


def spec() -> dict[str, Any]:
    """The JSON spec the parent passed as the only argument."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loaded: dict[str, Any] = json.loads(sys.argv[1])
    return loaded


def emit(event: str, **fields: Any) -> None:
    """Tell the parent something (one JSON line)."""
    print(json.dumps({"event": event, **fields}), flush=True)


def wait_for(word: str) -> None:
    """Block until the parent writes ``word`` on a line of stdin."""
    for line in sys.stdin:
        if line.strip() == word:
            return
    raise SystemExit(f"parent closed stdin before {word!r}")


def dead_endpoint() -> str:
    """A loopback URL whose port refuses connections (bound, then closed): an outage."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def cpu_seconds() -> float:
    """User + system CPU time of this whole process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def now() -> float:
    """``time.monotonic()``: one clock for parent and children (CLOCK_MONOTONIC is global)."""
    return time.monotonic()


class CallTimer:
    """Application-thread time and wall time of each timed call, in microseconds."""

    def __init__(self) -> None:
        self.thread_us = array("d")
        self.wall_us = array("d")

    def summary(self) -> dict[str, float]:
        """Mean, p50 and p99 of both clocks."""
        out: dict[str, float] = {}
        for name, values in (("thread", self.thread_us), ("wall", self.wall_us)):
            if not values:
                continue
            ordered = sorted(values)
            out[f"{name}_mean_us"] = statistics.fmean(ordered)
            out[f"{name}_p50_us"] = ordered[len(ordered) // 2]
            out[f"{name}_p99_us"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return out
