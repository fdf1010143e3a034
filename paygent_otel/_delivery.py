"""From committed records to Paygent: the one path every front end shares.

``export()`` (spans, metrics) and the OTLP bridge hand mapped records to
:meth:`DeliveryPipeline.submit`, which commits them to the spool and wakes the worker. The
worker is one daemon thread running an asyncio loop: it leases due records, sends up to
``max_in_flight`` requests concurrently over one connection pool, and settles each record
(delete after 2xx, reschedule a retryable failure, dead-letter a definitive rejection).
Nothing here raises into the application, and the application thread never waits on HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from ._config import ExporterConfig
from ._mapping import Rejection, RejectReason, UsageRecord
from ._reporting import FailureReport
from ._retry import Outcome, RetryPolicy, classify_status, parse_retry_after
from ._spool import MemorySpool, SpooledItem, SqliteSpool, destination_id, open_spool
from ._transport import (
    AiohttpSender,
    HttpxSender,
    Route,
    Sender,
    describe_error,
    is_connect_failure,
    route_for,
)
from ._version import __version__

__all__ = ["USAGE_PATH", "DeliveryPipeline", "DeliveryStats"]

_logger = logging.getLogger("paygent_otel.delivery")

USAGE_PATH = "/api/v2/usage"
"""The Paygent standalone usage endpoint (all three kinds)."""
IDLE_POLL_SECONDS = 1.0
"""How often an idle worker looks at a shared spool for records other processes added."""
SPOOL_REOPEN_SECONDS = 30.0
"""How often a pipeline whose spool could not be opened tries again (at the next export)."""
SPOOL_ERROR_PAUSE_SECONDS = 1.0
"""How long the worker waits after the spool failed to answer (disk full, locked too long)."""
BATCH_WINDOW_SECONDS = 0.002
"""After a request finishes while others are in flight, how long the worker lets more
finish before it settles them and leases the next records (one transaction each for the
lot instead of two per record)."""
EXIT_CONNECT_ATTEMPTS = 3
"""At shutdown with a durable spool, connection failures in a row after which the process
stops waiting for the endpoint (its records stay on disk for the next process)."""
_SETTLE_BATCH = 256
_WORKER_THREAD_PREFIX = "paygent-otel-"


class _QuietWorkerRequests(logging.Filter):
    """httpx logs every request at INFO; one line per usage record is noise for the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith(_WORKER_THREAD_PREFIX)


logging.getLogger("httpx").addFilter(_QuietWorkerRequests())

