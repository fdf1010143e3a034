"""The delivery worker: one daemon thread, one asyncio loop, many requests in flight.

It leases due records from the spool, posts each through a :class:`~._transport.Sender`,
asks :func:`~._decision.decide` what the outcome means, and settles the outcomes in a few
spool transactions. It owns no policy (that is ``decide``) and no HTTP (that is the
sender); the pipeline (:mod:`._delivery`) owns the spool, the producer side and the
lifecycle, and starts one worker per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paygent_otel.delivery.decision import Answer, Decision, EndpointState, Failure, Verdict, decide
from paygent_otel.delivery.reporting import FailureReport
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.delivery.spool import Spool, SpooledItem
from paygent_otel.delivery.transport import Route, Sender, describe_error, is_connect_failure

if TYPE_CHECKING:
    from paygent_otel.delivery.pipeline import DeliveryStats

__all__ = ["WORKER_THREAD_PREFIX", "DeliveryWorker", "WorkerSettings"]

_logger = logging.getLogger("paygent_otel.delivery")

IDLE_POLL_SECONDS = 1.0
"""How often an idle worker looks at a shared spool for records other processes added."""
SPOOL_ERROR_PAUSE_SECONDS = 1.0
"""How long the worker waits after the spool failed to answer (disk full, locked too long)."""
BATCH_WINDOW_SECONDS = 0.002
"""After a request finishes while others are in flight, how long the worker lets more
finish before it settles them and leases the next records (one transaction each for the
lot instead of two per record)."""
PRUNE_INTERVAL_SECONDS = 600.0
"""How often delivered keys past their retention window are deleted."""
WORKER_THREAD_PREFIX = "paygent-otel-"
_SETTLE_BATCH = 256


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a worker needs to know of its destination."""

    name: str
    dest: str
    route: Route
    timeout: float
    max_in_flight: int
    max_retry_seconds: float | None
    spool_path: str
    policy: RetryPolicy


class EndpointWatch:
    """What the worker knows of its endpoint, updated from each attempt's decision: when
    sending may resume, whether waiting can help, whether to probe with one request."""

    def __init__(self) -> None:
        self.paused_until = 0.0
        """No request is sent before this time (Unix seconds)."""
        self.state = EndpointState()
        self.misconfigured = False
        """The last answer said the key or the endpoint is wrong: waiting cannot help."""
        self.unreachable = 0
        """Connection attempts that failed in a row (reset by any answer)."""
        self.probing = False
        """After the endpoint's own failure, one request at a time until one is answered."""

    def pause(self, until: float) -> None:
        """Send nothing before ``until`` (a later pause already in effect stays)."""
        self.paused_until = max(self.paused_until, until)

    def note(self, outcome: Answer | Failure, decision: Decision, now: float) -> None:
        """Learn from one attempt's outcome and what :func:`decide` made of it."""
        answered = isinstance(outcome, Answer)
        unreachable = isinstance(outcome, Failure) and outcome.unreachable
        self.unreachable = self.unreachable + 1 if unreachable else 0
        self.probing = decision.endpoint_problem
        if decision.verdict is Verdict.DELIVERED:
            self.state = EndpointState(verified=True)
            self.misconfigured = False
            return
        if decision.endpoint_problem and now >= self.paused_until:
            # Counted once per pause: the requests in flight when it began fail together.
            self.state = EndpointState(self.state.verified, self.state.failures + 1)
        elif answered and not decision.endpoint_problem:
            self.state = EndpointState(self.state.verified)
        if answered:
            self.misconfigured = decision.misconfigured
        if decision.pause_until is not None:
            self.pause(decision.pause_until)


