"""Hostile and broken clients against the real ``paygent-otel serve`` (issue #12).

Each attack is bounded in count and time. During each, a well-behaved client on its own
connection must be answered within :data:`LIVENESS` seconds; afterwards the ledger must hold
exactly what the bridge acknowledged (nothing from an attacker, nothing acknowledged lost),
and the bridge's peak RSS must stay under :func:`rss_bound` (docs/bridge.md, "Limits").

Most attacks share one bridge (started once for the module, with short timeouts so the
attacks end quickly); the drain, connection-refusal and TLS tests start their own.
"""

from __future__ import annotations

import gzip
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import prometheus_sample, wait_for
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from test_bridge_security import spans, usage
from test_collectors import Child, accepting, free_port, rotel_agent, rotel_env
from test_collectors import start_bridge as serve

from paygent_otel.bridge import TRACES_PATH, Limits
from paygent_otel.convention import semconv as sc
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.sandbox import SandboxServer

LIVENESS = 5.0
"""Seconds a well-behaved request may take while an attack runs (a liveness bound only)."""
GOOD_TOKEN = "good-collector-0123456789abcdef"
ATTACK_TOKEN = "attacker-fedcba9876543210"  # a valid token, limited to one agent
PB = {"Content-Type": "application/x-protobuf"}
GOOD = {**PB, "Authorization": f"Bearer {GOOD_TOKEN}"}
ATTACK = {**PB, "Authorization": f"Bearer {ATTACK_TOKEN}"}
STATUS_499 = 'paygent_bridge_requests_total{signal="traces",status="499"}'
MEMORY_BUDGET = 48 << 20
SHARED_FLAGS = [
    "--header-timeout", "1", "--body-timeout", "2", "--min-body-rate", "4096",
    "--keep-alive-timeout", "2", "--max-connections", "128", "--max-requests-per-token", "8",
    "--rate-limit-per-token", "20", "--memory-budget", str(MEMORY_BUDGET),
]  # fmt: skip


def rss_bound(budget: int = MEMORY_BUDGET) -> int:
    """The documented peak: about 100 MB for the process itself, plus twice the memory budget
    (the bodies and inflated bytes it counts, and what decoding them takes)."""
    return (100 << 20) + 2 * budget


