"""``paygent-otel serve --workers N``: several processes on one port and one spool.

The real command in a child process: its workers are counted in ``/proc``, requests go
over fresh connections so the kernel spreads them, a worker is SIGKILLed and replaced, and
SIGTERM stops them all. The sandbox's ledger shows what was billed.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import serving, wait_for
from test_bridge_otlp import sum_request
from test_bridge_server import spans

from paygent_otel.bridge import METRICS_PATH, TRACES_PATH
from paygent_otel.convention import semconv as sc
from paygent_otel.sandbox import SandboxServer

PB = {"Content-Type": "application/x-protobuf", "Connection": "close"}


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def test_workers_share_the_port_and_the_spool_and_bill_everything_once(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    flags = ("--workers", "3", "--spool", str(tmp_path / "spool.sqlite3"),
             "--endpoint", sandbox.url)  # fmt: skip
    with serving(*flags) as served:
        process, url = served.process, served.url
        workers = wait_for(lambda: len(children(process.pid)) == 3 and children(process.pid))

        def post(path: str, body: bytes) -> int:
            return httpx.post(url + path, content=body, headers=PB, timeout=20).status_code

        bodies = [spans(10, customer=f"cust-{i % 4}") for i in range(24)]
        # One cumulative stream, its points spread over the workers in any order.
        points = [
            sum_request(sc.TTS_CHARACTERS, [(1_000, 2_000 + i, 10 * i)]).SerializeToString()
            for i in range(1, 61)
        ]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda b: post(TRACES_PATH, b), bodies))
            statuses += list(pool.map(lambda b: post(METRICS_PATH, b), points))
        assert statuses == [200] * 84

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(process.pid) - {victim}) == 3, message="a new worker")
        assert post(TRACES_PATH, spans(5, customer="cust-after")) == 200

        def billed() -> dict[str, dict[str, int]]:
            return {t["customer_id"]: t for t in sandbox.ledger.totals(("customer_id",))}

        wait_for(
            lambda: (
                sum(t["calls"] for c, t in billed().items() if c != "cust-m") == 245
                and billed().get("cust-m", {}).get("characters", 0) >= 600
            ),
            timeout=30,
            message="everything delivered",
        )
        output = served.stop()
    assert process.returncode == 0, output
    assert output.rstrip().endswith("paygent-otel bridge stopped"), output
    assert children(process.pid) == set()
    keys = sandbox.ledger.keys()
    assert len(keys) == len(set(keys))  # each record once
    totals = billed()
    assert {c: totals[c]["calls"] for c in totals if c != "cust-m"} == {
        "cust-0": 60, "cust-1": 60, "cust-2": 60, "cust-3": 60, "cust-after": 5,
    }  # fmt: skip
    # The stream's last value, billed once across the workers, whatever order they saw.
    assert totals["cust-m"]["characters"] == 600
