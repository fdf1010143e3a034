"""From committed records to Paygent: the one path every front end shares.

``export()`` (spans, metrics) and the OTLP bridge hand mapped records to
:meth:`DeliveryPipeline.submit`, which commits them to the spool and wakes the worker
(:mod:`._worker`: one daemon thread running an asyncio loop that leases due records, sends
up to ``max_in_flight`` requests concurrently and settles each one as :mod:`._decision`
says). The pipeline owns the spool, the producer side and the lifecycle (start, flush,
shutdown, fork). Nothing here raises into the application, and the application thread
never waits on HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from ._config import ExporterConfig
from ._forking import register_at_fork_once
from ._mapping import Rejection, RejectReason, UsageRecord
from ._reporting import DeliveryProgress, FailureReport
from ._retry import RetryPolicy
from ._spool import MemorySpool, Spool, destination_id, open_spool
from ._transport import AiohttpSender, HttpxSender, Route, Sender, route_for
from ._version import __version__
from ._worker import DeliveryWorker, WorkerSettings

__all__ = ["USAGE_PATH", "DeliveryPipeline", "DeliveryStats"]

_logger = logging.getLogger("paygent_otel.delivery")

USAGE_PATH = "/api/v2/usage"
"""The Paygent standalone usage endpoint (all three kinds)."""
SPOOL_REOPEN_SECONDS = 30.0
"""How often a pipeline whose spool could not be opened tries again (at the next export)."""
EXIT_CONNECT_ATTEMPTS = 3
"""At shutdown with a durable spool, connection failures in a row after which the process
stops waiting for the endpoint (its records stay on disk for the next process)."""


_live_pipelines: weakref.WeakSet[DeliveryPipeline] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pipeline in list(_live_pipelines):
        pipeline._after_fork()


@dataclass
class DeliveryStats:
    """Every record's fate, by reason. Read with :meth:`snapshot`; never reset."""

    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records under ``reason``."""
        if n:
            with self._lock:
                self.counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of the counters (``delivered``, ``retried``, ``rejected``, ...)."""
        with self._lock:
            return dict(self.counts)


