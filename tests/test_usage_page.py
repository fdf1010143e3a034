"""The usage page of the sandbox and of the bridge, loaded in a real headless Chromium.

Debian's ``chromium`` (``make test`` installs it where missing): each page is loaded with
``--dump-dom`` (its content is checked) and ``--screenshot`` (saved under the test's tmp
folder). Access rules are checked through the ASGI app with a non-loopback client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, wait_for
from test_bridge_server import PB, spans
from test_cli import record

from paygent_otel.bridge import BridgeApp, BridgeConfig, BridgeServer
from paygent_otel.bridge.auth import BearerAuth
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer
from paygent_otel.sandbox.app import SandboxApp
from paygent_otel.sandbox.ledger import LedgerWriter

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
TOKEN = "page-token-0123456789abcdef"


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("PAYGENT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is missing: `make test` installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (make test installs it)")
    return found


def browse(chromium: str, url: str, tmp_path: Path, name: str) -> str:
    """The page's DOM after loading ``url``; a screenshot goes to ``tmp_path/name.png``."""
    profile = tmp_path / f"chromium-{name}"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2000"]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True
    ).stdout
    shot = tmp_path / f"{name}.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", url], capture_output=True, timeout=90, check=True
    )
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
    return dom


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[SandboxServer]:
    """A sandbox that shows a spool: billed usage, a dead letter, a record failing to send."""
    spool = tmp_path / "spool.sqlite3"
    with SandboxServer(tmp_path / "ledger.sqlite3", page_spools=[spool]) as server:
        config = ExporterConfig.resolve(endpoint=server.url, api_key=API_KEY, spool_path=spool)
        pipeline = DeliveryPipeline(config, name="traces")
        pipeline.submit([record(i, "cust-alpha", 30.0) for i in range(6)])
        pipeline.submit([record(i, "cust-beta", 90.0) for i in range(3)])
        assert pipeline.force_flush(10)
        server.set_faults(reject_rate=1.0)
        pipeline.submit([record(50, "cust-beta")])
        wait_for(lambda: SqliteSpool(spool, max_bytes=1 << 30).stats().dead_letters == 1)
        server.set_faults(reject_rate=0.0, fail_rate=1.0, fail_status=503)
        pipeline.submit([record(60, "cust-gamma")])
        wait_for(lambda: any(e["status"] == 503 for e in server.ledger.request_log()))
        pipeline.shutdown(0.5)
        server.set_faults(fail_rate=0.0)
        yield server


def test_the_sandbox_page_shows_usage_health_and_the_conservation_report(
    chromium: str, watched: SandboxServer, tmp_path: Path
) -> None:
    server = watched
    dom = browse(chromium, f"{server.url}/usage", tmp_path, "usage-sandbox")

    assert "<title>paygent sandbox: usage</title>" in dom
    assert dom.count('class="series"') == 2  # one line per customer billed
    assert 'data-customer="cust-alpha"' in dom and 'data-customer="cust-beta"' in dom
    assert '<td>cust-alpha</td><td>stt</td><td class="n">6</td><td class="n">3</td>' in dom
    assert '<b id="pending">1</b>' in dom and '<b id="dead">1</b>' in dom
    assert "sandbox injected rejection" in dom  # the dead letter's message
    assert "HTTP 503: " in dom and "sandbox injected failure (503)" in dom  # the last error
    assert 'id="verdict">BALANCED' in dom
    assert "UsageSampler" in dom  # what the report cannot see
    # Nothing fetched: no script, no stylesheet link, no image or frame source.
    assert not any(tag in dom for tag in ("<script", "<link", " src=", "<iframe"))

    by_day = browse(chromium, f"{server.url}/usage?period=day&kind=stt", tmp_path, "by-day")
    assert "audio minutes per day, UTC" in by_day


def test_the_bridge_page_has_the_same_look_over_its_spool(
    chromium: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    exporter = ExporterConfig.resolve(
        None, endpoint=sandbox.url, api_key=API_KEY, spool_path=tmp_path / "bridge.sqlite3"
    )
    server = BridgeServer(BridgeApp(BridgeConfig(exporter=exporter, flush_timeout=2.0)))
    server.start()
    try:
        for customer, count in (("cust-north", 4), ("cust-south", 2)):
            answer = httpx.post(f"{server.url}/v1/traces", content=spans(count, customer),
                                headers=PB)  # fmt: skip
            assert answer.status_code == 200
        wait_for(lambda: sandbox.ledger.count() == 6)
        dom = browse(chromium, f"{server.url}/usage?kind=tts", tmp_path, "usage-bridge")
    finally:
        server.stop()

    assert "<title>paygent-otel bridge: usage</title>" in dom
    assert 'data-customer="cust-north"' in dom and 'data-customer="cust-south"' in dom
    assert "characters per hour, UTC" in dom
    assert '<b id="pending">0</b>' in dom and 'id="verdict">BALANCED' in dom
    assert f"bridge delivering to {sandbox.url}" in dom


# ---------------------------------------------------------------- who may see it


class OffLoopback:
    """Requests to an ASGI app from 203.0.113.9 (a documentation address), in process."""

    def __init__(self, app: Any) -> None:
        self._transport = httpx.ASGITransport(app, client=("203.0.113.9", 50000))

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def fetch() -> httpx.Response:
            async with httpx.AsyncClient(transport=self._transport, base_url="http://x") as c:
                return await c.get(path, headers=headers)

        return asyncio.run(fetch())


def test_off_loopback_the_bridge_page_needs_a_token_and_health_stays_open(
    tmp_path: Path,
) -> None:
    exporter = ExporterConfig.resolve(None, api_key=API_KEY, spool_path=tmp_path / "s.sqlite3")
    guarded = BridgeApp(BridgeConfig(exporter=exporter, auth=BearerAuth([(TOKEN, None, "page")])))
    client = OffLoopback(guarded.asgi)
    refused = client.get("/usage")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic ")
    assert "cust" not in refused.text
    assert client.get("/usage", headers={"Authorization": "Bearer wrong-token-123456"}
                      ).status_code == 401  # fmt: skip
    assert client.get("/usage", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    assert client.get("/usage", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert client.get("/health").status_code == 200
    guarded.close()
    open_bridge = BridgeApp(BridgeConfig(exporter=exporter))
    assert OffLoopback(open_bridge.asgi).get("/usage").status_code == 403  # loopback only
    open_bridge.close()


def test_off_loopback_the_sandbox_page_needs_its_api_key(tmp_path: Path) -> None:
    for api_key, expected in ((None, 403), ("sandbox-key", 401)):
        writer = LedgerWriter(tmp_path / f"{api_key}.sqlite3")
        app = SandboxApp(writer, api_key=api_key)
        client = OffLoopback(app.asgi)
        assert client.get("/usage").status_code == expected
        assert client.get("/healthz").status_code == 200
        if api_key:
            allowed = client.get("/usage", headers={"Authorization": f"Bearer {api_key}"})
            assert allowed.status_code == 200 and "Billed usage per customer" in allowed.text
        writer.close()
