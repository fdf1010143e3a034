"""Fault injection: did every usage record reach Paygent exactly once?

Modelled on how the OpenTelemetry Collector tests its exporter helper (no backend, retries,
a golden data set): real producer processes (``tests/fault_apps/producer.py``: a
``TracerProvider`` + ``BatchSpanProcessor`` + ``PaygentSpanExporter`` on a durable spool)
record usage while the sandbox misbehaves; the verdict comes from the sandbox's ledger (the
rows it stored, the repeated idempotency keys it acknowledged), the spool file and the
processes' own counters.

Each scenario prints one line: ``recorded`` (records the exporter committed to the spool;
records it refused, loudly and counted, are ``refused``), ``delivered`` (distinct records
in the ledger), ``duplicates sent`` (requests the sandbox acknowledged as a repeated key),
``dead-lettered`` (left in the spool's dead-letter table) and
``lost = recorded - delivered - dead-lettered``, which must be 0. Under it each scenario
prints the spool's conservation report (``paygent-otel reconcile --ledger``: per customer,
kind and period, recorded = delivered + duplicates + dead + pending + purged + refused,
and what the spool delivered against what the ledger received), which must balance.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import API_KEY, collect_lines, wait_for

from paygent_otel.delivery.reconcile import BLIND_SPOTS, Report, conservation_report
from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer
from paygent_otel.sandbox.ledger import Outcome

PRODUCER = Path(__file__).parent / "fault_apps" / "producer.py"


class Producer:
    """A producer process and its JSON-line conversation."""

    def __init__(self, sandbox_url: str, spool: Path, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PRODUCER), "--endpoint", sandbox_url, "--api-key", API_KEY,
             "--spool", str(spool), *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A pipe, not a file: a file-size cap (the full-disk scenario) would cut a log file.
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._read_events, args=(self.process.stdout,), daemon=True).start()
        self._log = collect_lines(self.process.stderr)
        self.expect("ready", timeout=30)

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith("{"):
                self._events.put(json.loads(line))
        self._events.put(None)

    @property
    def log(self) -> str:
        """What the process logged (stderr) so far."""
        return "".join(self._log)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next ``event`` line (earlier lines of other events are skipped)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if message is None:
                pytest.fail(f"producer exited waiting for {event!r}; its log:\n{self.log}")
            if message["event"] == event:
                return message
        pytest.fail(f"no {event!r} from the producer within {timeout:g} s; its log:\n{self.log}")

    def call(self, command: str, event: str, timeout: float = 60.0) -> dict[str, Any]:
        self.send(command)
        return self.expect(event, timeout)

    def exit(self, grace: float = 2.0) -> dict[str, Any]:
        answer = self.call(f"exit {grace:g}", "exit", timeout=30)
        assert self.process.wait(timeout=30) == 0
        return answer

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()


@pytest.fixture
def producers() -> Iterator[list[Producer]]:
    """Producers started by a test; any still running at the end are killed."""
    started: list[Producer] = []
    yield started
    for producer in started:
        producer.close()


@dataclass
class Scenario:
    """One fault scenario: its sandbox, the spool its producers share, and its line."""

    sandbox: SandboxServer
    spool: Path
    producers: list[Producer]
    capsys: pytest.CaptureFixture[str]

    def producer(self, *options: str, spool: Path | None = None) -> Producer:
        """Start a producer on :attr:`spool` (or ``spool``); it is killed at teardown."""
        app = Producer(self.sandbox.url, spool or self.spool, *options)
        self.producers.append(app)
        return app

    def conclude(
        self,
        name: str,
        extra: str = "",
        *,
        recorded: int,
        delivered: int,
        refused: int = 0,
        seqs: set[int] | None = None,
    ) -> Verdict:
        """The :func:`verdict`, which must count ``delivered`` records, then the scenario's
        line (:func:`report`); with no spool file, the verdict reads no spool."""
        result = verdict(self.sandbox, self.spool, recorded, refused=refused, seqs=seqs)
        assert result.delivered == delivered, result
        report(self.capsys, name, result, extra)
        return result


@pytest.fixture
def scenario(
    sandbox: SandboxServer,
    tmp_path: Path,
    producers: list[Producer],
    capsys: pytest.CaptureFixture[str],
) -> Scenario:
    """The test's :class:`Scenario`: the ``sandbox`` fixture, ``tmp_path/spool.sqlite3``."""
    return Scenario(sandbox, tmp_path / "spool.sqlite3", producers, capsys)