_live_pipelines: weakref.WeakSet[DeliveryPipeline] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pipeline in list(_live_pipelines):
        pipeline._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        spool: SqliteSpool | MemorySpool | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.retry_policy = retry_policy or RetryPolicy()
        self.stats = DeliveryStats()
        self._transport = transport
        self._dest = destination_id(config.endpoint)
        self._url = config.endpoint + USAGE_PATH
        self.route, self.blocked = self._route(config)
        self._headers = {
            **config.headers,
            "Content-Type": "application/json",
            "User-Agent": f"paygent-otel/{__version__}",
        }
        if config.api_key:
            self._headers["paygent-api-key"] = config.api_key
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._shutdown = False
        self._pid = os.getpid()
        self._gate_until = 0.0
        self._drain_deadline = 0.0
        self._endpoint_verified = False
        """True once the endpoint accepted a record: a 404 is then about the record."""
        self._endpoint_failures = 0
        self._misconfigured = False
        """The last answer said the key or the endpoint is wrong: waiting cannot help."""
        self._unreachable = 0
        """Connection attempts failed in a row (reset by any answer)."""
        self._spool_failing = False
        self._spool_error: str | None = None
        self._spool_retry_at = 0.0
        self.spool = spool if spool is not None else self._open_spool()
        self.report = FailureReport(
            _logger, name, self.route.describe(), lambda: self.spool.pending(self._dest)
        )
        _live_pipelines.add(self)
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
    def _route(config: ExporterConfig) -> tuple[Route, str | None]:
        """The route to the endpoint, and why nothing can be sent there (None: it can)."""
        url = config.endpoint + USAGE_PATH
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
            return route, "no Paygent API key (set PAYGENT_API_KEY)"
        return route, None

    def _open_spool(self) -> SqliteSpool | MemorySpool:
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
        self._thread = None
        self._loop = None
        self._wake = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ producer side

    def submit(self, records: Sequence[UsageRecord], rejections: Sequence[Rejection] = ()) -> int:
        """Commit records to the spool and wake the worker. Returns how many were refused.

        Never raises: a storage failure is logged and the records are counted as refused.
        """
        for record in records:
            for warning in record.warnings:
                _logger.warning("%s", warning)
        invalid = [r for r in rejections if r.reason is RejectReason.INVALID]
        for rejection in invalid:
            _logger.warning("%s", rejection.message)
        self.stats.add("invalid", len(invalid))
        self.stats.add("skipped_zero", len(rejections) - len(invalid))
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
            self._ensure_worker()
            self._notify()
        return result.refused

    # ------------------------------------------------------------------ lifecycle

    def _ensure_worker(self) -> None:
        if self._pid != os.getpid():
            # A forked child (the fork hook normally did this already).
            self._after_fork()
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(ready,),
                name=f"{_WORKER_THREAD_PREFIX}{self.name}",
                daemon=True,
            )
            self._thread.start()
            ready.wait(5.0)

    @property
    def is_shut_down(self) -> bool:
        """True once :meth:`shutdown` was called (its spool is closed, records refused)."""
        return self._shutdown

    def start(self) -> None:
        """Start delivering what the spool holds (records left by an earlier process)."""
        if not self.blocked and not self._shutdown:
            self._ensure_worker()
            self._notify()

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Wait until this destination has nothing pending; False on timeout.

        Returns early (False) when nothing can be delivered before the deadline: delivery is
        stopped, or paused (Retry-After, an unreachable endpoint) past the deadline, or, at
        shutdown, the key or the endpoint was refused (a process exiting cannot fix them) or
        the endpoint could not be reached :data:`EXIT_CONNECT_ATTEMPTS` times in a row (a
        durable spool keeps the records for the next process; memory mode waits it out).
        """
        if self.blocked:
            return self.spool.pending(self._dest) == 0
        self.start()
        deadline = time.monotonic() + timeout
        wall_deadline = time.time() + timeout
        while time.monotonic() < deadline:
            if self.spool.pending(self._dest) == 0:
                return True
            if self._gate_until > wall_deadline or (self._shutdown and self._hopeless()):
                break
            self._notify()
            time.sleep(0.02)
        return self.spool.pending(self._dest) == 0

    def _hopeless(self) -> bool:
        return self._misconfigured or (
            self.spool.durable and self._unreachable >= EXIT_CONNECT_ATTEMPTS
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Deliver what is pending within ``timeout``, then stop. Idempotent.

        With the durable spool, what is left stays on disk for the next process; in memory
        mode it is counted as ``dropped_at_shutdown`` and logged.
        """
        if self._shutdown:
            return
        self._shutdown = True
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            deadline = time.monotonic() + timeout
            self.force_flush(timeout)
            # Requests still in flight get what is left of the timeout, then are cancelled:
            # their records go back to the spool with the same key (at-least-once).
            self._drain_deadline = deadline
            self._stopping.set()
            self._notify()
            thread.join(max(deadline - time.monotonic(), 0.0) + 2.0)
            if thread.is_alive():
                # Closing the spool under the worker would lose its last settlements.
                _logger.warning(
                    "%s: the delivery worker did not stop in time; records it holds are "
                    "re-sent with the same key by the next process on %s",
                    self.name,
                    self.config.spool_path,
                )
                return
        left = self.spool.pending(self._dest)
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

    # ------------------------------------------------------------------ worker

    def _run(self, ready: threading.Event) -> None:
        from opentelemetry import context

        # The worker's own HTTP calls must not be traced by instrumented clients.
        context.attach(
            context.set_value(
                context._SUPPRESS_HTTP_INSTRUMENTATION_KEY,
                True,
                context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True),
            )
        )
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, ready))
        except Exception:
            _logger.exception("%s: delivery worker stopped unexpectedly", self.name)
        finally:
            loop.close()

    def _sender(self) -> Sender:
        if self._transport is not None:
            return HttpxSender(self._transport, self._url, self._headers, self.config.timeout)
        return AiohttpSender(self.route, self._headers, self.config.max_in_flight)

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        self._loop = loop
        self._wake = asyncio.Event()
        ready.set()
        in_flight: set[asyncio.Task[None]] = set()
        settled = _Settlement()
        last_prune = 0.0
        wake = self._wake

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            wake.set()  # the loop settles the outcome and leases the next record

        sender = self._sender()
        try:
            while not self._stopping.is_set():
                now = time.time()
                free = self.config.max_in_flight - len(in_flight)
                items: list[SpooledItem] = []
                if free > 0 and now >= self._gate_until:
                    try:
                        if now - last_prune > 600 and isinstance(self.spool, SqliteSpool):
                            self.spool.prune_delivered(now)
                            last_prune = now
                        items = self.spool.lease(self._dest, free, now)
                    except Exception as exc:
                        self._spool_trouble(exc, now)
                    else:
                        self._spool_recovered()
                for item in items:
                    task = loop.create_task(self._send(sender, item, settled))
                    in_flight.add(task)
                    task.add_done_callback(finished)
                if items and len(in_flight) < self.config.max_in_flight:
                    await asyncio.sleep(0)  # let the new requests start, then lease more
                    self._settle(settled)
                    continue
                await self._wait(in_flight, now)
                self._settle(settled)
            if in_flight:
                _, unfinished = await asyncio.wait(
                    in_flight, timeout=max(self._drain_deadline - time.monotonic(), 0.0)
                )
                for task in unfinished:
                    task.cancel()
            self._settle(settled)
        finally:
            await sender.aclose()
        self.spool.release()

    def _spool_trouble(self, exc: Exception, now: float) -> None:
        """The spool failed to answer: pause leasing for a moment instead of dying."""
        self._gate_until = max(self._gate_until, now + SPOOL_ERROR_PAUSE_SECONDS)
        if not self._spool_failing:
            self._spool_failing = True
            _logger.error(
                "%s: the spool %s cannot be read or written (%s: %s); delivery paused until "
                "it can, records and outcomes are kept",
                self.name,
                self.config.spool_path,
                type(exc).__name__,
                exc,
            )

    def _spool_recovered(self) -> None:
        if self._spool_failing:
            self._spool_failing = False
            _logger.warning("%s: the spool %s works again", self.name, self.config.spool_path)

    async def _wait(self, in_flight: set[asyncio.Task[None]], now: float) -> None:
        """Sleep until a request finishes, new records arrive, or a retry falls due."""
        assert self._wake is not None
        if now < self._gate_until:
            delay = self._gate_until - now
        elif len(in_flight) >= self.config.max_in_flight:
            # Nothing can be leased before a request finishes, and a finished request wakes
            # the loop: waiting for a due record here would spin on the spool.
            delay = IDLE_POLL_SECONDS
        else:
            try:
                due = self.spool.next_due(self._dest)
            except Exception:
                due = None  # the next lease reports the trouble
            delay = (
                IDLE_POLL_SECONDS if due is None else min(max(due - now, 0.0), IDLE_POLL_SECONDS)
            )
            if delay == 0.0:
                return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        if in_flight:
            await asyncio.sleep(BATCH_WINDOW_SECONDS)

    async def _send(self, sender: Sender, item: SpooledItem, settled: _Settlement) -> None:
        try:
            # asyncio.timeout, not wait_for: no extra task per request.
            async with asyncio.timeout(self.config.timeout):
                status, retry_after_header, text = await sender.post(item.body, item.key)
        except Exception as exc:
            detail = describe_error(exc, self.route, self.config.timeout)
            cause = type(exc).__name__
            unreachable = is_connect_failure(exc)
            self._unreachable = self._unreachable + 1 if unreachable else 0
            self._retry(item, settled, cause, detail, None, pause_all=unreachable)
            return
        self._unreachable = 0
        outcome = classify_status(status)
        if outcome is Outcome.DELIVERED:
            settled.delivered.append(item)
            self._endpoint_verified = True
            self._endpoint_failures = 0
            self._misconfigured = False
            self.report.recovered()
            return
        excerpt = text[:500]
        retry_after = parse_retry_after(retry_after_header)
        cause = f"HTTP {status}"
        if outcome is Outcome.RETRY:
            if retry_after is not None:
                # Throttling applies to the client, not to one record: pause all sends.
                self._gate_until = max(self._gate_until, time.time() + retry_after)
                cause += f" with Retry-After {retry_after:g} s"
            self._retry(item, settled, cause, f"{cause}: {excerpt}", retry_after)
        elif outcome is Outcome.AUTH:
            detail = f"{cause}, the API key is not accepted ({excerpt}); delivery paused"
            self._gate_until = time.time() + self.retry_policy.max_interval
            self._misconfigured = True
            self._retry(item, settled, cause, detail, None)
        elif outcome is Outcome.ENDPOINT and not (self._endpoint_verified and status in (404, 410)):
            self._endpoint_failures += 1
            self._misconfigured = True
            detail = (
                f"{cause} for POST {self._url}: the endpoint looks wrong (it must be the API's "
                "base URL, for example https://cp-api.withpaygent.com; OTEL_EXPORTER_PAYGENT_"
                f"ENDPOINT); delivery paused, records kept. Answer: {excerpt[:200]}"
            )
            self._retry(item, settled, cause, detail, None, pause_all=True)
        else:
            _logger.error(
                "%s: Paygent rejected usage record %s (%s) with %d: %s; kept as a dead letter",
                self.name,
                item.key,
                item.origin,
                status,
                excerpt,
            )
            settled.rejected.append((item, str(status), excerpt))

    def _retry(
        self,
        item: SpooledItem,
        settled: _Settlement,
        cause: str,
        error: str,
        retry_after: float | None,
        *,
        pause_all: bool = False,
    ) -> None:
        """Schedule the record's next attempt and report the failure (rate-limited).

        ``pause_all``: the failure is the endpoint's, not the record's (it cannot be reached,
        or it is the wrong URL): back off for everyone instead of record by record.
        """
        now = time.time()
        attempts = item.attempts + 1
        limit = self.config.max_retry_seconds
        if limit is not None and now - item.created >= limit:
            settled.gave_up.append((item, error))
            return
        delay = self.retry_policy.delay(max(attempts, self._endpoint_failures), self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if pause_all:
            self._gate_until = max(self._gate_until, now + delay)
        settled.retry.append((item, now + delay, error))
        self.report.failed(cause, error, max(self._gate_until, now + delay) - now)

    def _settle(self, settled: _Settlement) -> None:
        """Write the outcomes of finished requests to the spool in a few transactions.

        An outcome leaves ``settled`` (and is counted) only once it is written: when the
        spool fails (disk full), the rest is kept and written at a later call, so a record
        Paygent accepted is not sent again because its deletion failed once.
        """
        if not settled:
            return
        now = time.time()
        try:
            while settled.delivered:
                chunk = settled.delivered[:_SETTLE_BATCH]
                self.spool.complete([i.rowid for i in chunk], [i.key for i in chunk], now)
                del settled.delivered[: len(chunk)]
                self.stats.add("delivered", len(chunk))
            retry = settled.retry
            self.spool.reschedule([(i.rowid, when, err) for i, when, err in retry])
            settled.retry = []
            self.stats.add("retried", len(retry))
            rejected, gave_up = settled.rejected, settled.gave_up
            dead = [(i.rowid, status, body) for i, status, body in rejected]
            dead += [(i.rowid, "gave_up", err) for i, err in gave_up]
            self.spool.dead_letter(dead, now)
            settled.rejected, settled.gave_up = [], []
        except Exception as exc:
            self._spool_trouble(exc, now)
            return
        self._spool_recovered()
        self.stats.add("rejected", len(rejected))
        self.stats.add("gave_up", len(gave_up))
        for item, err in gave_up:
            _logger.error(
                "%s: gave up on usage record %s (%s) after %.0f s of retries: %s",
                self.name,
                item.key,
                item.origin,
                now - item.created,
                err,
            )


@dataclass
class _Settlement:
    delivered: list[SpooledItem] = field(default_factory=list)
    retry: list[tuple[SpooledItem, float, str]] = field(default_factory=list)
    rejected: list[tuple[SpooledItem, str, str]] = field(default_factory=list)
    gave_up: list[tuple[SpooledItem, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.delivered or self.retry or self.rejected or self.gave_up)
