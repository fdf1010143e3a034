# ruff: noqa: F811 (the pg_url fixture is imported, then requested by name)
"""Scale-out proof: three ``paygent-otel serve`` processes on one PostgreSQL spool.

Senders spread OTLP requests over the replicas and fail over when one does not answer (as
a Collector's load-balancing exporter does). One replica is SIGKILLed mid-stream, while it
holds records in flight to Paygent; one request is delivered to two replicas. The sandbox
ledger honours the idempotency key, so it shows what reached Paygent: every record, each
billed once; a record sent twice only under its own key and only if the killed replica held
it at the moment it died; per-customer totals exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
from conftest import API_KEY, wait_for
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from postgres import pg_server, pg_url  # noqa: F401 (fixtures used by name)

from paygent_otel._cli.serve import LISTENING_LINE_PREFIX
from paygent_otel.bridge import TRACES_PATH
from paygent_otel.convention import semconv as sc
from paygent_otel.sandbox import SandboxServer

PB = {"Content-Type": "application/x-protobuf"}
REQUESTS = 60
SPANS_PER_REQUEST = 20
CUSTOMERS = 6


def request_body(n: int) -> tuple[bytes, str]:
    """Request ``n``: SPANS_PER_REQUEST TTS spans of one customer (characters = n + 1 each)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({sc.AGENT_ID: "agent-voice"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    customer = f"cust-{n % CUSTOMERS}"
    for _ in range(SPANS_PER_REQUEST):
        attributes = {sc.USAGE_KIND: "tts", sc.TTS_CHARACTERS: n + 1, sc.CUSTOMER_ID: customer,
                      sc.PROVIDER: "el", sc.MODEL: "m1"}  # fmt: skip
        tracer = provider.get_tracer("scale-out")
        with tracer.start_as_current_span("synthesize", attributes=attributes):
            pass
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString(), customer


class Replica:
    """One ``paygent-otel serve`` child process."""

    def __init__(self, url: str, sandbox: SandboxServer, folder: Path) -> None:
        env = {
            **os.environ,
            "PAYGENT_API_KEY": API_KEY,
            # A replica that stops renewing loses its leases after 3 s (default 60 s).
            "OTEL_EXPORTER_PAYGENT_SPOOL_LEASE_SECONDS": "3",
            "OTEL_EXPORTER_PAYGENT_SPOOL_FALLBACK_PATH": str(folder / "fallback.sqlite3"),
        }
        command = [sys.executable, "-m", "paygent_otel._cli.main", "serve", "--port", "0",
                   "--spool", url, "--endpoint", sandbox.url, "--flush-timeout", "5"]  # fmt: skip
        self.log = (folder / "bridge.log").open("w+")
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith(LISTENING_LINE_PREFIX), line + self.output()
        self.url = line.removeprefix(LISTENING_LINE_PREFIX).strip()
        self.alive = True

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        self.alive = False
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def test_three_replicas_one_killed_bill_every_record_once(pg_url: str, tmp_path: Path) -> None:
    sandbox = SandboxServer(tmp_path / "ledger.sqlite3", latency_ms=200)
    sandbox.start()
    replicas: list[Replica] = []
    try:
        for n in range(3):
            (tmp_path / f"r{n}").mkdir()
            replicas.append(Replica(pg_url, sandbox, tmp_path / f"r{n}"))
        bodies = [request_body(n) for n in range(REQUESTS)]
        acked = Counter[int]()
        lock = threading.Lock()

        def send(n: int, first: int) -> None:
            """Post request ``n`` to replica ``first``, failing over to the next ones."""
            body = bodies[n][0]
            for attempt in range(6):
                replica = replicas[(first + attempt) % 3]
                if not replica.alive:
                    continue
                try:
                    status = httpx.post(
                        replica.url + TRACES_PATH, content=body, headers=PB, timeout=10
                    ).status_code
                except httpx.TransportError:
                    continue
                if status == 200:
                    with lock:
                        acked[n] += 1
                    return
            raise AssertionError(f"request {n} acknowledged by no replica")

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda n: send(n, n % 3), range(20)))
            later = [pool.submit(send, n, n % 3) for n in range(20, 40)]
            # Kill replica 1 once it holds records in flight to Paygent (200 ms each).
            victim = replicas[1]

            def victim_in_flight() -> list[str]:
                with psycopg.connect(pg_url) as conn:
                    return [
                        key
                        for (key,) in conn.execute(
                            "SELECT key FROM paygent_pending WHERE lease_until IS NOT NULL"
                            " AND split_part(lease_owner, ':', 2) = %s",
                            (str(victim.process.pid),),
                        )
                    ]

            wait_for(victim_in_flight, timeout=30, message="the victim sends", interval=0.005)
            victim.kill()
            window = set(victim_in_flight())  # leased by the dead process: its in-flight window
            for future in later:
                future.result()
            list(pool.map(lambda n: send(n, n % 3), range(40, REQUESTS)))
            send(0, 2)  # the same request again, to another replica (a Collector's retry)

        total = REQUESTS * SPANS_PER_REQUEST
        wait_for(lambda: len(set(sandbox.ledger.keys())) >= total, timeout=90,
                 message="every record delivered", interval=0.2)  # fmt: skip
        time.sleep(1.0)  # anything sent twice would land now

        keys = sandbox.ledger.keys()
        repeats = [
            row["idempotency_key"]
            for row in sandbox.ledger.request_log()
            if row["outcome"] == "duplicate"
        ]
        assert len(keys) == len(set(keys)) == total  # billed once each
        assert window, "the victim held nothing in flight: the kill proved nothing"
        assert set(repeats) <= window, set(repeats) - window  # re-sent only from its window
        assert all(acked[n] >= 1 for n in range(REQUESTS)) and acked[0] == 2
        expected = Counter[str]()
        for n, (_, customer) in enumerate(bodies):
            expected[customer] += SPANS_PER_REQUEST * (n + 1)
        by_customer = sandbox.ledger.totals(("customer_id",))
        totals = {t["customer_id"]: t["characters"] for t in by_customer}
        assert totals == dict(expected)
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM paygent_pending").fetchone() == (0,)
        print(f"scale-out: {total} records, victim window {len(window)}, "
              f"re-sent {len(repeats)}, per-customer totals {totals}")  # fmt: skip
    finally:
        for replica in replicas:
            replica.stop()
        sandbox.stop()
