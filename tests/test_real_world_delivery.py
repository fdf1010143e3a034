"""Usage reaches Paygent from real deployments: short processes, host names, TLS, proxies.

Every test runs a real program (``tests/apps/record_and_exit.py``) in a subprocess that
records usage and exits without calling ``shutdown()``, against a real sandbox (plain or
TLS with a throwaway CA from ``trustme``) and, where it says so, a real forward proxy
(``proxy.py`` from PyPI). Each asserts what the sandbox's ledger received and what the
program said on stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import API_KEY, wait_for

from paygent_otel.sandbox import SandboxServer

APP = Path(__file__).parent / "apps" / "record_and_exit.py"
EXIT_BOUND_S = 20.0
"""Liveness bound on one program's run (not a speed target: the flush timeout is 30 s)."""


@dataclass
class Run:
    returncode: int
    stderr: str
    seconds: float


def run_app(tmp_path: Path, endpoint: str, *args: str, **env: str) -> Run:
    """Run the app to completion with the exporter aimed at ``endpoint``."""
    full_env = {
        **os.environ,
        "OTEL_EXPORTER_PAYGENT_ENDPOINT": endpoint,
        "PAYGENT_API_KEY": API_KEY,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        **env,
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        if name not in env:
            full_env.pop(name, None)
            full_env.pop(name.lower(), None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(APP), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=EXIT_BOUND_S + 40,
        check=False,
    )
    return Run(done.returncode, done.stderr, time.monotonic() - started)


def customers(sandbox: SandboxServer) -> list[str]:
    return sorted(row["customer_id"] for row in sandbox.ledger.rows())


def spool_pending(tmp_path: Path) -> int:
    from paygent_otel.delivery.spool import SqliteSpool

    spool = SqliteSpool(tmp_path / "state" / "paygent-otel" / "spool.sqlite3", max_bytes=1 << 30)
    try:
        return spool.pending()
    finally:
        spool.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- any process lifetime


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_script_that_exits_without_shutdown_delivers_to_a_host_name(
    tmp_path: Path, sandbox: SandboxServer, host: str
) -> None:
    run = run_app(tmp_path, f"http://{host}:{sandbox.port}", "main", "cust-exit")

    assert run.returncode == 0, run.stderr
    assert customers(sandbox) == ["cust-exit"]
    assert "cannot schedule new futures" not in run.stderr
    assert "not delivered" not in run.stderr
    assert run.seconds < EXIT_BOUND_S


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_records_from_other_threads_and_forked_workers_are_delivered_at_their_exit(
    tmp_path: Path, sandbox: SandboxServer, mode: str
) -> None:
    run = run_app(tmp_path, f"http://localhost:{sandbox.port}", mode, "cust-w")

    assert run.returncode == 0, run.stderr
    expected = ["cust-w", "cust-w-child"] if mode == "fork" else ["cust-w"]
    assert customers(sandbox) == expected
    assert spool_pending(tmp_path) == 0


# ---------------------------------------------------------------- visible failures


def test_an_unreachable_endpoint_is_said_on_stderr_and_its_records_kept_for_the_next_start(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    endpoint = f"http://localhost:{sandbox.port}"
    sandbox.stop()  # an outage
    run = run_app(tmp_path, endpoint, "main", "cust-later")

    assert run.returncode == 0
    assert f"connection refused by localhost:{sandbox.port}" in run.stderr
    assert "1 usage records were not delivered" in run.stderr
    assert "paygent-otel spool status" in run.stderr
    assert spool_pending(tmp_path) == 1
    assert run.seconds < EXIT_BOUND_S  # gave up early: the spool keeps the record

    # The next process on the same spool, once the endpoint is back, sends it too.
    sandbox.start()
    again = run_app(tmp_path, endpoint, "main", "cust-now")
    assert again.returncode == 0, again.stderr
    assert customers(sandbox) == ["cust-later", "cust-now"]


def test_throttling_with_retry_after_is_logged_with_its_pause(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    sandbox.set_faults(fail_rate=1.0, fail_status=503, retry_after=120)

    run = run_app(tmp_path, f"http://localhost:{sandbox.port}", "main", "cust-throttled")

    assert "HTTP 503 with Retry-After 120 s" in run.stderr
    assert "next try in 1" in run.stderr  # ~120 s
    assert run.seconds < EXIT_BOUND_S  # a pause past the deadline ends the wait at once
    assert spool_pending(tmp_path) == 1


def test_an_endpoint_that_answers_404_pauses_delivery_instead_of_dead_lettering(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    from paygent_otel.delivery.spool import SqliteSpool

    run = run_app(tmp_path, f"http://localhost:{sandbox.port}/v1", "main", "cust-404")

    assert "HTTP 404 for POST" in run.stderr
    assert "the endpoint looks wrong" in run.stderr
    spool = SqliteSpool(tmp_path / "state" / "paygent-otel" / "spool.sqlite3", max_bytes=1 << 30)
    try:
        assert (spool.pending(), spool.stats().dead_letters) == (1, 0)
    finally:
        spool.close()
    assert customers(sandbox) == []


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_sandbox(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[SandboxServer, Path]]:
    """A sandbox serving HTTPS for ``localhost`` with a certificate of the throwaway CA."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca_file = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(key)
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(ca_file)
    server = SandboxServer(tmp_path / "tls-ledger.sqlite3", tls_cert=chain, tls_key=key)
    with server:
        yield server, ca_file


def test_https_with_the_ca_bundle_configured_delivers(
    tmp_path: Path, tls_sandbox: tuple[SandboxServer, Path]
) -> None:
    server, ca_file = tls_sandbox
    assert server.url.startswith("https://")

    run = run_app(
        tmp_path,
        f"https://localhost:{server.port}",
        "main",
        "cust-tls",
        OTEL_EXPORTER_PAYGENT_CERTIFICATE=str(ca_file),
    )

    assert run.returncode == 0, run.stderr
    assert customers(server) == ["cust-tls"]


def test_https_with_an_untrusted_ca_is_refused_with_a_message_that_names_the_fix(
    tmp_path: Path, tls_sandbox: tuple[SandboxServer, Path]
) -> None:
    server, _ = tls_sandbox

    run = run_app(tmp_path, f"https://localhost:{server.port}", "main", "cust-untrusted")

    assert "TLS certificate of localhost not trusted" in run.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in run.stderr
    assert "OTEL_EXPORTER_PAYGENT_CERTIFICATE" in run.stderr
    assert customers(server) == []
    assert spool_pending(tmp_path) == 1


def test_a_client_certificate_is_presented_when_the_server_requires_one(
    tmp_path: Path, ca: trustme.CA
) -> None:
    cert = ca.issue_cert("localhost")
    client = ca.issue_cert("usage-exporter@example.com")
    files = {name: tmp_path / f"{name}.pem" for name in ("chain", "key", "ca", "client")}
    cert.private_key_pem.write_to_path(files["key"])
    files["chain"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(files["ca"])
    client.private_key_and_cert_chain_pem.write_to_path(files["client"])
    server = SandboxServer(
        tmp_path / "mtls.sqlite3",
        tls_cert=files["chain"],
        tls_key=files["key"],
        tls_client_ca=files["ca"],
    )
    with server:
        endpoint = f"https://localhost:{server.port}"
        without = run_app(
            tmp_path, endpoint, "main", "cust-anon",
            OTEL_EXPORTER_PAYGENT_CERTIFICATE=str(files["ca"]),
        )  # fmt: skip
        assert customers(server) == []
        assert "not delivered" in without.stderr

        with_cert = run_app(
            tmp_path / "second", endpoint, "main", "cust-mtls",
            OTEL_EXPORTER_PAYGENT_CERTIFICATE=str(files["ca"]),
            OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE=str(files["client"]),
        )  # fmt: skip
        assert with_cert.returncode == 0, with_cert.stderr
        assert customers(server) == ["cust-mtls"]


# ---------------------------------------------------------------- proxies


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real forward proxy (proxy.py) on loopback: (its URL, its access log)."""
    port_file, log = tmp_path / "proxy.port", tmp_path / "proxy.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--num-workers", "1", "--num-acceptors", "1",
         "--log-file", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port = wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(),
            timeout=20,
            message="proxy.py listening",
        )
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(10)


def proxied(log: Path, what: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if what in line]


def test_http_proxy_is_used_for_an_http_endpoint(
    tmp_path: Path, sandbox: SandboxServer, proxy: tuple[str, Path]
) -> None:
    url, log = proxy
    run = run_app(
        tmp_path, f"http://localhost:{sandbox.port}", "main", "cust-proxied", HTTP_PROXY=url
    )

    assert run.returncode == 0, run.stderr
    assert customers(sandbox) == ["cust-proxied"]
    wait_for(lambda: proxied(log, f"POST localhost:{sandbox.port}/api/v2/usage - 200"))


def test_no_proxy_sends_direct(
    tmp_path: Path, sandbox: SandboxServer, proxy: tuple[str, Path]
) -> None:
    url, log = proxy
    run = run_app(
        tmp_path, f"http://localhost:{sandbox.port}", "main", "cust-direct",
        HTTP_PROXY=url, NO_PROXY="localhost",
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert customers(sandbox) == ["cust-direct"]
    assert proxied(log, "/api/v2/usage") == []


def test_https_goes_through_the_proxy_as_a_tunnel(
    tmp_path: Path, tls_sandbox: tuple[SandboxServer, Path], proxy: tuple[str, Path]
) -> None:
    server, ca_file = tls_sandbox
    url, log = proxy
    run = run_app(
        tmp_path, f"https://localhost:{server.port}", "main", "cust-tunnel",
        HTTPS_PROXY=url, OTEL_EXPORTER_PAYGENT_CERTIFICATE=str(ca_file),
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert customers(server) == ["cust-tunnel"]
    wait_for(lambda: proxied(log, f"CONNECT localhost:{server.port}"))


def test_a_proxy_that_is_down_is_named_in_the_failure(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    run = run_app(
        tmp_path, f"http://localhost:{sandbox.port}", "main", "cust-stuck", HTTP_PROXY=dead
    )

    assert f"cannot connect to the proxy {dead}" in run.stderr
    assert customers(sandbox) == []
    assert spool_pending(tmp_path) == 1


# ---------------------------------------------------------------- endpoint changes


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PAYGENT_"))}
    return subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", *args],
        env={**env, "XDG_STATE_HOME": str(tmp_path / "state")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_records_of_a_wrong_endpoint_are_shown_per_endpoint_and_sent_after_retarget(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    wrong = f"http://localhost:{sandbox.port}/v1"
    right = f"http://localhost:{sandbox.port}"
    first = run_app(tmp_path, wrong, "main", "cust-stranded")
    assert "the endpoint looks wrong" in first.stderr

    status = cli(tmp_path, "spool", "status")
    assert status.returncode == 0, status.stderr
    assert f"endpoint        {wrong}" in status.stdout
    assert "pending       1 (0 being sent now), dead letters 0" in status.stdout
    assert "last error    HTTP 404 for POST" in status.stdout
    assert f"spool retarget --from {wrong} --to URL" in status.stdout

    # Fixing the endpoint alone does not send the old records: the exporter says so.
    fixed = run_app(tmp_path, right, "main", "cust-new")
    assert customers(sandbox) == ["cust-new"]
    assert f"filed under {wrong}, not under the configured endpoint {right}" in fixed.stderr
    assert "spool retarget --spool" in fixed.stderr

    moved = cli(tmp_path, "spool", "retarget", "--from", wrong, "--to", right)
    assert moved.returncode == 0, moved.stderr
    assert f"1 pending records and 0 dead letters of {wrong} are now filed under {right}" in (
        moved.stdout
    )
    again = run_app(tmp_path, right, "main", "cust-after")
    assert again.returncode == 0, again.stderr
    assert customers(sandbox) == ["cust-after", "cust-new", "cust-stranded"]
    assert spool_pending(tmp_path) == 0


def test_retarget_refuses_a_target_that_is_not_an_api_base_url(tmp_path: Path) -> None:
    for target, problem in [
        ("localhost:8080", "must start with http:// or https://"),
        ("https://cp-api.withpaygent.com/api/v2/usage", "leave out /api/v2/usage"),
    ]:
        done = cli(tmp_path, "spool", "retarget", "--from", "http://a", "--to", target)
        assert done.returncode == 2
        assert problem in done.stderr


def test_an_endpoint_without_a_scheme_stops_delivery_loudly_and_keeps_the_records(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    run = run_app(tmp_path, f"localhost:{sandbox.port}", "main", "cust-noscheme")

    assert run.returncode == 0, run.stderr
    assert "must start with http:// or https://" in run.stderr
    assert "nothing is sent to" in run.stderr
    assert customers(sandbox) == []
    assert sandbox.ledger.request_log() == []
    assert spool_pending(tmp_path) == 1
    assert run.seconds < EXIT_BOUND_S


def test_serve_refuses_to_start_when_it_could_not_deliver(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PAYGENT_"))}
    done = subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", "serve", "--port", "0",
         "--spool", str(tmp_path / "bridge.sqlite3")],
        env={**env, "PAYGENT_API_KEY": API_KEY,
             "OTEL_EXPORTER_PAYGENT_ENDPOINT": "https://cp-api.withpaygent.com/api/v2/usage"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot deliver: OTEL_EXPORTER_PAYGENT_ENDPOINT=" in done.stderr
    assert "leave out /api/v2/usage" in done.stderr
