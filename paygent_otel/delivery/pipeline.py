"""From committed records to Paygent: the one path every front end shares.

``export()`` (spans, metrics) and the OTLP bridge hand mapped records to
:meth:`DeliveryPipeline.submit`, which commits them to the spool and wakes the worker
(:mod:`._worker`: one daemon thread running an asyncio loop that leases due records, sends
up to ``max_in_flight`` requests concurrently and settles each one as :mod:`._decision`
says). The pipeline owns the producer side (``submit`` and its counters) and the
lifecycle (start, flush, shutdown, fork); its :class:`SpoolKeeper` owns the spool (opened,
re-opened after trouble, filed by endpoint) and its ``_SenderFactory`` the HTTP stack the
worker posts with. Nothing here raises into the application, and the application thread
never waits on HTTP.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from paygent_otel._version import __version__
from paygent_otel.convention.mapping import Rejection, RejectReason, UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.forking import register_at_fork_once
from paygent_otel.delivery.reporting import BacklogProgress, DeliveryProgress, FailureReport
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.delivery.spool import AddResult, MemorySpool, Spool, destination_id, open_spool
from paygent_otel.delivery.transport import AiohttpSender, HttpxSender, Route, Sender, route_for
from paygent_otel.delivery.worker import DeliveryWorker, WorkerSettings

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


class SpoolKeeper:
    """One pipeline's spool while it lives: opened, re-opened after trouble, filed by endpoint.

    An unwritable path or a full disk must not stop the application: a spool that cannot
    be opened is replaced by a stand-in that refuses everything, the error is logged once,
    and the real spool is tried again every :data:`SPOOL_REOPEN_SECONDS` (at the next
    export).
    """

    def __init__(self, config: ExporterConfig, name: str, spool: Spool | None) -> None:
        self._config = config
        self._name = name
        self.error: str | None = None
        """Why the configured spool could not be opened (None: it is in use)."""
        self._retry_at = 0.0
        self.lock = threading.Lock()
        self.spool = spool if spool is not None else self._open()

    def _open(self) -> Spool:
        """The configured spool; if it cannot be opened, a stand-in that refuses everything."""
        try:
            opened = open_spool(self._config.spool_path, max_bytes=self._config.spool_max_bytes)
        except (OSError, sqlite3.Error) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != self.error:
                _logger.error(
                    "%s: cannot use the spool %s (%s). Usage records are refused (counted as "
                    "`refused`; export() returns FAILURE) until it is writable; it is tried "
                    "again every %.0f s. Point OTEL_EXPORTER_PAYGENT_SPOOL_PATH at a writable "
                    "file, free disk space, or set it to :memory: to opt out of durability",
                    self._name,
                    self._config.spool_path,
                    error,
                    SPOOL_REOPEN_SECONDS,
                )
            self.error = error
            self._retry_at = time.monotonic() + SPOOL_REOPEN_SECONDS
            return MemorySpool(max_records=0)
        if self.error is not None:
            _logger.warning(
                "%s: the spool %s is usable again; usage records are accepted",
                self._name,
                self._config.spool_path,
            )
            self.error = None
        return opened

    def usable(self) -> bool:
        """False while the spool could not be opened (tries again when it is time)."""
        if self.error is None:
            return True
        with self.lock:
            if self.error is not None and time.monotonic() >= self._retry_at:
                self.spool = self._open()
        return self.error is None

    def after_fork(self) -> None:
        """In a forked child: the lock may be held by a thread that no longer exists."""
        self.lock = threading.Lock()

    def file_under_endpoint(self, dest: str) -> None:
        """Remember this endpoint's URL in the spool, and say if records wait for others.

        Records are filed by endpoint and only sent to it (a spool once used against a
        sandbox must not bill its records to production): after an endpoint change, the
        old endpoint's records wait until ``paygent-otel spool retarget`` moves them.
        """
        if not self.spool.durable:
            return
        config = self._config
        try:
            self.spool.remember_endpoint(dest, config.endpoint)
            stranded = [e for e in self.spool.endpoints() if e.dest != dest and e.pending]
        except Exception:  # the first export reports spool trouble with its reason
            return
        for other in stranded:
            url = other.url or f"an endpoint used before this version (id {other.dest})"
            _logger.warning(
                "%s: %d usage records in the spool %s are filed under %s, not under the "
                "configured endpoint %s, and are not sent. If that endpoint was a mistake, "
                "move them: paygent-otel spool retarget --spool %s --from %s --to %s",
                self._name,
                other.pending,
                config.spool_path,
                url,
                config.endpoint,
                config.spool_path,
                other.url or other.dest,
                config.endpoint,
            )


def _note_rejections(
    stats: DeliveryStats, records: Sequence[UsageRecord], rejections: Sequence[Rejection]
) -> list[Rejection]:
    """Log the warnings of a batch and count what was not mapped; returns the invalid."""
    for record in records:
        for warning in record.warnings:
            _logger.warning("%s", warning)
    reasons = Counter(r.reason for r in rejections)
    invalid = [r for r in rejections if r.reason is RejectReason.INVALID]
    for rejection in invalid:
        _logger.warning("%s", rejection.message)
    for message in dict.fromkeys(r.message for r in rejections if r.reason is RejectReason.LOST):
        _logger.warning("%s", message)
    stats.add("invalid", len(invalid))
    stats.add("skipped_zero", reasons[RejectReason.ZERO])
    stats.add("lost_to_span_event_limit", reasons[RejectReason.LOST])
    return invalid


def _count_stored(
    stats: DeliveryStats,
    result: AddResult,
    conflicts: list[Rejection] | None,
    name: str,
    spool_path: object,
) -> None:
    """Count (and log) what the spool did with a batch."""
    stats.add("accepted", result.accepted)
    stats.add("duplicate_suppressed", result.duplicates)
    stats.add("conflict", len(result.conflicts))
    for conflict in result.conflicts:
        _logger.warning("%s", conflict.message)
    if conflicts is not None:
        conflicts.extend(result.conflicts)
    if result.refused:
        stats.add("refused", result.refused)
        _logger.error(
            "%s: spool full (%s); %d usage records refused. Raise the cap or restore "
            "delivery; see `paygent-otel spool status`",
            name,
            spool_path,
            result.refused,
        )


def _say_blocked(name: str, config: ExporterConfig, blocked: str, durable: bool) -> None:
    """The one ERROR line of a pipeline that cannot send anything."""
    _logger.error(
        "%s: nothing is sent to %s: %s. Usage is %s until this is fixed",
        name,
        config.endpoint,
        blocked,
        "kept in the spool " + str(config.spool_path)
        if durable
        else "counted as dropped (in-memory mode)",
    )


def _wait_delivered(
    worker: DeliveryWorker,
    pending: Callable[[], int],
    timeout: float,
    progress: DeliveryProgress | None,
    at_shutdown: bool,
    durable: bool,
) -> None:
    """Keep the worker awake until nothing is pending, the timeout passes, or nothing can be
    delivered before it (see :meth:`DeliveryPipeline.force_flush`)."""
    deadline = time.monotonic() + timeout
    wall_deadline = time.time() + timeout
    while time.monotonic() < deadline:
        left = pending()
        if left == 0:
            return
        endpoint = worker.endpoint
        hopeless = endpoint.misconfigured or (
            durable and endpoint.unreachable >= EXIT_CONNECT_ATTEMPTS
        )
        if endpoint.paused_until > wall_deadline or (at_shutdown and hopeless):
            return
        if progress is not None:
            progress.update(left)
        worker.notify()
        time.sleep(0.02)


def _worker_settings(
    config: ExporterConfig, name: str, dest: str, route: Route, policy: RetryPolicy
) -> WorkerSettings:
    return WorkerSettings(
        name=name,
        dest=dest,
        route=route,
        timeout=config.timeout,
        max_in_flight=config.max_in_flight,
        max_retry_seconds=config.max_retry_seconds,
        spool_path=str(config.spool_path),
        policy=policy,
    )


class _SenderFactory:
    """Makes the worker's sender (in its loop): the runtime HTTP stack, or the injected
    httpx transport (tests, custom networking)."""

    def __init__(
        self, config: ExporterConfig, route: Route, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        self._config, self._route, self._transport = config, route, transport
        self._headers = {
            **config.headers,
            "Content-Type": "application/json",
            "User-Agent": f"paygent-otel/{__version__}",
        }
        if config.api_key:
            self._headers["paygent-api-key"] = config.api_key

    def __call__(self) -> Sender:
        config = self._config
        if self._transport is not None:
            url = config.endpoint + USAGE_PATH
            return HttpxSender(self._transport, url, self._headers, config.timeout)
        return AiohttpSender(self._route, self._headers, config.max_in_flight)


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
        self._dest = destination_id(config.endpoint)
        self.route, self.blocked = _route(config, api_key_hint)
        self._sender = _SenderFactory(config, self.route, transport)
        self._lock = threading.Lock()
        self._worker: DeliveryWorker | None = None
        self._shutdown = False
        self._pid = os.getpid()
        self._keeper = SpoolKeeper(config, name, spool)
        self._backlog = BacklogProgress(_logger, name, str(config.spool_path), self._pending)
        self.report = FailureReport(_logger, name, self.route.describe(), self._pending)
        _live_pipelines.add(self)
        register_at_fork_once("delivery", after_in_child=_after_fork_in_child)
        self._keeper.file_under_endpoint(self._dest)
        if self.blocked:
            _say_blocked(name, config, self.blocked, self.spool.durable)

    @property
    def spool(self) -> Spool:
        """The spool in use (a refusing stand-in while the configured one cannot be opened)."""
        return self._keeper.spool

    def _pending(self) -> int:
        return self.spool.pending(self._dest)

    def _after_fork(self) -> None:
        """In a forked child: the worker thread, its loop and every lock holder are gone."""
        self._lock = threading.Lock()
        self._keeper.after_fork()
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
        invalid = _note_rejections(self.stats, records, rejections)
        if self._refuses(len(records)):
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
        _count_stored(self.stats, result, conflicts, self.name, self.config.spool_path)
        if result.accepted and not self.blocked:
            self._ensure_worker().notify()
        return result.refused

    def _refuses(self, n: int) -> bool:
        """True (counted, logged) if ``n`` new records cannot be taken at all now."""
        if self._shutdown:
            self.stats.add("refused_after_shutdown", n)
            _logger.error("%s: %d usage records after shutdown refused", self.name, n)
            return True
        if self.blocked and not self.spool.durable:
            self.stats.add(
                "dropped_no_api_key" if not self.config.api_key else "dropped_delivery_stopped",
                n,
            )
            return True
        if not self._keeper.usable():
            self.stats.add("refused", n)
            _logger.error(
                "%s: %d usage records refused: the spool %s is unusable (%s)",
                self.name,
                n,
                self.config.spool_path,
                self._keeper.error,
            )
            return True
        return False

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
        return DeliveryWorker(
            _worker_settings(self.config, self.name, self._dest, self.route, self.retry_policy),
            spool=lambda: self.spool,
            sender=self._sender,
            stats=self.stats,
            report=self.report,
            after_settle=self._backlog.check,
        )

    @property
    def is_shut_down(self) -> bool:
        """True once :meth:`shutdown` was called (its spool is closed, records refused)."""
        return self._shutdown

    def start(self) -> None:
        """Start delivering what the spool holds (records left by an earlier process)."""
        if not self.blocked and not self._shutdown:
            self._backlog.find()
            self._ensure_worker().notify()

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
        durable = self.spool.durable
        _wait_delivered(worker, self._pending, timeout, progress, self._shutdown, durable)
        return self.spool.pending(self._dest) == 0

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
            stopped, progress = self._drain(worker, timeout)
            if not stopped:
                return self._pending()  # the worker holds records: the spool stays open
        left = self._pending()
        if progress is not None:
            progress.finish(left)
        self._say_left(left)
        self.spool.close()
        return left

    def _drain(
        self, worker: DeliveryWorker, timeout: float
    ) -> tuple[bool, DeliveryProgress | None]:
        """Deliver what is pending, then stop the worker by the deadline.

        Returns whether the worker stopped (if not, closing the spool under it would lose
        its last settlements) and the progress lines started (None: nothing was pending).
        """
        deadline = time.monotonic() + timeout
        progress: DeliveryProgress | None = None
        if pending := self._pending():
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
        if worker.stop(deadline):
            return True, progress
        _logger.warning(
            "%s: the delivery worker did not stop in time; records it holds are "
            "re-sent with the same key by the next process on %s",
            self.name,
            self.config.spool_path,
        )
        return False, progress

    def _say_left(self, left: int) -> None:
        """Count and log the records shutdown leaves undelivered."""
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
