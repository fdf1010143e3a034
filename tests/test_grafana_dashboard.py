"""The Grafana dashboard (collector-config/grafana/) against the metrics the code exports.

The names come from running the code: a real ``MeterProvider`` reading the self-metrics of
a pipeline that delivered to the sandbox (translated to Prometheus names as the Collector's
``prometheus`` exporter writes them: dots become underscores, monotonic sums get
``_total``), and the bridge's own ``GET /metrics`` text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from conftest import API_KEY, wait_for
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Sum

import paygent_otel.delivery.pipeline as delivery_module
import paygent_otel.delivery.worker as worker_module
from paygent_otel.bridge import BridgeApp, BridgeConfig, BridgeServer
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.pipeline import DeliveryPipeline
from paygent_otel.delivery.selfmetrics import register_self_metrics
from paygent_otel.sandbox import SandboxServer

DASHBOARD = (
    Path(__file__).parent.parent / "collector-config" / "grafana" / "paygent-otel-dashboard.json"
)
_PROMQL_WORDS = {"sum", "by", "rate", "increase", "or", "vector", "label_values"}


def exported(sandbox: SandboxServer, tmp_path: Path) -> dict[str, set[str]]:
    """Prometheus metric name -> label names, of everything the code exports."""
    from test_bridge_server import PB, spans
    from test_cli import record

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    config = ExporterConfig.resolve(
        endpoint=sandbox.url, api_key=API_KEY, spool_path=tmp_path / "spool.sqlite3"
    )
    pipeline = DeliveryPipeline(config, name="traces")
    register_self_metrics(pipeline, provider)
    pipeline.submit([record(1)])
    assert pipeline.force_flush(10)
    names: dict[str, set[str]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                prom = metric.name.replace(".", "_")
                if isinstance(metric.data, Sum) and metric.data.is_monotonic:
                    prom += "_total"
                labels = names.setdefault(prom, set())
                for point in metric.data.data_points:
                    labels.update(point.attributes or {})
    pipeline.shutdown(2)
    provider.shutdown()

    bridge_config = config.__class__.resolve(
        None, endpoint=sandbox.url, api_key=API_KEY, spool_path=tmp_path / "bridge.sqlite3"
    )
    server = BridgeServer(BridgeApp(BridgeConfig(exporter=bridge_config, flush_timeout=2.0)))
    server.start()
    try:
        assert httpx.post(f"{server.url}/v1/traces", content=spans(2), headers=PB).is_success
        refused = httpx.post(f"{server.url}/v1/traces", content=b"x", headers={})
        assert refused.status_code == 415
        wait_for(lambda: sandbox.ledger.count() >= 3)
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            names.setdefault(name.split()[0], set()).update(
                re.findall(r"(\w+)=\"", rest.partition("}")[0])
            )
    return names


def queries(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return found


def test_the_dashboard_uses_exactly_the_metrics_the_code_exports(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported(sandbox, tmp_path)
    assert {"paygent_otel_records_total", "paygent_otel_spool_pending",
            "paygent_otel_spool_dead_letters"} <= names.keys()  # fmt: skip

    used: set[str] = set()
    for query in queries(dashboard):
        metrics = set(re.findall(r"\b(paygent_\w+)", query))
        assert metrics, f"a query that reads no paygent metric: {query}"
        unknown = metrics - names.keys()
        assert not unknown, f"{query}: {unknown} is not exported (exported: {sorted(names)})"
        used |= metrics
        labels = set(re.findall(r"by \(([^)]*)\)", query))
        label_names = {n.strip() for group in labels for n in group.split(",")}
        label_names |= set(re.findall(r"[{,]\s*(\w+)\s*=~?\"", query))
        label_names |= set(re.findall(r"label_values\(\w+, (\w+)\)", query))
        allowed = set().union(*(names[m] for m in metrics))
        assert label_names <= allowed, f"{query}: labels {label_names - allowed} not exported"
    assert used == names.keys(), f"exported but not on the dashboard: {names.keys() - used}"


def test_the_outcomes_the_dashboard_counts_as_losses_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    source = "".join(
        Path(module.__file__).read_text() for module in (delivery_module, worker_module)
    )
    for query in queries(dashboard):
        for alternatives in re.findall(r'outcome=~?"([^"]+)"', query):
            for outcome in alternatives.split("|"):
                assert f'"{outcome}"' in source, f"{outcome!r} is no outcome the pipeline counts"
    assert dashboard["uid"] and dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"]
               if p["type"] != "row")  # fmt: skip
