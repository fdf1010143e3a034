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
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from ._config import ExporterConfig
from ._mapping import Rejection, RejectReason, UsageRecord
from ._retry import Outcome, RetryPolicy, classify_status, parse_retry_after
from ._spool import MemorySpool, SpooledItem, SqliteSpool, destination_id, open_spool
from ._version import __version__

__all__ = ["USAGE_PATH", "DeliveryPipeline", "DeliveryStats"]

_logger = logging.getLogger("paygent_otel.delivery")

USAGE_PATH = "/api/v2/usage"
"""The Paygent standalone usage endpoint (all three kinds)."""
IDLE_POLL_SECONDS = 1.0
"""How often an idle worker looks at a shared spool for records other processes added."""
_SETTLE_BATCH = 256
_WORKER_THREAD_PREFIX = "paygent-otel-"


class _QuietWorkerRequests(logging.Filter):
    """httpx logs every request at INFO; one line per usage record is noise for the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith(_WORKER_THREAD_PREFIX)


logging.getLogger("httpx").addFilter(_QuietWorkerRequests())


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
        self._dest = destination_id(config.endpoint, config.api_key)
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
        self._auth_failed_logged = False
        self.spool = (
            spool
            if spool is not None
            else open_spool(config.spool_path, max_bytes=config.spool_max_bytes)
        )
        if not config.api_key:
            _logger.error(
                "%s: no Paygent API key (set PAYGENT_API_KEY or pass api_key=); usage is %s "
                "but nothing is sent until a key is configured",
                name,
                "kept in the spool " + str(config.spool_path)
                if self.spool.durable
                else "counted as dropped (in-memory mode)",
            )

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
            # A forked child: the parent's thread and loop do not exist here.
            self._pid = os.getpid()
            self._thread = None
            self._loop = None
            self._stopping = threading.Event()
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
        if self._thread is not None and self._pid == os.getpid():
            self.force_flush(timeout)
            self._stopping.set()
            self._notify()
            self._thread.join(min(timeout, 5.0) + 1.0)
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

    def _client(self) -> httpx.AsyncClient:
        transport = self._transport
        if transport is None:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(
                limits=httpx.Limits(
                    max_connections=self.config.max_in_flight,
                    max_keepalive_connections=self.config.max_in_flight,
                )
            )
        return httpx.AsyncClient(
            transport=transport, timeout=self.config.timeout, headers=self._headers
        )

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        self._loop = loop
        self._wake = asyncio.Event()
        ready.set()
        in_flight: set[asyncio.Task[None]] = set()
        settled = _Settlement()
        last_prune = 0.0
        async with self._client() as client:
            while not self._stopping.is_set():
                now = time.time()
                if now - last_prune > 600 and isinstance(self.spool, SqliteSpool):
                    self.spool.prune_delivered(now)
                    last_prune = now
                free = self.config.max_in_flight - len(in_flight)
                items: list[SpooledItem] = []
                if free > 0 and now >= self._gate_until:
                    items = self.spool.lease(self._dest, free, now)
                for item in items:
                    task = loop.create_task(self._send(client, item, settled))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if items and len(in_flight) < self.config.max_in_flight:
                    await asyncio.sleep(0)  # let the new requests start, then lease more
                    self._settle(settled)
                    continue
                await self._wait(in_flight, now)
                self._settle(settled)
            if in_flight:
                await asyncio.wait(in_flight, timeout=self.config.timeout + 1.0)
            self._settle(settled)
        self.spool.release()

    async def _wait(self, in_flight: set[asyncio.Task[None]], now: float) -> None:
        """Sleep until a request finishes, new records arrive, or a retry falls due."""
        assert self._wake is not None
        if now < self._gate_until:
            delay = self._gate_until - now
        else:
            due = self.spool.next_due(self._dest)
            delay = (
                IDLE_POLL_SECONDS if due is None else min(max(due - now, 0.0), IDLE_POLL_SECONDS)
            )
            if delay == 0.0 and len(in_flight) < self.config.max_in_flight:
                return
        self._wake.clear()
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._wake.wait())]
        if in_flight:
            waiters.append(
                asyncio.ensure_future(asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED))
            )
        _, pending = await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()

    async def _send(
        self, client: httpx.AsyncClient, item: SpooledItem, settled: _Settlement
    ) -> None:
        try:
            response = await asyncio.wait_for(
                client.post(self._url, content=item.body, headers={"Idempotency-Key": item.key}),
                self.config.timeout,
            )
        except (httpx.TransportError, TimeoutError, OSError) as exc:
            connect_failed = isinstance(exc, httpx.ConnectError | ConnectionRefusedError)
            self._retry(item, settled, f"{type(exc).__name__}: {exc}", None, connect_failed)
            return
        except Exception as exc:
            self._retry(item, settled, f"{type(exc).__name__}: {exc}", None, False)
            return
        outcome = classify_status(response.status_code)
        if outcome is Outcome.DELIVERED:
            settled.delivered.append(item)
            return
        excerpt = response.text[:500]
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if outcome is Outcome.RETRY:
            if retry_after is not None:
                # Throttling applies to the client, not to one record: pause all sends.
                self._gate_until = max(self._gate_until, time.time() + retry_after)
            self._retry(
                item, settled, f"HTTP {response.status_code}: {excerpt}", retry_after, False
            )
        elif outcome is Outcome.AUTH:
            if not self._auth_failed_logged:
                _logger.error(
                    "%s: Paygent answered %d (the API key is not accepted); delivery paused, "
                    "records kept: %s",
                    self.name,
                    response.status_code,
                    excerpt,
                )
                self._auth_failed_logged = True
            self._gate_until = time.time() + self.retry_policy.max_interval
            self._retry(item, settled, f"HTTP {response.status_code}: {excerpt}", None, False)
        else:
            _logger.error(
                "%s: Paygent rejected usage record %s (%s) with %d: %s; kept as a dead letter",
                self.name,
                item.key,
                item.origin,
                response.status_code,
                excerpt,
            )
            settled.rejected.append((item, str(response.status_code), excerpt))

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
        """Write the outcomes of finished requests to the spool in a few transactions."""
        if not settled:
            return
        now = time.time()
        delivered, settled.delivered = settled.delivered, []
        retry, settled.retry = settled.retry, []
        rejected, settled.rejected = settled.rejected, []
        gave_up, settled.gave_up = settled.gave_up, []
        try:
            for start in range(0, len(delivered), _SETTLE_BATCH):
                chunk = delivered[start : start + _SETTLE_BATCH]
                self.spool.complete([i.rowid for i in chunk], [i.key for i in chunk], now)
            self.spool.reschedule([(i.rowid, when, err) for i, when, err in retry])
            dead = [(i.rowid, status, body) for i, status, body in rejected]
            dead += [(i.rowid, "gave_up", err) for i, err in gave_up]
            self.spool.dead_letter(dead, now)
        except Exception:
            _logger.exception("%s: could not update the spool; records will be re-sent", self.name)
        self.stats.add("delivered", len(delivered))
        self.stats.add("retried", len(retry))
        self.stats.add("rejected", len(rejected))
        self.stats.add("gave_up", len(gave_up))
        if delivered and self._auth_failed_logged:
            self._auth_failed_logged = False
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
