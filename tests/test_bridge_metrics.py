"""``GET /metrics`` keeps its families: names, types, help, label sets.

``tests/data/bridge_metrics.txt`` is the text the bridge served before ``/metrics`` was
written with ``prometheus-client`` (captured from a running bridge after the scenario
below). Dashboards and operators' alerts read these names and labels: the families parsed
from today's text must be the same. Sample values may be formatted differently (``1`` then,
``1.0`` now): Prometheus reads both as the same number.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_bridge_server import PB, spans

from paygent_otel.bridge import TRACES_PATH

BEFORE = Path(__file__).parent / "data" / "bridge_metrics.txt"


def families(text: str) -> dict[str, tuple[str, str, set[tuple[str, tuple[str, ...]]]]]:
    """Family name -> (type, help, {(sample name, sorted label names)})."""
    return {
        family.name: (
            family.type,
            family.documentation,
            {(s.name, tuple(sorted(s.labels))) for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
    }


def scenario_text(bridge, sandbox) -> str:
    """Metrics after one accepted, one malformed and one unsupported request, and one
    connection closed by the server."""
    server = bridge()
    assert httpx.post(server.url + TRACES_PATH, content=spans(2), headers=PB).status_code == 200
    assert httpx.post(server.url + TRACES_PATH, content=b"\x01", headers=PB).status_code == 400
    assert httpx.post(server.url + TRACES_PATH, content=b"x").status_code == 415
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.recv(1024)
    wait_for(lambda: sandbox.ledger.count() >= 2)
    assert server.app.pipeline.force_flush(5.0)
    return httpx.get(server.url + "/metrics").text


def test_metrics_families_unchanged(bridge, sandbox) -> None:
    text = scenario_text(bridge, sandbox)
    assert families(text) == families(BEFORE.read_text())