class DeliveryWorker:
    """Delivers one destination's records from the spool until told to stop."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        spool: Callable[[], Spool],
        sender: Callable[[], Sender],
        stats: DeliveryStats,
        report: FailureReport,
        after_settle: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._spool = spool
        self._make_sender = sender
        self._stats = stats
        self._report = report
        self._after_settle = after_settle
        self._rng = random.Random()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self.endpoint = EndpointWatch()
        self._spool_health = _SpoolHealth(settings)
        self._last_prune = 0.0

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> None:
        """Start the thread and return once its loop runs (or 5 s passed)."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(ready,),
            name=f"{WORKER_THREAD_PREFIX}{self.settings.name}",
            daemon=True,
        )
        self._thread.start()
        ready.wait(5.0)

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def notify(self) -> None:
        """Wake the loop: records were added, or something is waiting on it."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(wake.set)

    def stop(self, deadline: float) -> bool:
        """Stop by ``deadline`` (monotonic): in-flight requests get until then, then are
        cancelled (their records stay pending with their key). False if it did not stop."""
        thread = self._thread
        if thread is None:
            return True
        self._drain_deadline = deadline
        self._stopping.set()
        self.notify()
        thread.join(max(deadline - time.monotonic(), 0.0) + 2.0)
        return not thread.is_alive()

    # ------------------------------------------------------------------ the loop (its thread)

    def _run(self, ready: threading.Event) -> None:
        _suppress_instrumentation()
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, ready))
        except Exception:
            _logger.exception("%s: delivery worker stopped unexpectedly", self.settings.name)
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        self._loop = loop
        self._wake = wake = asyncio.Event()
        ready.set()
        in_flight: set[asyncio.Task[None]] = set()
        settled = _Settlement()

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            wake.set()  # the loop settles the outcome and leases the next record

        sender = self._make_sender()
        try:
            while not self._stopping.is_set():
                now = time.time()
                items = self._lease(self._capacity() - len(in_flight), now)
                for item in items:
                    task = loop.create_task(self._send(sender, item, settled))
                    in_flight.add(task)
                    task.add_done_callback(finished)
                if items and len(in_flight) < self._capacity():
                    await asyncio.sleep(0)  # let the new requests start, then lease more
                    self._settle(settled)
                    continue
                await self._wait(in_flight, now)
                self._settle(settled)
                self._after_settle()
            if in_flight:
                _, unfinished = await asyncio.wait(
                    in_flight, timeout=max(self._drain_deadline - time.monotonic(), 0.0)
                )
                for task in unfinished:
                    task.cancel()
            self._settle(settled)
        finally:
            await sender.aclose()
        self._spool().release()

    def _capacity(self) -> int:
        """Requests allowed in flight. While probing a failed endpoint, one request finds
        out whether it is back: not every pending record at once at each backoff interval."""
        return 1 if self.endpoint.probing else self.settings.max_in_flight

    def _lease(self, free: int, now: float) -> list[SpooledItem]:
        if free <= 0 or now < self.endpoint.paused_until:
            return []
        spool = self._spool()
        try:
            if now - self._last_prune > PRUNE_INTERVAL_SECONDS:
                spool.prune_delivered(now)
                self._last_prune = now
            items = spool.lease(self.settings.dest, free, now)
        except Exception as exc:
            self._spool_trouble(exc, now)
            return []
        self._spool_health.recovered()
        return items

    async def _wait(self, in_flight: set[asyncio.Task[None]], now: float) -> None:
        """Sleep until a request finishes, new records arrive, or a retry falls due."""
        assert self._wake is not None
        if now < self.endpoint.paused_until:
            delay = self.endpoint.paused_until - now
        elif len(in_flight) >= self._capacity():
            # Nothing can be leased before a request finishes, and a finished request wakes
            # the loop: waiting for a due record here would spin on the spool.
            delay = IDLE_POLL_SECONDS
        else:
            try:
                due = self._spool().next_due(self.settings.dest)
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
        outcome = await _attempt(sender, item, self.settings.route, self.settings.timeout)
        now = time.time()
        decision = decide(
            outcome,
            attempts=item.attempts + 1,
            created=item.created,
            endpoint=self.endpoint.state,
            url=self.settings.route.url,
            policy=self.settings.policy,
            max_retry_seconds=self.settings.max_retry_seconds,
            now=now,
            rng=self._rng,
        )
        self._apply(item, outcome, decision, settled, now)

    def _apply(
        self,
        item: SpooledItem,
        outcome: Answer | Failure,
        decision: Decision,
        settled: _Settlement,
        now: float,
    ) -> None:
        """Update what the worker knows of its endpoint, and queue the record's settlement."""
        self.endpoint.note(outcome, decision, now)
        if decision.verdict is Verdict.DELIVERED:
            self._report.recovered()
            settled.delivered.append(item)
        elif decision.verdict is Verdict.RETRY:
            assert decision.retry_at is not None
            settled.retry.append((item, decision.retry_at, decision.detail))
            retry_in = max(self.endpoint.paused_until, decision.retry_at) - now
            self._report.failed(decision.cause, decision.detail, retry_in)
        elif decision.status == "gave_up":
            settled.gave_up.append((item, decision.detail))
        else:
            _logger.error(
                "%s: Paygent rejected usage record %s (%s) with %s: %s; kept as a dead letter",
                self.settings.name,
                item.key,
                item.origin,
                decision.status,
                decision.detail,
            )
            settled.rejected.append((item, decision.status, decision.detail))

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
            rejected, gave_up = settled.write(self._spool(), self._stats, now)
        except Exception as exc:
            self._spool_trouble(exc, now)
            return
        self._spool_health.recovered()
        self._stats.add("rejected", len(rejected))
        self._stats.add("gave_up", len(gave_up))
        for item, err in gave_up:
            _logger.error(
                "%s: gave up on usage record %s (%s) after %.0f s of retries: %s",
                self.settings.name,
                item.key,
                item.origin,
                now - item.created,
                err,
            )

    def _spool_trouble(self, exc: Exception, now: float) -> None:
        """The spool failed to answer: pause leasing for a moment instead of dying."""
        self.endpoint.pause(now + SPOOL_ERROR_PAUSE_SECONDS)
        self._spool_health.failed(exc)


