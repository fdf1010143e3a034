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

import aiohttp
import httpx

from ._config import ExporterConfig
from ._mapping import Rejection, RejectReason, UsageRecord
from ._retry import Outcome, RetryPolicy, classify_status, parse_retry_after
from ._spool import MemorySpool, Spool, SpooledItem, SqliteSpool, destination_id, open_spool
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
        spool: Spool | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.retry_policy = retry_policy or RetryPolicy()
        self.stats = DeliveryStats()
        self._transport = transport
        self._dest = destination_id(config.endpoint)
        self._url = config.endpoint + USAGE_PATH
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
        self._auth_failed_logged = False
        self._spool_failing = False
        self._spool_error: str | None = None
        self._spool_retry_at = 0.0
        self.spool = spool if spool is not None else self._open_spool()
        _live_pipelines.add(self)
        if not config.api_key:
            _logger.error(
                "%s: no Paygent API key (set PAYGENT_API_KEY or pass api_key=); usage is %s "
                "but nothing is sent until a key is configured",
                name,
                "kept in the spool " + str(config.spool_path)
                if self.spool.durable
                else "counted as dropped (in-memory mode)",
            )

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
        if not self.config.api_key and not self.spool.durable:
            self.stats.add("dropped_no_api_key", len(records))
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
        if result.accepted and self.config.api_key:
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
        if self.config.api_key and not self._shutdown:
            self._ensure_worker()
            self._notify()

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Wait until this destination has nothing pending; False on timeout."""
        if not self.config.api_key:
            return self.spool.pending(self._dest) == 0
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.pending(self._dest) == 0:
                return True
            self._notify()
            time.sleep(0.02)
        return self.spool.pending(self._dest) == 0

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
            _logger.warning(
                "%s: %d usage records stay in the spool %s for the next start",
                self.name,
                left,
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

    def _sender(self) -> _HttpxSender | _AiohttpSender:
        if self._transport is not None:
            return _HttpxSender(self._transport, self._url, self._headers, self.config.timeout)
        return _AiohttpSender(self._url, self._headers, self.config.max_in_flight)

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

    async def _send(
        self, sender: _HttpxSender | _AiohttpSender, item: SpooledItem, settled: _Settlement
    ) -> None:
        try:
            # asyncio.timeout, not wait_for: no extra task per request.
            async with asyncio.timeout(self.config.timeout):
                status, retry_after_header, text = await sender.post(item.body, item.key)
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            connect_failed = isinstance(
                exc, httpx.ConnectError | aiohttp.ClientConnectorError | ConnectionRefusedError
            )
            self._retry(item, settled, f"{type(exc).__name__}: {exc}", None, connect_failed)
            return
        except Exception as exc:
            self._retry(item, settled, f"{type(exc).__name__}: {exc}", None, False)
            return
        outcome = classify_status(status)
        if outcome is Outcome.DELIVERED:
            settled.delivered.append(item)
            return
        excerpt = text[:500]
        retry_after = parse_retry_after(retry_after_header)
        if outcome is Outcome.RETRY:
            if retry_after is not None:
                # Throttling applies to the client, not to one record: pause all sends.
                self._gate_until = max(self._gate_until, time.time() + retry_after)
            self._retry(item, settled, f"HTTP {status}: {excerpt}", retry_after, False)
        elif outcome is Outcome.AUTH:
            if not self._auth_failed_logged:
                _logger.error(
                    "%s: Paygent answered %d (the API key is not accepted); delivery paused, "
                    "records kept: %s",
                    self.name,
                    status,
                    excerpt,
                )
                self._auth_failed_logged = True
            self._gate_until = time.time() + self.retry_policy.max_interval
            self._retry(item, settled, f"HTTP {status}: {excerpt}", None, False)
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
        error: str,
        retry_after: float | None,
        connect_failed: bool,
    ) -> None:
        now = time.time()
        attempts = item.attempts + 1
        limit = self.config.max_retry_seconds
        if limit is not None and now - item.created >= limit:
            settled.gave_up.append((item, error))
            return
        delay = self.retry_policy.delay(attempts, self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if connect_failed:
            # The endpoint is down: back off for everyone instead of record by record.
            self._gate_until = max(self._gate_until, now + delay)
        settled.retry.append((item, now + delay, error))

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
                self._auth_failed_logged = False
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


class _HttpxSender:
    """POSTs through an injected httpx transport (tests, custom TLS or proxies)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, url: str, headers: dict[str, str], timeout: float
    ) -> None:
        self._url = url
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers)

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text)."""
        response = await self._client.post(
            self._url, content=body, headers={"Idempotency-Key": key}
        )
        return response.status_code, response.headers.get("Retry-After"), response.text

    async def aclose(self) -> None:
        await self._client.aclose()


class _AiohttpSender:
    """POSTs with aiohttp itself: the default.

    httpx's client layers (URL merging, cookies, auth and redirect handling, its own
    request and response objects) over the aiohttp transport cost about 60% more CPU per
    request than aiohttp alone on this path (``bench/README.md``, delivery profile).
    """

    def __init__(self, url: str, headers: dict[str, str], max_in_flight: int) -> None:
        from yarl import URL

        self._url = URL(url)
        self._headers = headers
        # Timeouts are applied by the caller (asyncio.timeout around each post).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_in_flight),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text; empty after a 2xx)."""
        async with self._session.post(
            self._url,
            data=body,
            headers={**self._headers, "Idempotency-Key": key},
            allow_redirects=False,  # as with httpx: a redirect is an answer, not followed
        ) as response:
            raw = await response.read()
            if 200 <= response.status < 300:
                return response.status, None, ""
            text = raw.decode("utf-8", "replace")
            return response.status, response.headers.get("Retry-After"), text

    async def aclose(self) -> None:
        await self._session.close()
