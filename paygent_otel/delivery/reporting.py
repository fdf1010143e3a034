"""Delivery trouble said where an operator sees it: once at WARNING, then as summaries.

A failing endpoint fails every request, hundreds a second: one line per request would
drown the log, and none at all (as before) leaves usage waiting in silence. Each class of
failure (connection refused, HTTP 503, a TLS certificate not trusted, ...) is logged the
first time it is seen, then at most once per :data:`SUMMARY_INTERVAL_SECONDS` as a summary
with how many records wait and when the next try is; recovery is logged once too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

__all__ = [
    "PROGRESS_SECONDS",
    "SUMMARY_INTERVAL_SECONDS",
    "BacklogProgress",
    "DeliveryProgress",
    "FailureReport",
]

SUMMARY_INTERVAL_SECONDS = 30.0
"""Least time between two summaries of the same failure."""


class FailureReport:
    """Rate-limited WARNING lines about one destination's failed attempts."""

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        target: str,
        waiting: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._name = name
        self._target = target
        self._waiting = waiting
        self._clock = clock
        self._lock = threading.Lock()
        self._cause: str | None = None
        self._last_line = 0.0
        self._failures = 0
        self.last_error: str | None = None
        """The latest failure's full text (None once delivery works)."""

    def failed(self, cause: str, detail: str, retry_in: float) -> None:
        """One failed attempt of class ``cause`` (``detail`` says it in full)."""
        now = self._clock()
        with self._lock:
            self._failures += 1
            self.last_error = detail
            new = cause != self._cause
            if not new and now - self._last_line < SUMMARY_INTERVAL_SECONDS:
                return
            failures, self._failures = self._failures, 0
            self._cause, self._last_line = cause, now
        waiting = self._safe_waiting()
        if new:
            self._logger.warning(
                "%s: cannot deliver usage to %s: %s. %s records wait in the spool; next try "
                "in %.0f s",
                self._name,
                self._target,
                detail,
                waiting,
                retry_in,
            )
        else:
            self._logger.warning(
                "%s: still cannot deliver usage to %s: %s (%d failed attempts in the last "
                "%.0f s). %s records wait; next try in %.0f s",
                self._name,
                self._target,
                detail,
                failures,
                SUMMARY_INTERVAL_SECONDS,
                waiting,
                retry_in,
            )

    def recovered(self) -> None:
        """A record was accepted: say so once if something had failed."""
        if self._cause is None:
            return
        with self._lock:
            cause, self._cause, self.last_error = self._cause, None, None
            self._failures = 0
        if cause is not None:
            self._logger.warning(
                "%s: delivery to %s works again (it had failed: %s)",
                self._name,
                self._target,
                cause,
            )

    def _safe_waiting(self) -> str:
        try:
            return str(self._waiting())
        except Exception:  # the spool is in trouble too; its own log line says so
            return "some"


PROGRESS_SECONDS = 5.0
"""How often a long delivery (the drain at shutdown, a backlog) logs how far it got."""


class DeliveryProgress:
    """Progress lines of one long delivery, at most every :data:`PROGRESS_SECONDS`, then a
    summary: a process that holds up its exit, or works off a backlog, says how it goes."""

    def __init__(self, logger: logging.Logger, name: str, what: str, total: int) -> None:
        self._logger = logger
        self._name, self._what, self.total = name, what, total
        self._started = self._logged = time.monotonic()

    def update(self, left: int) -> None:
        """``left`` records are still pending: log a line if it is time."""
        now = time.monotonic()
        if now - self._logged >= PROGRESS_SECONDS:
            self._logged = now
            self._logger.warning(
                "%s: %s: %d of %d delivered, %d left (%.0f s)",
                self._name,
                self._what,
                max(self.total - left, 0),
                self.total,
                left,
                now - self._started,
            )

    def finish(self, left: int) -> None:
        """The summary line."""
        self._logger.info(
            "%s: %s: %d of %d delivered in %.1f s, %d left",
            self._name,
            self._what,
            max(self.total - left, 0),
            self.total,
            time.monotonic() - self._started,
            left,
        )


class BacklogProgress:
    """The backlog an earlier process left in the spool: said once at start, then followed
    with :class:`DeliveryProgress` lines (checked at most once a second) until it is gone."""

    def __init__(
        self, logger: logging.Logger, name: str, spool_path: str, pending: Callable[[], int]
    ) -> None:
        self._logger = logger
        self._name, self._spool_path, self._pending = name, spool_path, pending
        self._progress: DeliveryProgress | None = None
        self._checked = 0.0

    def find(self) -> None:
        """Look once for records waiting in the spool; say how many (start of delivery)."""
        if self._checked:
            return
        self._checked = time.monotonic()
        with contextlib.suppress(Exception):  # the worker reports spool trouble
            if backlog := self._pending():
                self._logger.info(
                    "%s: %d usage records wait in the spool %s; delivering them",
                    self._name,
                    backlog,
                    self._spool_path,
                )
                self._progress = DeliveryProgress(self._logger, self._name, "backlog", backlog)

    def check(self) -> None:
        """Log progress if it is time (worker thread, after each settlement)."""
        progress = self._progress
        now = time.monotonic()
        if progress is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            left = self._pending()
        except Exception:
            return  # the next lease reports the trouble
        if left:
            progress.update(left)
        else:
            progress.finish(0)
            self._progress = None