@dataclass
class Verdict:
    """The numbers of one scenario's line."""

    recorded: int
    delivered: int
    duplicates_sent: int
    dead_lettered: int
    refused: int = 0
    conservation: Report | None = None
    """The spool's conservation report, checked against the ledger (None: no spool file)."""

    @property
    def lost(self) -> int:
        return self.recorded - self.delivered - self.dead_lettered


def verdict(
    sandbox: SandboxServer,
    spool: Path | None,
    recorded: int,
    refused: int = 0,
    seqs: set[int] | None = None,
) -> Verdict:
    """Read the ledger and the spool, and check what no scenario may break.

    Every record the ledger holds is one the producers recorded (its ``seq`` tag is in
    ``seqs``, by default ``0 .. recorded - 1``), stored once; every repeated key the
    sandbox acknowledged belongs to a stored record.
    """
    rows = sandbox.ledger.rows()
    expected = seqs
    keys = [row["idempotency_key"] for row in rows]
    seqs = [int(row["meta_tags"]["seq"]) for row in rows]
    assert len(set(keys)) == len(keys), "the sandbox stored a record twice"
    assert len(set(seqs)) == len(seqs), "two records of the same usage were stored"
    assert set(seqs) <= (expected if expected is not None else set(range(recorded))), (
        "a record nobody recorded"
    )
    repeated = [
        entry["idempotency_key"]
        for entry in sandbox.ledger.request_log()
        if entry["outcome"] == Outcome.DUPLICATE
    ]
    assert set(repeated) <= set(keys), "a duplicate delivery with a key of its own"
    dead = 0
    conservation = None
    if spool is not None and spool.exists():
        with_spool = SqliteSpool(spool, max_bytes=1 << 30)
        dead = with_spool.stats().dead_letters
        with_spool.close()
        conservation = conservation_report([spool], ledger=sandbox.ledger)
    return Verdict(
        recorded, len(keys), sandbox.ledger.duplicate_count(), dead, refused, conservation
    )


def report(
    capsys: pytest.CaptureFixture[str], scenario: str, result: Verdict, extra: str = ""
) -> None:
    """Print the scenario's line where ``make test`` shows it, then require ``lost == 0``."""
    line = (
        f"fault scenario {scenario}: recorded={result.recorded} delivered={result.delivered} "
        f"duplicates_sent={result.duplicates_sent} dead_lettered={result.dead_lettered} "
        f"lost={result.lost}"
    )
    if result.refused:
        line += f" refused={result.refused}"
    if extra:
        line += f" | {extra}"
    conservation = result.conservation
    text = (
        "no spool file: nothing reached a spool, so there is no journal to reconcile"
        if conservation is None
        else conservation.to_text().split(BLIND_SPOTS[0])[0].rstrip()
    )
    with capsys.disabled():
        print(f"\n{line}\n{text}")
    assert result.lost == 0, line
    if conservation is not None:
        assert conservation.balanced, text
        totals = conservation.totals()
        # The journal's own account agrees with the ledger and the spool.
        assert totals.parts["delivered"].records == result.delivered, text
        assert totals.parts["dead"].records == result.dead_lettered, text
        assert totals.recorded.records - totals.parts["refused"].records >= result.recorded


# ---------------------------------------------------------------- 1. backend down