def _suppress_instrumentation() -> None:
    """The worker's own HTTP calls must not be traced by instrumented clients."""
    from opentelemetry import context

    context.attach(
        context.set_value(
            context._SUPPRESS_HTTP_INSTRUMENTATION_KEY,
            True,
            context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True),
        )
    )


async def _attempt(
    sender: Sender, item: SpooledItem, route: Route, timeout: float
) -> Answer | Failure:
    """Post one record: the answer, or the failure that came instead."""
    try:
        # asyncio.timeout, not wait_for: no extra task per request.
        async with asyncio.timeout(timeout):
            status, retry_after, text = await sender.post(item.body, item.key)
    except Exception as exc:
        detail = describe_error(exc, route, timeout)
        return Failure(type(exc).__name__, detail, is_connect_failure(exc))
    return Answer(status, retry_after, text)


class _SpoolHealth:
    """Says once that the spool fails (disk full, locked too long), and once that it works."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._name, self._path = settings.name, settings.spool_path
        self._failing = False

    def failed(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            _logger.error(
                "%s: the spool %s cannot be read or written (%s: %s); delivery paused until "
                "it can, records and outcomes are kept",
                self._name,
                self._path,
                type(exc).__name__,
                exc,
            )

    def recovered(self) -> None:
        if self._failing:
            self._failing = False
            _logger.warning("%s: the spool %s works again", self._name, self._path)


@dataclass
class _Settlement:
    """Outcomes of finished requests, waiting to be written to the spool."""

    delivered: list[SpooledItem] = field(default_factory=list)
    retry: list[tuple[SpooledItem, float, str]] = field(default_factory=list)
    rejected: list[tuple[SpooledItem, str, str]] = field(default_factory=list)
    gave_up: list[tuple[SpooledItem, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.delivered or self.retry or self.rejected or self.gave_up)

    def write(
        self, spool: Spool, stats: DeliveryStats, now: float
    ) -> tuple[list[tuple[SpooledItem, str, str]], list[tuple[SpooledItem, str]]]:
        """Write every outcome, emptying the lists as each part is written (delivered ones
        are counted here, chunk by chunk); returns the dead letters written. Raises what
        the spool raises, keeping what was not written."""
        while self.delivered:
            chunk = self.delivered[:_SETTLE_BATCH]
            spool.complete([i.rowid for i in chunk], [i.key for i in chunk], now)
            del self.delivered[: len(chunk)]
            stats.add("delivered", len(chunk))
        retry = self.retry
        spool.reschedule([(i.rowid, when, err) for i, when, err in retry])
        self.retry = []
        stats.add("retried", len(retry))
        rejected, gave_up = self.rejected, self.gave_up
        dead = [(i.rowid, status, body) for i, status, body in rejected]
        dead += [(i.rowid, "gave_up", err) for i, err in gave_up]
        spool.dead_letter(dead, now)
        self.rejected, self.gave_up = [], []
        return rejected, gave_up
