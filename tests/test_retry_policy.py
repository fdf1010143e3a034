"""What a tracking answer does to a record: the retry policy and the delivery worker's rules.

``_retry`` is tested as plain functions; the worker (``DeliveryPipeline``, posting through
its runtime HTTP stack) against loopback HTTP servers that answer what each test needs,
with a real SQLite spool, and its counters read back through a real ``MeterProvider``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import wait_for
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import paygent_otel.delivery.pipeline as delivery
from paygent_otel import PaygentMetricExporter, PaygentSpanExporter
from paygent_otel.convention.mapping import UsageRecord
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import USAGE_PATH, DeliveryPipeline
from paygent_otel.delivery.retry import (
    AUTH_STATUSES,
    MAX_RETRY_AFTER,
    RETRYABLE_STATUSES,
    Outcome,
    RetryPolicy,
    classify_status,
    parse_retry_after,
)
from paygent_otel.delivery.selfmetrics import (
    RECORDS_METRIC,
    SPOOL_DEAD_METRIC,
    SPOOL_PENDING_METRIC,
)
from paygent_otel.delivery.spool import SqliteSpool

SECRET_KEY = "pk_live_7f3a9c2e51d84b06aa1f"
FAST = RetryPolicy(initial_interval=0.02, max_interval=0.1)

# ---------------------------------------------------------------- classify_status


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify_status(status) is Outcome.DELIVERED


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 507, 599])
def test_timeouts_throttling_and_5xx_are_retried(status: int) -> None:
    assert classify_status(status) is Outcome.RETRY


@pytest.mark.parametrize("status", sorted(AUTH_STATUSES))
def test_a_refused_key_pauses_instead_of_rejecting(status: int) -> None:
    assert classify_status(status) is Outcome.AUTH


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 399, 404, 405, 410])
def test_redirects_and_unknown_paths_point_at_the_endpoint(status: int) -> None:
    assert classify_status(status) is Outcome.ENDPOINT


@pytest.mark.parametrize("status", [400, 409, 413, 415, 422])
def test_other_4xx_are_definitive(status: int) -> None:
    assert classify_status(status) is Outcome.REJECTED


def test_the_retryable_set_is_the_documented_one() -> None:
    assert frozenset({408, 425, 429, 500, 502, 503, 504}) == RETRYABLE_STATUSES


# ---------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), (" 3 ", 3.0), ("0", 0.0), ("0.5", 0.5), ("-4", 0.0), ("120", 120.0)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize("header", [None, "", "   ", "soon", "nan", "Mon, 99 Foo 2025"])
def test_unreadable_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header) is None


def test_a_huge_retry_after_is_capped() -> None:
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER
    assert parse_retry_after("inf") == MAX_RETRY_AFTER


def test_retry_after_as_an_http_date() -> None:
    now = 1_760_000_000.0
    header = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)

    assert parse_retry_after(header, now=now) == pytest.approx(30.0)
    assert parse_retry_after(header, now=now + 60) == 0.0  # already past


def test_every_http_date_form_is_read_as_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1994-11-06 08:49:37 GMT, in the three forms RFC 9110 lets a server send.
    when = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        for header in (
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ):
            assert parse_retry_after(header, now=when - 10) == pytest.approx(10.0), header
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# ---------------------------------------------------------------- RetryPolicy


def test_backoff_grows_by_the_multiplier_up_to_the_cap_within_the_jitter() -> None:
    policy = RetryPolicy(initial_interval=0.5, multiplier=2.0, max_interval=8.0, jitter=0.25)
    rng = random.Random(7)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(500)]
        assert min(delays) >= base * 0.75 and max(delays) <= base * 1.25, attempt
        # The jitter spreads the retries of records that failed together.
        assert max(delays) - min(delays) > base * 0.3


def test_without_jitter_the_delay_is_exact() -> None:
    policy = RetryPolicy(initial_interval=1.0, multiplier=1.5, max_interval=30.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 1.5, 2.25]


def test_the_delay_stays_capped_after_thousands_of_attempts() -> None:
    # No time limit by default: a long outage reaches attempt counts where 2**n overflows.
    policy = RetryPolicy(initial_interval=1.0, max_interval=30.0, jitter=0.5)
    assert 15.0 <= policy.delay(5000) <= 45.0


def test_the_default_policy() -> None:
    policy = RetryPolicy()
    assert (policy.initial_interval, policy.multiplier, policy.max_interval, policy.jitter) == (
        1.0,
        2.0,
        30.0,
        0.5,
    )


# ---------------------------------------------------------------- the worker


class Backend:
    """A scripted Paygent on a loopback port; ``answer(request, n)`` decides each answer.

    A real HTTP server (aiohttp's, in a thread of its own), so the pipeline posts through
    its runtime HTTP stack, as in production. ``answer`` gets the request as an
    ``httpx.Request`` and returns an ``httpx.Response``; status 599 means "hang".
    """

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, httpx.Request]] = []
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        app = web.Application()
        app.router.add_post(USAGE_PATH, self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._call(self._runner.setup())
        self._site: web.TCPSite | None = None
        self.port = 0
        self.listen()
        _backends.append(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def listen(self) -> None:
        """Accept connections (again, on the same port)."""
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        self._call(self._site.start())
        server = self._site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    def refuse(self) -> None:
        """Stop listening: connections to the port are refused (an outage)."""
        assert self._site is not None
        self._call(self._site.stop())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = httpx.Request(
            request.method, str(request.url), headers=request.headers, content=await request.read()
        )
        with self.lock:
            self.requests.append((time.time(), seen))
            n = len(self.requests)
        response = self.answer(seen, n)
        if response.status_code == 599:  # the scripted way to say "hang"
            await asyncio.sleep(3600)
        headers = {k: v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
        return web.Response(status=response.status_code, body=response.content, headers=headers)

    def keys(self) -> list[str]:
        with self.lock:
            return [r.headers["Idempotency-Key"] for _, r in self.requests]

    def bodies(self) -> list[bytes]:
        with self.lock:
            return [r.content for _, r in self.requests]


_PASSED_HEADERS = {"retry-after", "content-type", "location"}
_backends: list[Backend] = []


@pytest.fixture(autouse=True)
def _close_backends() -> Iterator[None]:
    yield
    while _backends:
        _backends.pop().close()


def usage(i: int) -> UsageRecord:
    payload = {
        "agentId": "agent-voice",
        "customerId": "cust-1",
        "indicator": "minutes",
        "rawUsage": {"provider": "deepgram", "model": "nova-2", "plan": "default",
                     "audioDuration": 1.0 + i},
    }  # fmt: skip
    return UsageRecord(f"usage-key-{i:04d}", payload, f"span turn #{i}")


def make_pipeline(
    tmp_path: Path,
    backend: Backend,
    *,
    policy: RetryPolicy = FAST,
    api_key: str | None = SECRET_KEY,
    spool: str | None = None,
    **config: Any,
) -> DeliveryPipeline:
    resolved = ExporterConfig.resolve(
        "traces",
        endpoint=backend.url,
        api_key=api_key,
        spool_path=spool or str(tmp_path / "spool.sqlite3"),
        **config,
    )
    return DeliveryPipeline(resolved, name="traces", retry_policy=policy)


def counted(pipeline: DeliveryPipeline, outcome: str, expected: int) -> dict[str, int]:
    """The counters once ``outcome`` reached ``expected``.

    An outcome is counted just after it is written to the spool, so right after
    ``force_flush`` returns (nothing pending) the count may still be a moment behind.
    """
    wait_for(
        lambda: pipeline.stats.snapshot().get(outcome, 0) >= expected,
        timeout=5,
        message=f"{outcome} == {expected}",
    )
    stats = pipeline.stats.snapshot()
    assert stats[outcome] == expected
    return stats


def always(status: int, body: str = "{}", **headers: str) -> Callable[..., httpx.Response]:
    return lambda request, n: httpx.Response(status, text=body, headers=headers)


def test_retryable_answers_are_retried_with_the_same_key_and_body_until_accepted(
    tmp_path: Path,
) -> None:
    statuses = iter([503, 500, 408, 429, 502, 200])
    backend = Backend(lambda request, n: httpx.Response(next(statuses)))
    pipeline = make_pipeline(tmp_path, backend)

    assert pipeline.submit([usage(1)]) == 0
    assert pipeline.force_flush(10)

    assert backend.keys() == ["usage-key-0001"] * 6
    assert len(set(backend.bodies())) == 1
    assert json.loads(backend.bodies()[0]) == usage(1).payload
    stats = counted(pipeline, "delivered", 1)
    assert (stats["accepted"], stats["retried"]) == (1, 5)
    pipeline.shutdown(1)


def test_a_definitive_rejection_is_dead_lettered_with_its_message_and_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    message = '{"error":"customerId: unknown customer cust-1"}' + " " * 600
    backend = Backend(always(422, message))
    pipeline = make_pipeline(tmp_path, backend)

    pipeline.submit([usage(1), usage(2)])
    assert pipeline.force_flush(10)
    time.sleep(0.2)  # a retry, if there were one, would come now

    assert sorted(backend.keys()) == ["usage-key-0001", "usage-key-0002"]
    assert isinstance(pipeline.spool, SqliteSpool)
    dead = {d.key: d for d in pipeline.spool.dead_letters()}
    assert dead.keys() == {"usage-key-0001", "usage-key-0002"}
    letter = dead["usage-key-0001"]
    assert (letter.status, letter.attempts) == ("422", 1)
    assert letter.reason.startswith('{"error":"customerId: unknown customer cust-1"}')
    assert len(letter.reason) == 500  # an excerpt, not the whole body
    assert json.loads(letter.body) == usage(1).payload
    assert pipeline.stats.snapshot()["rejected"] == 2
    assert "usage-key-0001" in caplog.text and "unknown customer" in caplog.text
    pipeline.shutdown(1)


def test_a_refused_key_pauses_delivery_keeps_records_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    accepted = threading.Event()

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(200) if accepted.is_set() else httpx.Response(401, text="bad key")

    backend = Backend(answer)
    pipeline = make_pipeline(tmp_path, backend)
    pipeline.submit([usage(i) for i in range(3)])

    wait_for(lambda: len(backend.requests) >= 6, message="several refused attempts")
    assert pipeline.spool.pending() == 3 and pipeline.spool.stats().dead_letters == 0
    assert caplog.text.count("the API key is not accepted") == 1

    accepted.set()  # the key was fixed on Paygent's side
    assert pipeline.force_flush(10)
    counted(pipeline, "delivered", 3)
    pipeline.shutdown(1)


def test_a_time_limit_turns_endless_failures_into_gave_up_dead_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Backend(always(503, "overloaded"))
    pipeline = make_pipeline(tmp_path, backend, max_retry_seconds=0.3)

    pipeline.submit([usage(1)])
    assert pipeline.force_flush(10)

    (letter,) = pipeline.spool.dead_letters()
    assert (letter.status, letter.key) == ("gave_up", "usage-key-0001")
    assert "HTTP 503: overloaded" in letter.reason
    counted(pipeline, "gave_up", 1)
    wait_for(lambda: "gave up on usage record usage-key-0001" in caplog.text)
    pipeline.shutdown(1)


def test_without_a_time_limit_the_durable_spool_never_gives_up(tmp_path: Path) -> None:
    backend = Backend(always(503))
    pipeline = make_pipeline(
        tmp_path, backend, policy=RetryPolicy(initial_interval=0.01, max_interval=0.01)
    )
    assert pipeline.config.max_retry_seconds is None

    pipeline.submit([usage(1)])
    wait_for(lambda: len(backend.requests) >= 30, message="thirty attempts")

    assert pipeline.spool.pending() == 1 and pipeline.spool.stats().dead_letters == 0
    pipeline.shutdown(0.1)


def test_retry_after_pauses_every_send_not_just_the_throttled_record(tmp_path: Path) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(429, headers={"Retry-After": "1"})
        return httpx.Response(200)

    backend = Backend(answer)
    pipeline = make_pipeline(tmp_path, backend, max_in_flight=1)
    pipeline.submit([usage(1)])
    wait_for(lambda: backend.requests, message="the throttled request")
    pipeline.submit([usage(2), usage(3)])  # new records, due at once

    assert pipeline.force_flush(10)

    first, *later = [t for t, _ in backend.requests]
    assert len(later) == 3
    assert min(later) - first >= 1.0  # nothing at all was sent before the Retry-After
    pipeline.shutdown(1)


def test_connection_failures_pause_all_sends_and_the_records_go_out_later(tmp_path: Path) -> None:
    backend = Backend(always(200))
    backend.refuse()  # an outage: connections are refused
    pipeline = make_pipeline(tmp_path, backend, max_in_flight=8)
    pipeline.submit([usage(i) for i in range(20)])
    time.sleep(0.5)
    failed = pipeline.stats.snapshot().get("retried", 0)
    backend.listen()

    assert pipeline.force_flush(10)
    # Backing off together: far fewer attempts than 20 records hammering for 0.5 s.
    assert 0 < failed < 20 * 10
    assert sorted(set(backend.keys())) == [f"usage-key-{i:04d}" for i in range(20)]
    counted(pipeline, "delivered", 20)
    pipeline.shutdown(1)


def test_a_request_that_takes_longer_than_the_timeout_is_retried(tmp_path: Path) -> None:
    backend = Backend(lambda request, n: httpx.Response(599 if n == 1 else 200))
    pipeline = make_pipeline(tmp_path, backend, timeout=0.2)

    pipeline.submit([usage(1)])

    assert pipeline.force_flush(10)
    assert backend.keys() == ["usage-key-0001", "usage-key-0001"]
    assert pipeline.stats.snapshot()["retried"] == 1
    pipeline.shutdown(1)


def test_shutdown_is_bounded_and_records_in_flight_stay_for_the_next_process(
    tmp_path: Path,
) -> None:
    backend = Backend(always(599))  # every request hangs
    pipeline = make_pipeline(tmp_path, backend, timeout=30)
    pipeline.submit([usage(1), usage(2)])
    wait_for(lambda: len(backend.requests) == 2, message="both requests in flight")

    started = time.monotonic()
    pipeline.shutdown(0.5)
    took = time.monotonic() - started

    next_process = SqliteSpool(tmp_path / "spool.sqlite3", max_bytes=1 << 30)
    leased = next_process.lease(pipeline._dest, 10, time.time())
    assert sorted(i.key for i in leased) == ["usage-key-0001", "usage-key-0002"]
    next_process.close()
    assert took < 10  # bounded by the shutdown timeout, not the 30 s request timeout


def test_a_spool_that_fails_for_a_while_loses_no_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Backend(always(200))
    pipeline = make_pipeline(tmp_path, backend)
    spool = pipeline.spool
    assert isinstance(spool, SqliteSpool)
    failures = {"complete": 3, "lease": 2}
    real_complete, real_lease = spool.complete, spool.lease

    def flaky(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if failures[name]:
                failures[name] -= 1
                raise OSError(28, "No space left on device")
            return real(*args)

        return call

    monkeypatch.setattr(spool, "complete", flaky("complete", real_complete))
    pipeline.submit([usage(1)])
    wait_for(lambda: failures["complete"] == 0, message="three failed settlements")
    monkeypatch.setattr(spool, "lease", flaky("lease", real_lease))
    pipeline.submit([usage(2)])

    assert pipeline.force_flush(15)
    # Each record was sent once: its accepted answer was kept until the spool took it.
    assert sorted(backend.keys()) == ["usage-key-0001", "usage-key-0002"]
    counted(pipeline, "delivered", 2)
    assert "No space left on device" in caplog.text and "works again" in caplog.text
    pipeline.shutdown(1)


def test_an_unusable_spool_path_refuses_and_counts_without_stopping_the_application(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the spool folder should be")
    backend = Backend(always(200))
    monkeypatch.setattr(delivery, "SPOOL_REOPEN_SECONDS", 0.0)

    pipeline = make_pipeline(tmp_path, backend, spool=str(blocker / "spool.sqlite3"))

    assert "cannot use the spool" in caplog.text and str(blocker) in caplog.text
    assert pipeline.submit([usage(1), usage(2)]) == 2
    assert pipeline.stats.snapshot()["refused"] == 2
    assert "2 usage records refused" in caplog.text
    # Once the path is usable the pipeline takes records again, without a restart.
    blocker.unlink()
    assert pipeline.submit([usage(3)]) == 0
    assert pipeline.force_flush(10)
    assert backend.keys() == ["usage-key-0003"]
    pipeline.shutdown(1)


def test_records_spooled_without_a_key_are_sent_by_the_first_process_with_one(
    tmp_path: Path,
) -> None:
    backend = Backend(always(200))
    keyless = make_pipeline(tmp_path, backend, api_key=None)
    keyless.submit([usage(1), usage(2)])
    keyless.shutdown(0.1)
    assert backend.requests == []

    keyed = make_pipeline(tmp_path, backend)

    assert keyed.force_flush(10)
    assert sorted(backend.keys()) == ["usage-key-0001", "usage-key-0002"]
    keyed.shutdown(1)


def test_the_api_key_never_reaches_logs_reprs_dead_letters_or_the_spool_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    statuses = iter([401, 503, 400])
    backend = Backend(lambda request, n: httpx.Response(next(statuses, 200), text="no"))
    exporter = PaygentSpanExporter(
        endpoint=backend.url,
        api_key=SECRET_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        retry_policy=FAST,
    )
    pipeline = exporter.pipeline
    pipeline.submit([usage(1), usage(2)])
    assert pipeline.force_flush(10)

    assert backend.requests[0][1].headers["paygent-api-key"] == SECRET_KEY  # it is sent...
    seen = [
        caplog.text,
        repr(exporter),
        repr(exporter.config),
        repr(pipeline.stats),
        repr(pipeline.spool.stats()),
        repr(pipeline.spool.dead_letters()),
    ]
    exporter.shutdown()
    seen += [p.read_bytes().decode("latin-1") for p in tmp_path.iterdir()]
    for text in seen:  # ...and nowhere else
        assert SECRET_KEY not in text
        assert SECRET_KEY[:12] not in text


# ---------------------------------------------------------------- self-metrics


def metric_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[Any, ...], int]]:
    points: dict[str, dict[tuple[Any, ...], int]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    key = tuple(sorted((point.attributes or {}).items()))
                    points.setdefault(metric.name, {})[key] = point.value
    return points


def test_self_metrics_count_each_fate_through_the_users_meter_provider(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    attempts: Counter[str] = Counter()

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        attempts[key] += 1
        if key == "usage-key-0002":
            return httpx.Response(400, text="bad")
        if key == "usage-key-0001" and attempts[key] <= 2:
            return httpx.Response(503)
        return httpx.Response(200)

    backend = Backend(answer)
    span_exporter = PaygentSpanExporter(
        endpoint=backend.url,
        api_key=SECRET_KEY,
        spool_path=tmp_path / "spool.sqlite3",
        spool_max_bytes=128 * 1024,  # the empty schema alone takes about 60 KiB
        retry_policy=FAST,
        meter_provider=provider,
    )
    # The metric route on the same provider must be reported too, not silently dropped.
    metric_exporter = PaygentMetricExporter(
        endpoint=backend.url,
        api_key=SECRET_KEY,
        spool_path=tmp_path / "metric-spool.sqlite3",
        meter_provider=provider,
    )
    metric_exporter.pipeline.submit([usage(100)])
    pipeline = span_exporter.pipeline
    pipeline.submit([usage(1), usage(2), usage(3)])
    assert pipeline.force_flush(10) and metric_exporter.pipeline.force_flush(10)
    assert counted(pipeline, "retried", 2)["retried"] == 2  # record 1's two 503s
    backend.answer = always(503)  # Paygent down: what follows stays pending (and is retried)
    refused = 0
    n = 10
    while not refused:  # fill the spool up to its cap
        refused = pipeline.submit([usage(i) for i in range(n, n + 50)])
        n += 50

    points = metric_points(reader)

    records = points[RECORDS_METRIC]
    traces = {dict(k)["outcome"]: v for k, v in records.items() if dict(k)["pipeline"] == "traces"}
    assert traces["delivered"] == 2
    assert traces["retried"] >= 2
    assert traces["rejected"] == 1  # the dead-lettered one
    assert traces["refused"] == refused == 50
    assert traces["accepted"] == n - 10 - 50 + 3
    assert records[(("outcome", "delivered"), ("pipeline", "metrics"))] == 1
    pending = points[SPOOL_PENDING_METRIC][(("pipeline", "traces"),)]
    assert pending == pipeline.spool.pending() == traces["accepted"] - 3
    assert points[SPOOL_DEAD_METRIC][(("pipeline", "traces"),)] == 1
    span_exporter.shutdown(200)
    metric_exporter.shutdown(200)
    # After shutdown the counters stay readable and the closed spools are left alone.
    after = metric_points(reader)
    assert after[RECORDS_METRIC][(("outcome", "refused"), ("pipeline", "traces"))] == 50
    assert SPOOL_PENDING_METRIC not in after