def test_backend_down_while_usage_keeps_being_recorded(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    app = scenario.producer()

    app.send("record 240 0.01")
    wait_for(lambda: app.expect("progress")["recorded"] >= 60, timeout=30)
    sandbox.stop()
    down_at = time.time()
    wait_for(lambda: app.expect("progress")["recorded"] >= 180, timeout=30)
    time.sleep(max(0.0, 1.5 - (time.time() - down_at)))
    sandbox.start()
    up_at = time.time()
    recorded = app.expect("recorded")
    flushed = app.call("flush 60", "flushed", timeout=90)

    assert flushed["ok"], flushed
    assert recorded["stats"]["accepted"] == 240
    arrivals = [row["received_at"] for row in sandbox.ledger.rows()]
    assert any(t < down_at for t in arrivals)  # delivered before the outage...
    assert sum(t >= up_at for t in arrivals) >= 100  # ...and what waited in the spool after it
    scenario.conclude(
        "1 backend down", f"outage {up_at - down_at:.1f} s", recorded=240, delivered=240
    )


# ---------------------------------------------------------------- 2. flaky backend


def test_flaky_backend_503_with_retry_after_and_500(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    # The sandbox answers one failure status at a time: alternate every 50 ms between
    # 503 + Retry-After and 500, so that of all requests about 50% are answered 503 and
    # 20% 500 (fail rate 70%, five slices in seven are 503).
    stop = threading.Event()

    def alternate() -> None:
        import random

        rng = random.Random(2)
        while not stop.is_set():
            if rng.random() < 5 / 7:
                sandbox.set_faults(fail_rate=0.7, fail_status=503, retry_after=1)
            else:
                sandbox.set_faults(fail_rate=0.7, fail_status=500, retry_after=None)
            stop.wait(0.05)

    sandbox.set_faults(seed=2)
    toggler = threading.Thread(target=alternate, daemon=True)
    toggler.start()
    app = scenario.producer("--max-in-flight", "64")
    try:
        recorded = app.call("record 200 0", "recorded")
        flushed = app.call("flush 90", "flushed", timeout=120)
    finally:
        stop.set()
        toggler.join()

    assert flushed["ok"], flushed
    statuses = Counter(entry["status"] for entry in sandbox.ledger.request_log())
    total = sum(statuses.values())
    assert statuses[503] > 0 and statuses[500] > 0
    # Every failure answer was retried (a dropped keep-alive connection is one more retry).
    assert flushed["stats"]["retried"] >= statuses[503] + statuses[500]
    scenario.conclude(
        "2 flaky backend",
        f"{total} requests: {statuses[503] / total:.0%} 503, {statuses[500] / total:.0%} 500",
        recorded=recorded["stats"]["accepted"],
        delivered=200,
    )


# ---------------------------------------------------------------- 3. throttling


def test_a_429_storm_with_retry_after_is_honoured(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    retry_after = 2.0
    sandbox.set_faults(fail_rate=1.0, fail_status=429, retry_after=int(retry_after))
    sent_log = scenario.spool.parent / "requests.jsonl"
    app = scenario.producer("--max-in-flight", "8", "--record-requests", str(sent_log))

    recorded = app.call("record 40 0", "recorded")
    # Let the storm last three waves: three rounds of Retry-After.
    wait_for(
        lambda: (
            len({round(e["received_at"]) for e in sandbox.ledger.request_log()}) >= 3
            and time.time() - sandbox.ledger.request_log()[0]["received_at"] > 2 * retry_after
        ),
        timeout=30,
        message="three waves of 429",
    )
    sandbox.set_faults(fail_rate=0.0)
    flushed = app.call("flush 30", "flushed")
    app.exit()

    assert flushed["ok"], flushed
    # Match each request the client sent (its log) to its arrival (the sandbox's log):
    # per key, the n-th request sent is the n-th to arrive.
    client: dict[str, list[dict[str, Any]]] = {}
    for line in sent_log.read_text().splitlines():
        entry = json.loads(line)
        client.setdefault(entry["key"], []).append(entry)
    server: dict[str, list[dict[str, Any]]] = {}
    for entry in sandbox.ledger.request_log():
        server.setdefault(entry["idempotency_key"], []).append(entry)
    assert client.keys() == server.keys()
    requests = []
    for key, sent in client.items():
        sent.sort(key=lambda e: e["sent"])
        assert [e["status"] for e in sent] == [e["status"] for e in server[key]], key
        for mine, theirs in zip(sent, server[key], strict=True):
            requests.append({**mine, "arrived": theirs["received_at"]})
    throttles = [r for r in requests if r["status"] == 429]
    assert len(throttles) >= 16

    # Once the client had a 429 in hand, nothing it sent afterwards reached the sandbox
    # before Retry-After seconds had passed since that answer. Requests sent before the
    # client had the answer (in flight when the 429 was sent) are exempt, and counted.
    in_flight_exempt = set()
    earliest_gap = float("inf")
    for throttle in throttles:
        for other in requests:
            if other is throttle or other["arrived"] < throttle["arrived"]:
                continue
            if other["sent"] < throttle["answered"]:
                if other["arrived"] < throttle["answered"] + retry_after:
                    in_flight_exempt.add((other["key"], other["sent"]))
                continue
            gap = other["arrived"] - throttle["answered"]
            earliest_gap = min(earliest_gap, gap)
            assert gap >= retry_after, (throttle, other)
    scenario.conclude(
        "3 throttling",
        f"{len(throttles)} x 429, earliest request after a 429 in hand: +{earliest_gap:.3f} s "
        f"(Retry-After {retry_after:g} s), {len(in_flight_exempt)} already in flight",
        recorded=recorded["stats"]["accepted"],
        delivered=40,
    )


# ---------------------------------------------------------------- 4. permanent rejections


def test_rejected_records_are_dead_lettered_then_replayed_with_spool_retry(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    sandbox.set_faults(reject_rate=0.25, seed=4)
    spool = scenario.spool
    app = scenario.producer()

    recorded = app.call("record 80 0", "recorded")
    first = app.call("flush 30", "flushed")
    time.sleep(0.5)  # a retry of a rejected record, if there were one, would come now

    assert first["ok"], first
    log = sandbox.ledger.request_log()
    rejected = [e["idempotency_key"] for e in log if e["outcome"] == Outcome.INJECTED_REJECTION]
    assert rejected
    store = SqliteSpool(spool, max_bytes=1 << 30)
    dead = store.dead_letters(limit=1000)
    store.close()
    assert sorted(d.key for d in dead) == sorted(rejected)
    assert {(d.status, d.reason) for d in dead} == {
        ("400", '{"error":"sandbox injected rejection"}')
    }
    attempts = Counter(e["idempotency_key"] for e in log)
    assert all(attempts[key] == 1 for key in rejected)  # never retried

    sandbox.set_faults(reject_rate=0.0)
    retry = subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", "spool", "retry", "--spool", str(spool)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    assert f"{len(rejected)} dead letters moved back" in retry.stdout
    # The application that is still running picks them up from the shared spool.
    second = app.call("flush 30", "flushed")

    assert second["ok"], second
    assert second["stats"]["rejected"] == len(rejected)
    result = scenario.conclude(
        "4 permanent rejections",
        f"{len(rejected)} answered 400, replayed",
        recorded=recorded["stats"]["accepted"],
        delivered=80,
    )
    assert result.dead_lettered == 0


# ---------------------------------------------------------------- 5. crash


def test_a_producer_killed_with_records_in_flight_is_finished_by_the_next_one(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    sandbox.set_faults(latency_ms=2000)
    first = scenario.producer("--max-in-flight", "16")
    recorded = first.call("record 120 0", "recorded")
    store = SqliteSpool(scenario.spool, max_bytes=1 << 30)
    # The first wave is answered; the second is leased at once and, a moment later, sits
    # in the sandbox's 2 s of latency: on the wire.
    wait_for(
        lambda: sandbox.ledger.count() >= 16 and store.stats().in_flight >= 8,
        timeout=30,
        message="deliveries done and requests in flight",
    )
    time.sleep(0.3)
    # The worst moment to die: Paygent has stored the records, their answers are on the
    # way, the spool still says "in flight". Freeze the process, let the sandbox answer,
    # then kill it before it reads a byte.
    first.process.send_signal(signal.SIGSTOP)
    in_flight = store.stats().in_flight
    stored_before = sandbox.ledger.count()
    wait_for(
        lambda: sandbox.ledger.count() >= stored_before + in_flight,
        timeout=10,
        message="the sandbox stored the requests in flight",
    )
    first.kill()
    store.close()
    sandbox.set_faults(latency_ms=0)
    second = scenario.producer()
    flushed = second.call("flush 30", "flushed")

    assert in_flight >= 8  # records were leased when the process died
    assert flushed["ok"], flushed
    result = scenario.conclude(
        "5 crash",
        f"{in_flight} in flight at SIGKILL",
        recorded=recorded["stats"]["accepted"],
        delivered=120,
    )
    # Each record that was in flight was sent again by the second process, with its key,
    # and recognised by the sandbox as a repeat: nothing else was sent twice.
    assert result.duplicates_sent == in_flight
    repeated = Counter(e["idempotency_key"] for e in sandbox.ledger.request_log())
    assert sum(n - 1 for n in repeated.values()) == in_flight


# ---------------------------------------------------------------- 6. slow backend


def test_a_slow_backend_costs_the_application_nothing_and_memory_stays_bounded(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    latency = 2.0
    max_in_flight = 64
    sandbox.set_faults(latency_ms=latency * 1000)
    app = scenario.producer("--max-in-flight", str(max_in_flight))
    store = SqliteSpool(scenario.spool, max_bytes=1 << 30)

    batches = []
    for _ in range(5):
        batch = app.call("record 600 0", "recorded")
        batches.append({**batch, "pending": store.stats().pending})
    store.close()
    fast_at = time.time()
    sandbox.set_faults(latency_ms=0)
    flushed = app.call("flush 60", "flushed", timeout=90)

    assert flushed["ok"], flushed
    # The backlog waited on disk, not in the process: thousands pending in the spool while
    # the worker held at most max_in_flight requests (every arrival under the 2 s latency
    # overlaps all arrivals of the 2 s before it).
    assert batches[-1]["pending"] >= 2000
    slow_phase = sorted(
        e["received_at"] for e in sandbox.ledger.request_log() if e["received_at"] < fast_at
    )
    window = 0
    for i, t in enumerate(slow_phase):
        while slow_phase[window] < t - (latency - 0.05):
            window += 1
        assert i - window + 1 <= max_in_flight
    costs = " ".join(f"{b['thread_us_median']:.0f}" for b in batches)
    memory = " ".join(f"{b['rss_kib'] / 1024:.1f}" for b in batches)
    scenario.conclude(
        "6 slow backend",
        f"app thread CPU per record, median us by batch of 600: {costs}; RSS MiB: {memory}; "
        f"spool backlog {batches[-1]['pending']}",
        recorded=batches[-1]["stats"]["accepted"],
        delivered=3000,
    )


# ---------------------------------------------------------------- 7. unwritable spool, full disk


def test_an_unwritable_spool_path_is_a_clear_error_and_the_application_runs_on(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    blocker = scenario.spool.parent / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    spool = blocker / "spool.sqlite3"
    app = scenario.producer(spool=spool)

    assert "cannot use the spool" in app.log and str(spool) in app.log  # at start
    recorded = app.call("record 20 0", "recorded")
    goodbye = app.exit()  # still answering, and exits cleanly

    assert recorded["stats"]["refused"] == 20 and "accepted" not in recorded["stats"]
    assert goodbye["stats"]["refused"] == 20
    assert "usage records refused: the spool" in app.log  # each refusal, loudly
    scenario.conclude("7a unwritable spool path", recorded=0, delivered=0, refused=20)


def test_a_full_disk_refuses_loudly_and_delivery_resumes_when_space_returns(
    sandbox: SandboxServer, scenario: Scenario
) -> None:
    sandbox.stop()  # an earlier run leaves 30 records in the spool
    earlier = scenario.producer()
    left = earlier.call("record 30 0", "recorded")["stats"]["accepted"]
    earlier.exit()
    sandbox.start()

    # The disk is full when the next process starts (any file may not grow by one byte).
    app = scenario.producer(
        "--fsize-limit", "1", "--spool-reopen-seconds", "0.2", "--first-seq", "30"
    )
    assert "cannot use the spool" in app.log  # a clear error at start
    while_full = app.call("record 30 0", "recorded")["stats"]
    assert while_full["refused"] == 30
    app.call("fsize none", "fsize")  # space was freed
    time.sleep(0.3)
    after = app.call("record 30 0", "recorded")["stats"]
    assert after["accepted"] == 30 and after["refused"] == 30
    assert app.call("flush 30", "flushed")["ok"]

    # The disk fills up again while the process runs, and is freed again.
    app.call("fsize 1", "fsize")
    during = app.call("record 10 0", "recorded")["stats"]
    assert during["refused"] == 40
    app.call("fsize none", "fsize")
    final = app.call("record 10 0", "recorded")["stats"]
    flushed = app.call("flush 30", "flushed")

    assert flushed["ok"], flushed
    assert "cannot be read or written" in app.log or "could not store" in app.log
    recorded = left + final["accepted"]
    delivered = {*range(30), *range(60, 90), *range(100, 110)}  # the refused ones are not
    result = scenario.conclude(
        "7b disk full", recorded=recorded, delivered=70, refused=final["refused"], seqs=delivered
    )
    assert (result.recorded, result.refused) == (70, 40)