@dataclass
class Bridge:
    """A ``paygent-otel serve`` child process."""

    child: Child
    url: str
    spool: Path
    good: list[str] = field(default_factory=list)
    """Customers of the requests the bridge acknowledged to the well-behaved client."""

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.split("://")[1].rsplit(":", 1)
        return host, int(port)

    def status(self, field_name: str) -> int:
        """A field of /proc/<pid>/status in bytes (VmRSS, VmHWM)."""
        text = Path(f"/proc/{self.child.process.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        assert match, text
        return int(match[1]) * 1024

    def metric(self, sample: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=GOOD, timeout=LIVENESS).text
        return prometheus_sample(text, sample) or 0.0

    def well_behaved(self) -> float:
        """One usage request on a new connection; must be answered 200 within LIVENESS."""
        customer = f"good-{len(self.good)}"
        body = spans(usage(customer=customer))
        start = time.monotonic()
        response = httpx.post(self.url + TRACES_PATH, content=body, headers=GOOD, timeout=LIVENESS)
        elapsed = time.monotonic() - start
        assert response.status_code == 200, response.content
        self.good.append(customer)
        return elapsed

    def connect(self) -> socket.socket:
        return socket.create_connection(self.host_port, timeout=LIVENESS)

    def assert_books_balance(self, sandbox: SandboxServer) -> None:
        """Every acknowledged record billed once; nothing else billed; RSS under the bound."""
        wait_for(
            lambda: sandbox.ledger.count() >= len(self.good), message="acknowledged usage billed"
        )
        customers = sorted(row["customer_id"] for row in sandbox.ledger.rows())
        assert customers == sorted(self.good)
        assert self.status("VmHWM") < rss_bound(), self.status("VmHWM")


def start_bridge(
    sandbox: SandboxServer, tmp_path: Path, *flags: str, tokens: bool = True
) -> Bridge:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{GOOD_TOKEN}\n{ATTACK_TOKEN}=agent-attack\n")
    token_file.chmod(0o600)
    spool = tmp_path / "spool.sqlite3"
    if tokens:
        flags = ("--token-file", str(token_file), *flags)
    started: list[Child] = []
    url = serve(started, sandbox, spool, free_port(), *flags)
    return Bridge(started[0], url, spool)


@pytest.fixture(scope="module")
def module_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    server = SandboxServer(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(
    module_sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    bridge = start_bridge(module_sandbox, tmp_path_factory.mktemp("bridge"), *SHARED_FLAGS)
    yield bridge
    bridge.child.stop()


def read_status(sock: socket.socket, timeout: float = LIVENESS) -> int | None:
    """The status code the server sent on ``sock``; None when it closed without answering."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes ``sock`` within ``timeout`` (whatever it answered)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def head(path: str, headers: dict[str, str], length: int | None, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: bridge"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ----------------------------------------------------------------------------- 1. slow bodies


def test_slow_bodies_hold_no_processing_slot_and_time_out(shared, module_sandbox) -> None:
    """Finding 1: 16 valid-token requests trickling a 100 kB body byte by byte."""
    slow = []
    for _ in range(16):
        sock = shared.connect()
        sock.sendall(head(TRACES_PATH, ATTACK, 100_000) + b"\x0a")
        slow.append(sock)
    latencies = []
    for _ in range(4):  # about 2 s of the attack, one byte per connection every 0.5 s
        latencies.append(shared.well_behaved())
        assert shared.metric("paygent_bridge_in_flight_requests") == 0
        for sock in slow:
            try:
                sock.sendall(b"\x01")
            except OSError:
                pass  # answered 429 (the token's cap) and closed
        time.sleep(0.5)
    statuses = [read_status(sock) for sock in slow]
    for sock in slow:
        sock.close()
    # 8 may read (--max-requests-per-token 8), the others are refused at once; the readers
    # are cut off by the minimum body rate after --body-timeout.
    assert sorted(statuses) == [408] * 8 + [429] * 8, statuses
    # The refused ones kept trickling the body they were told to keep: cut off as well.
    timed_out = 'paygent_bridge_connections_closed_total{reason="body_timeout"}'
    wait_for(lambda: shared.metric(timed_out) == 16, message="all 16 cut off by the body rate")
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="token_busy"}') == 8
    assert max(latencies) < LIVENESS
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 2. idle flood


def test_idle_connections_are_closed_and_evicted(shared, module_sandbox) -> None:
    """Finding 2: 400 bare connections (no token) against --max-connections 128."""
    bare = [shared.connect() for _ in range(400)]
    latency = shared.well_behaved()  # admitted: it evicts the longest-waiting bare one
    assert shared.metric("paygent_bridge_open_connections") <= 128
    # The rest are closed by the header timeout (1 s) or were evicted already.
    assert all(closed_by_server(sock, timeout=LIVENESS) for sock in bare)
    for sock in bare:
        sock.close()
    assert latency < LIVENESS
    assert shared.metric('paygent_bridge_connections_closed_total{reason="evicted_waiting"}') > 0
    assert shared.metric('paygent_bridge_connections_closed_total{reason="header_timeout"}') > 0
    shared.well_behaved()
    shared.assert_books_balance(module_sandbox)


def test_when_every_connection_is_busy_new_ones_are_refused_and_logged(sandbox, tmp_path) -> None:
    bridge = start_bridge(sandbox, tmp_path, "--max-connections", "4",
                          "--body-timeout", "2", "--min-body-rate", "4096")  # fmt: skip
    try:
        busy = []
        for _ in range(4):  # requests in progress: never evicted
            sock = bridge.connect()
            sock.sendall(head(TRACES_PATH, GOOD, 50_000) + b"\x0a")
            busy.append(sock)
        time.sleep(0.5)  # their heads are read (a probe would need a connection itself)
        refused = bridge.connect()
        assert read_status(refused) == 503
        wait_for(lambda: "refused a connection from 127.0.0.1:" in bridge.child.output,
                 message="the refusal is logged with the peer")  # fmt: skip
        assert "(--max-connections)" in bridge.child.output
        assert [read_status(sock) for sock in busy] == [408] * 4
        bridge.well_behaved()  # once the slow bodies are cut off, connections are taken again
        bridge.assert_books_balance(sandbox)
    finally:
        bridge.child.stop()


# ----------------------------------------------------------------------------- 3. huge heads


def test_a_huge_header_is_431_before_authentication(shared, module_sandbox) -> None:
    """Finding 3: 4 connections each trying to send a 16 MB header, without a token."""
    sent: list[int] = [0] * 4
    statuses: list[int | None] = [None] * 4

    def flood(index: int) -> None:
        sock = shared.connect()
        try:
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: b\r\nX-Junk: ")
            block = b"a" * 65536
            while sent[index] < 16 << 20:
                sock.sendall(block)
                sent[index] += len(block)
        except OSError:
            pass
        statuses[index] = read_status(sock)
        sock.close()

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    latency = shared.well_behaved()
    for thread in threads:
        thread.join(30)
    assert latency < LIVENESS
    assert shared.metric('paygent_bridge_connections_closed_total{reason="header_too_large"}') == 4
    assert all(n < 16 << 20 for n in sent), sent  # cut off early, not read to the end
    assert set(statuses) <= {431, None}, statuses  # 431, unless the reset overtook it
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="unauthorized"}') == 0
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 4-5. gzip


def test_concurrent_gzip_bombs_stay_within_the_memory_budget(shared, module_sandbox) -> None:
    """Finding 4: 16 concurrent 100 MB gzip bombs of about 100 kB each."""
    bomb = gzip.compress(b"\0" * (100 << 20), compresslevel=9)
    headers = {**ATTACK, "Content-Encoding": "gzip"}

    def send(_: int) -> int:
        url = shared.url + TRACES_PATH
        return httpx.post(url, content=bomb, headers=headers, timeout=30).status_code

    assert send(0) == 413  # alone: inflated up to --max-decompressed-bytes, then refused
    with ThreadPoolExecutor(16) as pool:
        results = pool.map(send, range(16))
        latency = shared.well_behaved()
        statuses = list(results)
    assert latency < LIVENESS
    # Refused for its size, for the shared budget, or the token's cap: never accepted.
    assert set(statuses) <= {413, 503, 429}, statuses
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="memory_budget"}') > 0
    shared.assert_books_balance(module_sandbox)  # includes the RSS bound


def test_many_gzip_members_take_linear_time(shared, module_sandbox) -> None:
    """Finding 5: an 8 MiB body of 419k empty gzip members; 3 concurrent 4 MiB ones."""
    member = gzip.compress(b"")
    headers = {**ATTACK, "Content-Encoding": "gzip"}
    url = shared.url + TRACES_PATH
    big = member * ((8 << 20) // len(member))
    start = time.monotonic()
    assert httpx.post(url, content=big, headers=headers, timeout=30).status_code == 200
    assert time.monotonic() - start < 10  # was 39 s (quadratic)
    medium = member * ((4 << 20) // len(member))
    with ThreadPoolExecutor(3) as pool:
        results = pool.map(
            lambda _: httpx.post(url, content=medium, headers=headers, timeout=30).status_code,
            range(3),
        )
        latency = shared.well_behaved()
        assert list(results) == [200] * 3
    assert latency < LIVENESS
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 6. disconnects


def test_a_client_gone_mid_body_is_counted_not_an_error(shared, module_sandbox) -> None:
    """Finding 6."""
    gone = 'paygent_bridge_requests_rejected_total{reason="client_disconnected"}'
    before = shared.metric(gone), shared.metric(STATUS_499)
    body = spans(usage(customer="attack-gone"))
    for _ in range(3):
        sock = shared.connect()
        sock.sendall(head(TRACES_PATH, GOOD, len(body)) + body[: len(body) // 2])
        time.sleep(0.1)
        sock.close()
    wait_for(
        lambda: shared.metric(gone) == before[0] + 3,
        message="three requests counted as the client's disconnect",
    )
    assert shared.metric(STATUS_499) == before[1] + 3
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="internal_error"}') == 0
    output = shared.child.output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "ended before its body was read (client_disconnected)" in output
    shared.well_behaved()
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 8. framing


def test_http10_post_without_a_length_is_411(shared, module_sandbox) -> None:
    """Finding 8: HTTP/1.0, no Content-Length: the body would be read as empty."""
    body = spans(usage(customer="attack-http10"))
    sock = shared.connect()
    sock.sendall(head(TRACES_PATH, GOOD, None, version="1.0") + body)
    sock.shutdown(socket.SHUT_WR)
    assert read_status(sock) == 411
    sock.close()
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="length_required"}') == 1
    # Conflicting framings are refused by the parser.
    sock = shared.connect()
    sock.sendall(head(TRACES_PATH, {**GOOD, "Transfer-Encoding": "chunked"}, len(body)) + body)
    assert read_status(sock) == 400
    sock.close()
    malformed = 'paygent_bridge_connections_closed_total{reason="malformed_request"}'
    assert shared.metric(malformed) == 1
    assert "answered 400 to a malformed request from 127.0.0.1:" in shared.child.output
    shared.well_behaved()
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 9. rotel


def test_rotel_keeps_the_resource_agent_id_of_3000_spans(sandbox, tmp_path) -> None:
    """Finding 9: SDK -> rotel (the shipped rotel.env) -> bridge, agent id on the resource."""
    bridge = start_bridge(sandbox, tmp_path, tokens=False)
    processes = [bridge.child]
    try:
        grpc_port, http_port = free_port(), free_port()
        env = rotel_env(grpc_port, http_port, bridge.url)
        env.update(ROTEL_LOG_FILE=str(tmp_path / "rotel.log"), ROTEL_PID_FILE=str(tmp_path / "p"))
        processes.append(Child.start([str(rotel_agent(tmp_path)), "start"], env))
        wait_for(lambda: accepting(http_port), timeout=15, message="rotel accepts OTLP/HTTP")
        provider = TracerProvider(resource=Resource.create({sc.AGENT_ID: "agent-voice"}))
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}{TRACES_PATH}")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracer = provider.get_tracer("voice-app")
        for index in range(3000):
            with tracer.start_as_current_span("tts", attributes=usage(None, f"c{index % 7}")):
                pass
        provider.shutdown()
        wait_for(lambda: sandbox.ledger.count() >= 3000, timeout=30, message="3,000 billed")
        invalid = 'paygent_bridge_usage_records_total{signal="traces",result="invalid"}'
        assert bridge.metric(invalid) == 0
        assert bridge.metric("paygent_bridge_spool_dead_letters") == 0
        assert {row["agent_id"] for row in sandbox.ledger.rows()} == {"agent-voice"}
        assert sandbox.ledger.count() == 3000
    finally:
        for process in reversed(processes):
            process.stop()


def test_a_token_for_exactly_one_agent_supplies_it_to_records_without_one(
    sandbox, tmp_path
) -> None:
    bridge = start_bridge(sandbox, tmp_path)
    try:
        body = spans(usage(None, customer="good-no-agent"))  # no agent id anywhere
        response = httpx.post(bridge.url + TRACES_PATH, content=body, headers=ATTACK)
        assert response.status_code == 200
        assert not ExportTraceServiceResponse.FromString(response.content).HasField(
            "partial_success"
        )
        bridge.good.append("good-no-agent")
        # A token for any agent has no agent to supply: the record is invalid.
        refused = httpx.post(
            bridge.url + TRACES_PATH, content=spans(usage(None, "attack-x")), headers=GOOD
        )
        answer = ExportTraceServiceResponse.FromString(refused.content)
        assert answer.partial_success.rejected_spans == 1
        bridge.assert_books_balance(sandbox)
        assert [row["agent_id"] for row in sandbox.ledger.rows()] == ["agent-attack"]
    finally:
        bridge.child.stop()


# ----------------------------------------------------------------------------- 10 and tokens


def test_metrics_need_a_token_health_does_not(shared) -> None:
    """Finding 10: off loopback, /health stays open for load balancers, /metrics does not."""
    assert httpx.get(shared.url + "/metrics").status_code == 401
    health = httpx.get(shared.url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert httpx.get(shared.url + "/metrics", headers=GOOD).status_code == 200


def test_auth_failures_are_logged_rate_limited_with_the_peer(shared, module_sandbox) -> None:
    bad = {**PB, "Authorization": "Bearer not-a-token-0123456789"}
    body = spans(usage(customer="attack-401"))
    with httpx.Client(headers=bad) as client:
        answers = [client.post(shared.url + TRACES_PATH, content=body) for _ in range(40)]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [401] * 40
    lines = [x for x in shared.child.lines if "answered 401" in x and TRACES_PATH[4:] in x]
    assert 1 <= len(lines) <= 2, lines  # at most one line per 10 s
    assert "from 127.0.0.1:" in lines[0]
    shared.assert_books_balance(module_sandbox)


def test_one_token_is_rate_limited_others_are_not(shared, module_sandbox) -> None:
    body = spans({"plain": "no usage"})  # the attacker's requests carry nothing billable
    start = time.monotonic()
    with httpx.Client(headers=ATTACK) as client, ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda _: client.post(shared.url + TRACES_PATH, content=body), range(150))
        )
        latency = shared.well_behaved()
    elapsed = time.monotonic() - start
    limited = [a for a in answers if a.status_code == 429]
    accepted = len(answers) - len(limited)
    # --rate-limit-per-token 20: a full bucket of 40, then 20 per second.
    assert 1 <= len(limited) and accepted <= 40 + 20 * elapsed + 1, (accepted, elapsed)
    assert {a.headers["retry-after"] for a in limited} == {"1"}
    assert {a.status_code for a in answers} == {200, 429}
    assert shared.metric('paygent_bridge_requests_rejected_total{reason="rate_limited"}') >= 1
    assert latency < LIVENESS
    shared.assert_books_balance(module_sandbox)


# ----------------------------------------------------------------------------- 7. drain


def test_sigterm_drains_health_503_then_finishes_and_reports(sandbox, tmp_path) -> None:
    """Finding 7: /health answers 503 during the drain grace; in-flight requests finish."""
    bridge = start_bridge(sandbox, tmp_path, "--drain-grace", "2")
    try:
        bridge.well_behaved()
        body = spans(usage(customer="good-in-flight"))
        sock = bridge.connect()
        sock.sendall(head(TRACES_PATH, GOOD, len(body)) + body[:10])
        time.sleep(0.2)
        bridge.child.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: httpx.get(bridge.url + "/health", timeout=LIVENESS).status_code == 503,
            message="/health answers 503 while draining",
        )
        refused = httpx.post(bridge.url + TRACES_PATH, content=body, headers=GOOD)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        sock.sendall(body[10:])
        assert read_status(sock) == 200
        bridge.good.append("good-in-flight")
        sock.close()
        assert bridge.child.process.wait(30) == 0
    finally:
        bridge.child.stop()
    output = bridge.child.output
    assert "draining for 2 s" in output
    assert re.search(r"bridge stopped: 2 usage records handed to the spool by this run; 0 left "
                     r"in \S+ for delivery", output), output  # fmt: skip
    # Delivered during the shutdown flush: the in-flight record once, the refused copy never.
    assert sorted(row["customer_id"] for row in sandbox.ledger.rows()) == sorted(bridge.good)


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import trustme

    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_ca = trustme.CA()
    client_cert = client_ca.issue_cert("collector@example.test")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "client_ca": folder / "client-ca.pem",
        "client": folder / "client.pem",
    }
    ca.cert_pem.write_to_path(files["ca"])
    server_cert.cert_chain_pems[0].write_to_path(files["cert"])
    server_cert.private_key_pem.write_to_path(files["key"])
    client_ca.cert_pem.write_to_path(files["client_ca"])
    client_cert.private_key_and_cert_chain_pem.write_to_path(files["client"])
    return files


def test_tls_and_client_certificates(sandbox, tmp_path, pki) -> None:
    bridge = start_bridge(
        sandbox, tmp_path, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
        "--tls-client-ca", str(pki["client_ca"]),
    )  # fmt: skip
    try:
        assert bridge.url.startswith("https://")
        body = spans(usage(customer="good-tls"))
        trusted = ssl.create_default_context(cafile=str(pki["ca"]))
        # Without a client certificate the handshake fails: no request is read.
        with pytest.raises(httpx.TransportError):
            httpx.post(bridge.url + TRACES_PATH, content=body, headers=GOOD, verify=trusted)
        # Plain HTTP to the TLS port is not answered as HTTP.
        with pytest.raises(httpx.TransportError):
            httpx.post(bridge.url.replace("https", "http") + TRACES_PATH, content=body,
                       headers=GOOD)  # fmt: skip
        trusted.load_cert_chain(pki["client"])
        response = httpx.post(bridge.url + TRACES_PATH, content=body, headers=GOOD, verify=trusted)
        assert response.status_code == 200
        bridge.good.append("good-tls")
        bridge.assert_books_balance(sandbox)
    finally:
        bridge.child.stop()


def test_tls_files_that_do_not_load_stop_the_start(tmp_path, capsys) -> None:
    from paygent_otel._cli.main import main

    (tmp_path / "bad.pem").write_text("not a certificate\n")
    bad = str(tmp_path / "bad.pem")
    argv = ["serve", "--port", "0", "--spool", str(tmp_path / "s.sqlite3"),
            "--tls-cert", bad, "--tls-key", bad]  # fmt: skip
    assert main(argv) == 2
    assert "cannot use the TLS files" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the docs


def test_the_limits_table_matches_the_serve_flags() -> None:
    """docs/bridge.md's table has a row per ``Limits`` field and stop timeout, with the
    default ``serve`` really uses."""
    import argparse
    import dataclasses

    from paygent_otel._cli.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    serve = parser.parse_args(["serve"])
    text = (Path(__file__).resolve().parents[1] / "docs" / "bridge.md").read_text()
    table = text.split("## Limits and timeouts", 1)[1].split("\n\n**Memory.**", 1)[0]
    rows = re.findall(r"^\| `--([a-z-]+)` \| ([^|]+) \|", table, re.MULTILINE)
    units = {"MiB": 1 << 20, "KiB": 1 << 10, "KiB/s": 1 << 10}
    for flag, default in rows:
        number, _, unit = default.strip().partition(" ")
        value = float(number.split("/")[0]) * units.get(unit.split(",")[0], 1)
        name = flag.replace("-", "_")
        parsed = getattr(serve, name)
        if parsed is None:  # a delivery setting: its default comes from the settings table
            parsed = getattr(ExporterConfig.resolve(), name)
        assert parsed == value, flag
    limits = {field.name.replace("_", "-") for field in dataclasses.fields(Limits)}
    assert {flag for flag, _ in rows} == limits | {
        "drain-grace",
        "graceful-timeout",
        "flush-timeout",
    }
