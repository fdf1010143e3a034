"""``paygent-otel doctor`` against real servers on loopback: each check's line and the exit."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import API_KEY

from paygent_otel._cli.main import main
from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def keyed_sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(tmp_path / "ledger.sqlite3", api_key=API_KEY) as server:
        yield server


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, str]]:
    code = main(["doctor", *argv])
    lines = capsys.readouterr().out.splitlines()
    by_name = {}
    for line in lines:
        status, _, rest = line.partition("  ")
        if status.strip() in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.partition(": ")
            by_name[name] = f"{status.strip()} {detail}"
    return code, by_name


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_every_check_passes_against_the_sandbox(
    host: str, keyed_sandbox: SandboxServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    url = f"http://{host}:{keyed_sandbox.port}"
    code, checks = doctor(capsys, "--endpoint", url, "--spool", str(tmp_path / "s.sqlite3"))

    assert code == 0, checks
    assert list(checks) == [
        "configuration", "name resolution", "TCP connect", "TLS", "proxy", "authentication",
        "spool",
    ]  # fmt: skip
    assert checks["name resolution"].startswith(f"PASS {host} is ")
    assert "127.0.0.1" in checks["name resolution"] or "::1" in checks["name resolution"]
    assert checks["TLS"] == "PASS not used: http to a loopback address"
    assert checks["authentication"] == "PASS the sandbox accepts this API key"
    assert checks["spool"].startswith(f"PASS {tmp_path / 's.sqlite3'}: not created yet")
    assert not (tmp_path / "s.sqlite3").exists()  # doctor creates nothing


def test_a_wrong_key_a_bad_endpoint_and_a_closed_port_fail_with_their_fix(
    keyed_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PAYGENT_API_KEY", "not-the-key")
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url)
    assert code == 1
    assert checks["authentication"].startswith("FAIL the API key is refused (401")

    code, checks = doctor(capsys, "--endpoint", f"{keyed_sandbox.url}/api/v2/usage")
    assert code == 1
    assert "leave out /api/v2/usage, which the exporter appends" in checks["configuration"]
    assert checks["TCP connect"] == "SKIP needs name resolution"

    monkeypatch.delenv("PAYGENT_API_KEY")
    code, checks = doctor(capsys, "--endpoint", "ftp://127.0.0.1")
    assert "must start with http:// or https://" in checks["configuration"]
    assert "no API key" in checks["configuration"]

    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, checks = doctor(capsys, "--endpoint", f"http://127.0.0.1:{port}", "--timeout", "2s")
    assert code == 1 and checks["TCP connect"].startswith(f"FAIL 127.0.0.1:{port}: ")
    assert checks["authentication"] == "SKIP needs TLS"
    code = main(["doctor", "--endpoint", "http://no-such-host.invalid", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 1 and document["checks"][1]["status"] == "fail"
    assert "DNS" in document["checks"][1]["fix"]


def test_plain_http_off_loopback_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from paygent_otel._cli.doctor import _Target, _tls
    from paygent_otel.delivery.config import ExporterConfig

    target = _Target(ExporterConfig.resolve(endpoint="http://billing.example"), 1.0)
    target.host, target.port, target.addresses = "billing.example", 80, ("192.0.2.7",)
    check = _tls(target)
    assert check.status == "fail" and "in clear" in check.detail


def test_the_proxy_in_effect_is_named_and_no_proxy_bypasses_it(
    keyed_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url)
    assert code == 1
    assert checks["proxy"].startswith(f"FAIL http proxy {dead_proxy} (from HTTP_PROXY) is not")
    assert checks["authentication"] == "SKIP needs proxy"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url)
    assert code == 0 and "is bypassed for 127.0.0.1 (NO_PROXY)" in checks["proxy"]


def test_the_spool_check_names_permissions_backlog_and_dead_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    keyed_sandbox: SandboxServer,
) -> None:  # fmt: skip
    from test_cli import record

    from paygent_otel.delivery.spool import destination_id

    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, max_bytes=1 << 30)
    spool.add(destination_id(keyed_sandbox.url), [record(i) for i in range(3)])
    spool.add("0123456789abcdef", [record(9)])
    spool.close()
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url, "--spool", str(path))
    assert code == 0
    assert "this endpoint: 3 pending, oldest" in checks["spool"]
    assert "endpoint 0123456789abcdef: 1 pending" in checks["spool"]

    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE pending SET created = created - 600")
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url, "--spool", str(path))
    assert code == 1 and "oldest 10.0 min" in checks["spool"]
    path.chmod(0o644)
    code, checks = doctor(capsys, "--endpoint", keyed_sandbox.url, "--spool", str(path))
    assert code == 1 and "others may read it" in checks["spool"]


# ---------------------------------------------------------------- TLS


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (Debian's openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_sandbox(certificate: tuple[Path, Path]) -> Iterator[int]:
    """An HTTPS stand-in that answers the sandbox's auth check; its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    if tls.recv(4096).startswith(b"GET /api/v2/auth-check"):
                        body = b'{"ok": true, "sandbox": true}'
                        tls.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                            + body
                        )
            except (OSError, ssl.SSLError):
                conn.close()  # a handshake the client gave up on (untrusted certificate)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_tls_names_the_ca_in_use_and_honours_the_ca_bundle_variable(
    tls_sandbox: int, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PAYGENT_API_KEY", API_KEY)
    url = f"https://localhost:{tls_sandbox}"
    code, checks = doctor(capsys, "--endpoint", url)
    assert code == 1
    assert checks["TLS"].startswith("FAIL the certificate of localhost is not trusted")
    assert "CA: system trust store" in checks["TLS"]

    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_CERTIFICATE", str(certificate[0]))
    code, checks = doctor(capsys, "--endpoint", url)
    assert code == 0, checks
    assert checks["TLS"].startswith("PASS TLSv1.3 with localhost, certificate valid ")
    assert f"CA: CA bundle {certificate[0]}" in checks["TLS"]
    assert checks["authentication"] == "PASS the sandbox accepts this API key"

    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE", str(Path("/nonexistent.pem")))
    code, checks = doctor(capsys, "--endpoint", url)
    # A file the exporter cannot read stops delivery: the configuration check says so.
    assert code == 1 and checks["configuration"].startswith("FAIL ")
    assert "OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE='/nonexistent.pem'" in checks["configuration"]