class DeliveryPipeline:
    """Spool + worker for one destination. Thread-safe; fork-aware; never raises."""

    def __init__(
        self,
        config: ExporterConfig,
        *,
        name: str,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        spool: Spool | None = None,
        api_key_hint: str = "set PAYGENT_API_KEY",
    ) -> None:
        self.config = config
        self.name = name
        self.retry_policy = retry_policy or RetryPolicy()
        self.stats = DeliveryStats()
        self._transport = transport
        self._dest = destination_id(config.endpoint)
        self._url = config.endpoint + USAGE_PATH
        self.route, self.blocked = self._route(config, api_key_hint)
        self._headers = {
            **config.headers,
            "Content-Type": "application/json",
            "User-Agent": f"paygent-otel/{__version__}",
        }
        if config.api_key:
            self._headers["paygent-api-key"] = config.api_key
        self._lock = threading.Lock()
        self._worker: DeliveryWorker | None = None
        self._shutdown = False
        self._pid = os.getpid()
        self._spool_error: str | None = None
        self._spool_retry_at = 0.0
        self._backlog: DeliveryProgress | None = None
        self._backlog_checked = 0.0
        self.spool = spool if spool is not None else self._open_spool()
        self.report = FailureReport(
            _logger, name, self.route.describe(), lambda: self.spool.pending(self._dest)
        )
        _live_pipelines.add(self)
        register_at_fork_once("delivery", after_in_child=_after_fork_in_child)
        self._file_under_endpoint()
        if self.blocked:
            _logger.error(
                "%s: nothing is sent to %s: %s. Usage is %s until this is fixed",
                name,
                config.endpoint,
                self.blocked,
                "kept in the spool " + str(config.spool_path)
                if self.spool.durable
                else "counted as dropped (in-memory mode)",
            )

    def _file_under_endpoint(self) -> None:
        """Remember this endpoint's URL in the spool, and say if records wait for others.

        Records are filed by endpoint and only sent to it (a spool once used against a
        sandbox must not bill its records to production): after an endpoint change, the
        old endpoint's records wait until ``paygent-otel spool retarget`` moves them.
        """
        if not self.spool.durable:
            return
        try:
            self.spool.remember_endpoint(self._dest, self.config.endpoint)
            stranded = [e for e in self.spool.endpoints() if e.dest != self._dest and e.pending]
        except Exception:  # the first export reports spool trouble with its reason
            return
        for other in stranded:
            url = other.url or f"an endpoint used before this version (id {other.dest})"
            _logger.warning(
                "%s: %d usage records in the spool %s are filed under %s, not under the "
                "configured endpoint %s, and are not sent. If that endpoint was a mistake, "
                "move them: paygent-otel spool retarget --spool %s --from %s --to %s",
                self.name,
                other.pending,
                self.config.spool_path,
                url,
                self.config.endpoint,
                self.config.spool_path,
                other.url or other.dest,
                self.config.endpoint,
            )

    @staticmethod
    def _route(config: ExporterConfig, api_key_hint: str) -> tuple[Route, str | None]:
        """The route to the endpoint, and why nothing can be sent there (None: it can)."""
        url = config.endpoint + USAGE_PATH
        if config.delivery_blocked:
            return Route(url), config.delivery_blocked
        try:
            route = route_for(
                url,
                certificate=config.certificate,
                client_certificate=config.client_certificate,
                client_key=config.client_key,
            )
        except ValueError as exc:
            return Route(url), f"the TLS settings cannot be used ({exc})"
        if not config.api_key:
            return route, f"no Paygent API key ({api_key_hint})"
        return route, None

    def _open_spool(self) -> Spool:
        """The configured spool; if it cannot be opened, a stand-in that refuses everything.

        An unwritable path or a full disk must not stop the application: the error is
        logged once here, each refused batch is counted and logged, and the spool is tried
        again every :data:`SPOOL_REOPEN_SECONDS`.
        """
        try:
            opened = open_spool(self.config.spool_path, max_bytes=self.config.spool_max_bytes)
        except (OSError, sqlite3.Error) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != self._spool_error:
                _logger.error(
                    "%s: cannot use the spool %s (%s). Usage records are refused (counted as "
                    "`refused`; export() returns FAILURE) until it is writable; it is tried "
                    "again every %.0f s. Point OTEL_EXPORTER_PAYGENT_SPOOL_PATH at a writable "
                    "file, free disk space, or set it to :memory: to opt out of durability",
                    self.name,
                    self.config.spool_path,
                    error,
                    SPOOL_REOPEN_SECONDS,
                )
            self._spool_error = error
            self._spool_retry_at = time.monotonic() + SPOOL_REOPEN_SECONDS
            return MemorySpool(max_records=0)
        if self._spool_error is not None:
            _logger.warning(
                "%s: the spool %s is usable again; usage records are accepted",
                self.name,
                self.config.spool_path,
            )
            self._spool_error = None
        return opened

    def _spool_usable(self) -> bool:
        """False while the spool could not be opened (tries again when it is time)."""
        if self._spool_error is None:
            return True
        with self._lock:
            if self._spool_error is not None and time.monotonic() >= self._spool_retry_at:
                self.spool = self._open_spool()
        return self._spool_error is None

    def _after_fork(self) -> None:
        """In a forked child: the worker thread, its loop and every lock holder are gone."""
        self._lock = threading.Lock()
        self.stats._lock = threading.Lock()
        self._pid = os.getpid()
        self._worker = None

    # ------------------------------------------------------------------ producer side

    def submit(
        self,
        records: Sequence[UsageRecord],
        rejections: Sequence[Rejection] = (),
        *,
        conflicts: list[Rejection] | None = None,
    ) -> int:
        """Commit records to the spool and wake the worker. Returns how many were refused.

        Records the spool refuses because a record with their ref and different usage is
        pending or delivered are logged, counted as ``conflict`` and appended to
        ``conflicts`` when given. Never raises: a storage failure is logged and the
        records are counted as refused.
        """
        for record in records:
            for warning in record.warnings:
                _logger.warning("%s", warning)
        reasons = Counter(r.reason for r in rejections)
        invalid = [r for r in rejections if r.reason is RejectReason.INVALID]
        for rejection in invalid:
            _logger.warning("%s", rejection.message)
        for message in dict.fromkeys(
            r.message for r in rejections if r.reason is RejectReason.LOST
        ):
            _logger.warning("%s", message)
        self.stats.add("invalid", len(invalid))
        self.stats.add("skipped_zero", reasons[RejectReason.ZERO])
        self.stats.add("lost_to_span_event_limit", reasons[RejectReason.LOST])
        if self._shutdown:
            self.stats.add("refused_after_shutdown", len(records))
            _logger.error("%s: %d usage records after shutdown refused", self.name, len(records))
            return len(records)
        if self.blocked and not self.spool.durable:
            self.stats.add(
                "dropped_no_api_key" if not self.config.api_key else "dropped_delivery_stopped",
                len(records),
            )
            return len(records)
        if not self._spool_usable():
            self.stats.add("refused", len(records))
            _logger.error(
                "%s: %d usage records refused: the spool %s is unusable (%s)",
                self.name,
                len(records),
                self.config.spool_path,
                self._spool_error,
            )
            return len(records)
        try:
            if invalid:
                self.spool.add_rejected(invalid)
            result = self.spool.add(self._dest, records)
        except Exception:
            _logger.exception(
                "%s: could not store %d usage records in %s; refused",
                self.name,
                len(records),
                self.config.spool_path,
            )
            self.stats.add("refused", len(records))
            return len(records)
        self.stats.add("accepted", result.accepted)
        self.stats.add("duplicate_suppressed", result.duplicates)
        self.stats.add("conflict", len(result.conflicts))
        for conflict in result.conflicts:
            _logger.warning("%s", conflict.message)
        if conflicts is not None:
            conflicts.extend(result.conflicts)
        if result.refused:
            self.stats.add("refused", result.refused)
            _logger.error(
                "%s: spool full (%s); %d usage records refused. Raise the cap or restore "
                "delivery; see `paygent-otel spool status`",
                self.name,
                self.config.spool_path,
                result.refused,
            )
        if result.accepted and not self.blocked:
            self._ensure_worker().notify()
        return result.refused

    # ------------------------------------------------------------------ lifecycle

    def _ensure_worker(self) -> DeliveryWorker:
        if self._pid != os.getpid():
            # A forked child (the fork hook normally did this already).
            self._after_fork()
        worker = self._worker
        if worker is not None and worker.alive:
            return worker
        with self._lock:
            if self._worker is None or not self._worker.alive:
                self._worker = self._new_worker()
                self._worker.start()
            return self._worker

    def _new_worker(self) -> DeliveryWorker:
        settings = WorkerSettings(
            name=self.name,
            dest=self._dest,
            route=self.route,
            timeout=self.config.timeout,
            max_in_flight=self.config.max_in_flight,
            max_retry_seconds=self.config.max_retry_seconds,
            spool_path=str(self.config.spool_path),
            policy=self.retry_policy,
        )
        return DeliveryWorker(
            settings,
            spool=lambda: self.spool,
            sender=self._sender,
            stats=self.stats,
            report=self.report,
            after_settle=self._report_backlog,
        )

    def _sender(self) -> Sender:
        """The runtime HTTP stack, or the injected httpx transport (tests, custom network)."""
        if self._transport is not None:
            return HttpxSender(self._transport, self._url, self._headers, self.config.timeout)
        return AiohttpSender(self.route, self._headers, self.config.max_in_flight)

    @property
    def is_shut_down(self) -> bool:
        """True once :meth:`shutdown` was called (its spool is closed, records refused)."""
        return self._shutdown

    def start(self) -> None:
        """Start delivering what the spool holds (records left by an earlier process)."""
        if not self.blocked and not self._shutdown:
            if not self._backlog_checked:
                self._backlog_checked = time.monotonic()
                with contextlib.suppress(Exception):  # the worker reports spool trouble
                    if backlog := self.spool.pending(self._dest):
                        _logger.info(
                            "%s: %d usage records wait in the spool %s; delivering them",
                            self.name,
                            backlog,
                            self.config.spool_path,
                        )
                        self._backlog = DeliveryProgress(_logger, self.name, "backlog", backlog)
            self._ensure_worker().notify()

    def _report_backlog(self) -> None:
        """Progress of the backlog found at start (worker thread, at most once a second)."""
        progress = self._backlog
        now = time.monotonic()
        if progress is None or now - self._backlog_checked < 1.0:
            return
        self._backlog_checked = now
        try:
            left = self.spool.pending(self._dest)
        except Exception:
            return  # the next lease reports the trouble
        if left:
            progress.update(left)
        else:
            progress.finish(0)
            self._backlog = None

    def force_flush(self, timeout: float = 30.0, progress: DeliveryProgress | None = None) -> bool:
        """Wait until this destination has nothing pending; False on timeout.

        Returns early (False) when nothing can be delivered before the deadline: delivery is
        stopped, or paused (Retry-After, an unreachable endpoint) past the deadline, or, at
        shutdown, the key or the endpoint was refused (a process exiting cannot fix them) or
        the endpoint could not be reached :data:`EXIT_CONNECT_ATTEMPTS` times in a row (a
        durable spool keeps the records for the next process; memory mode waits it out).
        """
        if self.blocked or (self._shutdown and self._worker is None):
            return self.spool.pending(self._dest) == 0
        worker = self._ensure_worker()
        deadline = time.monotonic() + timeout
        wall_deadline = time.time() + timeout
        while time.monotonic() < deadline:
            left = self.spool.pending(self._dest)
            if left == 0:
                return True
            if worker.paused_until > wall_deadline or (self._shutdown and self._hopeless(worker)):
                break
            if progress is not None:
                progress.update(left)
            worker.notify()
            time.sleep(0.02)
        return self.spool.pending(self._dest) == 0

    def _hopeless(self, worker: DeliveryWorker) -> bool:
        return worker.misconfigured or (
            self.spool.durable and worker.unreachable >= EXIT_CONNECT_ATTEMPTS
        )

    def shutdown(self, timeout: float = 10.0) -> int:
        """Deliver what is pending within ``timeout``, then stop. Idempotent.

        With the durable spool, what is left stays on disk for the next process; in memory
        mode it is counted as ``dropped_at_shutdown`` and logged. Returns how many records
        were left undelivered (0 on a repeated call).
        """
        if self._shutdown:
            return 0
        self._shutdown = True
        worker = self._worker
        progress: DeliveryProgress | None = None
        if worker is not None and self._pid == os.getpid():
            deadline = time.monotonic() + timeout
            if pending := self.spool.pending(self._dest):
                _logger.info(
                    "%s: delivering %d pending usage records before shutdown (at most %.0f s)",
                    self.name,
                    pending,
                    timeout,
                )
                progress = DeliveryProgress(_logger, self.name, "delivery at shutdown", pending)
            self.force_flush(timeout, progress)
            # Requests still in flight get what is left of the timeout, then are cancelled:
            # their records go back to the spool with the same key (at-least-once).
            if not worker.stop(deadline):
                # Closing the spool under the worker would lose its last settlements.
                _logger.warning(
                    "%s: the delivery worker did not stop in time; records it holds are "
                    "re-sent with the same key by the next process on %s",
                    self.name,
                    self.config.spool_path,
                )
                return self.spool.pending(self._dest)
        left = self.spool.pending(self._dest)
        if progress is not None:
            progress.finish(left)
        if left and not self.spool.durable:
            self.stats.add("dropped_at_shutdown", left)
            _logger.error(
                "%s: %d usage records were not delivered before shutdown and are lost "
                "(in-memory mode)",
                self.name,
                left,
            )
        elif left:
            why = self.blocked or self.report.last_error or "not in time"
            _logger.warning(
                "%s: %d usage records were not delivered to %s before shutdown (%s). They "
                "stay in the spool %s and are sent by the next process that delivers from it "
                "(`paygent-otel spool status --spool %s`)",
                self.name,
                left,
                self.config.endpoint,
                why,
                self.config.spool_path,
                self.config.spool_path,
            )
        self.spool.close()
        return left
