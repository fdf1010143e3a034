"""The shipped collector configurations agree with the bridge and the convention.

Names are imported from ``paygent_otel.convention.semconv`` and ``paygent_otel.bridge``, so
renaming an attribute, a path or the default port breaks this test instead of silently breaking a
user's Collector. (``tests/test_collectors.py`` runs the configs a real binary can run.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import env_file_settings

from paygent_otel.bridge import DEFAULT_PORT, SIGNAL_PATHS, Signal
from paygent_otel.bridge.config import DEFAULT_MAX_ITEMS
from paygent_otel.convention import semconv as sc

CONFIGS = Path(__file__).resolve().parents[1] / "collector-config"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
ENV_DEFAULT = re.compile(r"\$\{env:(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")
SIGNAL_OF_PIPELINE = {"traces": Signal.TRACES, "metrics": Signal.METRICS, "logs": Signal.LOGS}


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), path.name
    return document


def with_defaults(value: str) -> str:
    """A config string with each ``${env:NAME:-default}`` replaced by its default."""
    return ENV_DEFAULT.sub(lambda m: m["default"] or "", value)


def bridge_exporters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: settings
        for name, settings in (config.get("exporters") or {}).items()
        if name.startswith("otlphttp/paygent")
    }


def test_there_is_a_config_for_each_topology() -> None:
    names = {p.name for p in YAMLS}
    assert {"gateway.yaml", "gateway-persistent.yaml", "scale-out-gateway.yaml",
            "scale-out-bridge-sidecar.yaml", "filelog-usage.yaml"} <= names  # fmt: skip
    assert (CONFIGS / "rotel.env").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_each_config_parses_and_says_when_to_use_it(path: Path) -> None:
    config = load(path)
    header = path.read_text().split("\n\n", 1)[0]
    assert header.startswith(f"# {path.name}:"), "the first line names the file and its purpose"
    assert "# When to use:" in header
    pipelines = config["service"]["pipelines"]
    assert pipelines
    for pipeline, parts in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in parts.get(kind) or []:
                assert component in (config.get(kind) or {}), f"{pipeline}: {component} undefined"
    for extension in config["service"].get("extensions") or []:
        assert extension in config["extensions"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_usage_reaches_the_bridge_where_it_listens(path: Path) -> None:
    config = load(path)
    pipelines = config["service"]["pipelines"]
    signals_to_bridge: set[Signal] = set()
    for pipeline, parts in pipelines.items():
        exporters = parts["exporters"]
        if any(e.startswith(("otlphttp/paygent", "loadbalancing/paygent")) for e in exporters):
            signals_to_bridge.add(SIGNAL_OF_PIPELINE[pipeline.split("/")[0]])
    assert signals_to_bridge, f"{path.name} sends nothing to the bridge"
    for name, exporter in bridge_exporters(config).items():
        endpoint = urlsplit(with_defaults(exporter["endpoint"]))
        assert endpoint.port == DEFAULT_PORT, f"{name}: not the bridge's default port"
        assert endpoint.path in ("", "/"), "otlphttp appends the signal paths itself"
        for signal in Signal:
            # otlphttp's defaults: <endpoint>/v1/traces, /v1/metrics, /v1/logs.
            assert SIGNAL_PATHS[signal] == f"/v1/{signal.value}"
            assert f"{signal.value}_endpoint" not in exporter
        assert exporter["encoding"] == "proto"
        assert exporter["compression"] == "gzip"
        retry = exporter["retry_on_failure"]
        assert retry["enabled"] is True
        assert retry["max_elapsed_time"] in ("0s", 0), "billing data: never give up"
        assert exporter["sending_queue"]["enabled"] is True
    for name, processor in (config.get("processors") or {}).items():
        if name.startswith("batch/paygent"):
            assert processor["send_batch_max_size"] <= DEFAULT_MAX_ITEMS


def filter_conditions(config: dict[str, Any]) -> dict[str, list[str]]:
    [settings] = [v for k, v in config["processors"].items() if k.startswith("filter/paygent")]
    return {
        "span": settings["traces"]["span"],
        "metric": settings["metrics"]["metric"],
        "log_record": settings["logs"]["log_record"],
    }


@pytest.mark.parametrize(
    "path",
    [p for p in YAMLS if any(k.startswith("filter/") for k in load(p).get("processors") or {})],
    ids=lambda p: p.name,
)
def test_filters_keep_exactly_what_the_convention_bills(path: Path) -> None:
    config = load(path)
    conditions = filter_conditions(config)
    # Spans: dropped unless they carry the usage kind, or the marker the transform sets on
    # spans with a usage event.
    [transform] = [v for k, v in config["processors"].items() if k.startswith("transform/paygent")]
    [statement] = transform["trace_statements"][0]["statements"]
    assert transform["trace_statements"][0]["context"] == "spanevent"
    marker = re.fullmatch(
        r'set\(span\.attributes\["(?P<marker>[\w.]+)"\], true\) where name == "(?P<event>[\w.]+)"',
        statement,
    )
    assert marker, statement
    assert marker["event"] == sc.USAGE_EVENT_NAME
    assert marker["marker"] not in sc.QUANTITIES and marker["marker"] not in sc.IDENTITY_ATTRIBUTES
    [span_rule] = conditions["span"]
    assert span_rule == (
        f'attributes["{sc.USAGE_KIND}"] == nil and attributes["{marker["marker"]}"] == nil'
    )
    # Log records: dropped unless they carry the usage kind.
    assert conditions["log_record"] == [f'attributes["{sc.USAGE_KIND}"] == nil']
    # Metrics: dropped unless the name matches the pattern; every usage instrument matches.
    [metric_rule] = conditions["metric"]
    pattern = re.fullmatch(r'not IsMatch\(name, "(?P<regex>.+)"\)', metric_rule)
    assert pattern, metric_rule
    regex = re.compile(pattern["regex"].replace("\\\\", "\\"))
    assert all(regex.search(name) for name in sc.QUANTITIES)
    assert not regex.search("http.server.duration")
    assert not regex.search("paygent_otel.records")  # the exporters' own metrics stay out
    # The paygent pipelines really use the filter (and the transform, for spans).
    for pipeline, parts in config["service"]["pipelines"].items():
        if pipeline.endswith("/paygent"):
            assert any(p.startswith("filter/paygent") for p in parts["processors"])
            if pipeline.startswith("traces"):
                order = parts["processors"]
                mark = next(i for i, p in enumerate(order) if p.startswith("transform/paygent"))
                drop = next(i for i, p in enumerate(order) if p.startswith("filter/paygent"))
                assert mark < drop


def test_persistent_configs_queue_on_disk() -> None:
    for name in ("gateway-persistent.yaml", "scale-out-bridge-sidecar.yaml"):
        config = load(CONFIGS / name)
        [(storage, settings)] = config["extensions"].items()
        assert storage.startswith("file_storage/")
        assert settings["fsync"] is True
        for exporter in bridge_exporters(config).values():
            assert exporter["sending_queue"]["storage"] == storage


def test_scale_out_routes_each_metric_stream_to_one_replica() -> None:
    config = load(CONFIGS / "scale-out-gateway.yaml")
    balancers = {k: v for k, v in config["exporters"].items() if k.startswith("loadbalancing/")}
    routing = {name.split("_")[-1]: settings["routing_key"] for name, settings in balancers.items()}
    # Cumulative metric state lives in one replica: a stream must always reach the same one.
    assert routing == {"traces": "traceID", "metrics": "streamID", "logs": "traceID"}
    for settings in balancers.values():
        assert settings["retry_on_failure"]["max_elapsed_time"] in ("0s", 0)
    sidecar = load(CONFIGS / "scale-out-bridge-sidecar.yaml")
    [resolver_port] = {s["resolver"]["dns"]["port"] for s in balancers.values()}
    assert sidecar["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(
        f":{resolver_port}"
    )


def test_rotel_env_uses_real_settings_and_the_bridge_defaults() -> None:
    settings = env_file_settings(CONFIGS / "rotel.env")
    assert (CONFIGS / "rotel.env").read_text().startswith("# rotel.env:")
    assert "# When to use:" in (CONFIGS / "rotel.env").read_text()
    assert settings["ROTEL_OTLP_EXPORTER_PROTOCOL"] == "http"
    assert urlsplit(settings["ROTEL_OTLP_EXPORTER_ENDPOINT"]).port == DEFAULT_PORT
    # rotel's batcher drops the resource of a split ResourceSpans (collector-config/README.md):
    # exports are forwarded as they came, and the SDK's batches are under DEFAULT_MAX_ITEMS.
    assert settings["ROTEL_DISABLE_BATCHING"] == "true"
    assert "ROTEL_BATCH_MAX_SIZE" not in settings


def test_readme_explains_every_config() -> None:
    readme = (CONFIGS / "README.md").read_text()
    for path in [*YAMLS, CONFIGS / "rotel.env"]:
        assert f"`{path.name}`" in readme, path.name
    assert "## Ship through a Collector" in readme
    assert f"--port {DEFAULT_PORT}" in readme or f":{DEFAULT_PORT}" in readme
