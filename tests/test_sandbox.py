"""The sandbox over real loopback HTTP: validation, auth, idempotency, faults, ledger, CLI."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import paygent_otel.sandbox as sandbox_pkg
from paygent_otel._cli.sandbox import register
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.mapping import map_usage
from paygent_otel.sandbox import Ledger, SandboxProcess, SandboxServer
from paygent_otel.sandbox.app import INJECTED_REJECTION_ERROR

API_KEY = "test-key"
USAGE = "/api/v2/usage"


def usage_body(
    customer: str, indicator: str, provider: str, model: str, **quantity: Any
) -> dict[str, Any]:
    """A ``/api/v2/usage`` body of agent-voice on the default plan; ``quantity`` completes
    ``rawUsage``."""
    return {
        "agentId": "agent-voice",
        "customerId": customer,
        "indicator": indicator,
        "rawUsage": {"provider": provider, "model": model, "plan": "default", **quantity},
    }


def stt_body(**raw: Any) -> dict[str, Any]:
    quantity = {"audioDuration": 0.45, **raw}
    body = usage_body("cust-a", "voice-minutes", "deepgram", "nova-2", **quantity)
    return {**body, "metaTags": {"region": "eu"}}


def tts_body() -> dict[str, Any]:
    return usage_body("cust-b", "", "elevenlabs", "eleven_turbo_v2", characterCount=1200)


STS_METADATA = {
    "schemaVersion": 1,
    "input": {"text": {"tokens": 120}, "audio": {"tokens": 900, "minutes": 0.5}},
    "output": {"audio": {"tokens": 700, "minutes": 0.25}},
    "cached": {"text": {"tokens": 50}},
    "connection": {"minutes": 1.5},
}


def sts_body() -> dict[str, Any]:
    metadata = json.loads(json.dumps(STS_METADATA))
    return usage_body("cust-a", "realtime", "openai", "gpt-realtime", usageMetadata=metadata)


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers={"paygent-api-key": API_KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """One sandbox for the many validation cases, none of which may be recorded."""
    with SandboxServer(tmp_path_factory.mktemp("shared") / "ledger.sqlite3") as server:
        yield server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """A client without default headers (each httpx.post would build a TLS context)."""
    with httpx.Client(timeout=5.0) as c:
        yield c


def post(client: httpx.Client, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(USAGE, json=body, headers=headers)


# --------------------------------------------------------------------------- accepted usage


def test_stt_tts_sts_are_recorded_with_their_types(
    sandbox: SandboxServer, client: httpx.Client
) -> None:
    before = time.time()
    stt_content = json.dumps(stt_body())
    responses = [
        client.post(USAGE, content=stt_content, headers={"Content-Type": "application/json"}),
        post(client, tts_body(), key="tts-1"),
        post(client, sts_body()),
    ]

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.json() for r in responses] == [
        {"id": 1, "duplicate": False},
        {"id": 2, "duplicate": False},
        {"id": 3, "duplicate": False},
    ]
    stt, tts, sts = sandbox.ledger.rows()
    assert stt["kind"] == "stt" and tts["kind"] == "tts" and sts["kind"] == "sts"
    assert before <= stt["received_at"] <= time.time()
    assert isinstance(stt["audio_minutes"], float) and stt["audio_minutes"] == 0.45
    assert stt["characters"] is None and stt["usage_metadata"] is None
    assert stt["meta_tags"] == {"region": "eu"}
    assert stt["body"] == stt_content
    assert (stt["agent_id"], stt["customer_id"], stt["indicator"]) == (
        "agent-voice",
        "cust-a",
        "voice-minutes",
    )
    assert (stt["provider"], stt["model"], stt["plan"]) == ("deepgram", "nova-2", "default")
    assert type(tts["characters"]) is int and tts["characters"] == 1200
    assert tts["audio_minutes"] is None and tts["idempotency_key"] == "tts-1"
    assert tts["meta_tags"] is None
    assert sts["usage_metadata"] == STS_METADATA
    assert type(sts["sts_tokens"]) is int and sts["sts_tokens"] == 120 + 900 + 700 + 50
    assert sts["sts_minutes"] == 0.5 + 0.25 + 1.5
    assert sts["audio_minutes"] is None and sts["characters"] is None
    assert [e["outcome"] for e in sandbox.ledger.request_log()] == ["accepted"] * 3


def test_documented_edge_shapes_are_accepted(sandbox: SandboxServer, client: httpx.Client) -> None:
    bodies = [
        stt_body(audioDuration=2),  # an integer number of minutes is still a number
        {**sts_body(), "rawUsage": {**sts_body()["rawUsage"], "usageMetadata": {
            "schemaVersion": 1,
            "input": {"video": {"minutes": 0.1}, "image": {"tokens": 0}},
            "cached": {"tokens": 7},
        }}},
        {**tts_body(), "metaTags": {f"k{i}": "v" * 256 for i in range(20)}},
        {**tts_body(), "metaTags": {"A-z_0-9" + "x" * 57: ""}},
    ]  # fmt: skip

    assert [post(client, b).status_code for b in bodies] == [200] * 4
    rows = sandbox.ledger.rows()
    assert rows[0]["audio_minutes"] == 2.0
    assert (rows[1]["sts_tokens"], rows[1]["sts_minutes"]) == (7, 0.1)


def test_payloads_from_the_mapping_are_accepted(
    sandbox: SandboxServer, client: httpx.Client
) -> None:
    identity = {sc.AGENT_ID: "agent-voice", sc.CUSTOMER_ID: "cust-a", "paygent.meta.tier": "gold"}
    records = [
        {sc.USAGE_KIND: "stt", sc.PROVIDER: "deepgram", sc.MODEL: "nova-2",
         sc.STT_AUDIO_SECONDS: 27.0},
        {sc.USAGE_KIND: "tts", sc.PROVIDER: "elevenlabs", sc.MODEL: "turbo",
         sc.TTS_CHARACTERS: 1200},
        {sc.USAGE_KIND: "sts", sc.PROVIDER: "openai", sc.MODEL: "gpt-realtime",
         **{name: 3 for name, q in sc.QUANTITIES.items()
            if q.kind is sc.UsageKind.STS and name != sc.STS_CACHED_TOKENS
            and q.unit is not sc.Unit.SECONDS}},
        {sc.USAGE_KIND: "sts", sc.PROVIDER: "openai", sc.MODEL: "gpt-realtime",
         sc.STS_CACHED_TOKENS: 9, sc.STS_CONNECTION_SECONDS: 90},
    ]  # fmt: skip
    payloads = []
    for i, record in enumerate(records):
        mapped = map_usage(
            {**identity, **record}, ref=f"k{i}", origin="test", trace_ids=("ab" * 16, "cd" * 8)
        )
        assert not hasattr(mapped, "reason"), mapped
        payloads.append(mapped.payload)

    responses = [post(client, p, key=f"k{i}") for i, p in enumerate(payloads)]

    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    rows = sandbox.ledger.rows()
    assert [r["kind"] for r in rows] == ["stt", "tts", "sts", "sts"]
    assert rows[0]["audio_minutes"] == 27.0 / 60
    assert rows[3]["sts_tokens"] == 9 and rows[3]["sts_minutes"] == 1.5
    assert rows[0]["meta_tags"]["otel_trace_id"] == "ab" * 16


def test_paygent_sdk_sends_are_accepted(sandbox: SandboxServer) -> None:
    from paygent_sdk import Client
    from paygent_sdk.models import (
        SpeechToSpeechUsageMetadata,
        StsCachedBreakdown,
        StsInputSide,
        StsModalityUsage,
        StsOutputSide,
    )

    sdk = Client(API_KEY)
    sdk.base_url = sandbox.url
    sdk.track_stt(
        "agent-voice", "cust-a", "voice-minutes",
        {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 0.45},
    )  # fmt: skip
    sdk.track_tts(
        "agent-voice", "cust-b", "",
        {"serviceProvider": "elevenlabs", "model": "eleven_turbo_v2", "characterCount": 1200},
    )  # fmt: skip
    sdk.track_sts(
        "agent-voice", "cust-a", "realtime",
        SpeechToSpeechUsageMetadata(
            input=StsInputSide(text=StsModalityUsage(tokens=120),
                               audio=StsModalityUsage(tokens=900, minutes=0.5)),
            output=StsOutputSide(audio=StsModalityUsage(tokens=700, minutes=0.25)),
            cached=StsCachedBreakdown(text_tokens=50),
            connection_minutes=1.5,
        ),
        service_provider="openai", model="gpt-realtime",
    )  # fmt: skip

    deadline = time.monotonic() + 10
    while len(sandbox.ledger.request_log()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    log = sandbox.ledger.request_log()
    assert [e["status"] for e in log] == [200, 200, 200]
    rows = {r["kind"]: r for r in sandbox.ledger.rows()}
    assert rows["stt"]["audio_minutes"] == 0.45
    assert rows["tts"]["characters"] == 1200
    assert rows["sts"]["usage_metadata"] == STS_METADATA
    assert rows["sts"]["sts_tokens"] == 1770


# --------------------------------------------------------------------------- validation


def _with(path: str, value: Any, base: Callable[[], dict[str, Any]] = stt_body) -> Any:
    """``base()`` with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    body = base()
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return body


def _sts_with(path: str, value: Any) -> Any:
    return _with("rawUsage.usageMetadata." + path, value, sts_body)


UM = "rawUsage.usageMetadata"
INVALID_CASES = [
    ("body-array", [stt_body()], "body", "must be a JSON object, got array"),
    ("unknown-top", {**stt_body(), "extra": 1}, "body.extra", "unknown field"),
    ("missing-agent", _with("agentId", ...), "agentId", "is required"),
    ("empty-agent", _with("agentId", ""), "agentId", "non-empty string"),
    ("blank-customer", _with("customerId", "  "), "customerId", "non-empty string"),
    ("number-agent", _with("agentId", 5), "agentId", "must be a string, got integer"),
    ("null-indicator", _with("indicator", None), "indicator", "got null"),
    ("missing-indicator", _with("indicator", ...), "indicator", "is required"),
    ("raw-not-object", _with("rawUsage", "x"), "rawUsage", "must be a JSON object"),
    ("missing-plan", _with("rawUsage.plan", ...), "rawUsage.plan", "is required"),
    ("number-provider", _with("rawUsage.provider", 1), "rawUsage.provider", "must be a string"),
    ("llm-field", _with("rawUsage.inputTokens", 5), "rawUsage.inputTokens", "unknown field"),
    ("no-quantity", _with("rawUsage.audioDuration", ...), "rawUsage", "got none"),
    ("two-quantities", _with("rawUsage.characterCount", 3), "rawUsage",
     "got audioDuration and characterCount"),
    ("zero-audio", _with("rawUsage.audioDuration", 0), "rawUsage.audioDuration", "must be > 0"),
    ("negative-audio", _with("rawUsage.audioDuration", -1.5), "rawUsage.audioDuration", "> 0"),
    ("string-audio", _with("rawUsage.audioDuration", "0.5"), "rawUsage.audioDuration",
     "got string"),
    ("bool-audio", _with("rawUsage.audioDuration", True), "rawUsage.audioDuration",
     "got boolean"),
    ("float-chars", _with("rawUsage.characterCount", 12.0, tts_body), "rawUsage.characterCount",
     "must be a JSON integer, got number"),
    ("zero-chars", _with("rawUsage.characterCount", 0, tts_body), "rawUsage.characterCount",
     "must be >= 1"),
    ("huge-chars", _with("rawUsage.characterCount", 2**53, tts_body), "rawUsage.characterCount",
     "2**53-1"),
    ("metadata-array", _sts_with("input", []), f"{UM}.input", "must be a JSON object"),
    ("schema-2", _sts_with("schemaVersion", 2), f"{UM}.schemaVersion", "the integer 1"),
    ("schema-float", _sts_with("schemaVersion", 1.0), f"{UM}.schemaVersion", "the integer 1"),
    ("schema-missing", _sts_with("schemaVersion", ...), f"{UM}.schemaVersion", "is required"),
    ("input-modality", _sts_with("input.smell", {"tokens": 1}), f"{UM}.input.smell",
     "unknown field"),
    ("output-image", _sts_with("output.image", {"tokens": 1}), f"{UM}.output.image",
     "unknown field"),
    ("unknown-side", _sts_with("total", {}), f"{UM}.total", "unknown field"),
    ("negative-tokens", _sts_with("input.audio.tokens", -1), f"{UM}.input.audio.tokens", ">= 0"),
    ("float-tokens", _sts_with("input.text.tokens", 1.5), f"{UM}.input.text.tokens",
     "JSON integer"),
    ("bool-tokens", _sts_with("input.text.tokens", True), f"{UM}.input.text.tokens",
     "got boolean"),
    ("seconds-field", _sts_with("input.audio.seconds", 3), f"{UM}.input.audio.seconds",
     "unknown field"),
    ("negative-minutes", _sts_with("output.audio.minutes", -0.1), f"{UM}.output.audio.minutes",
     ">= 0"),
    ("empty-modality", _sts_with("input.text", {}), f"{UM}.input.text", "tokens"),
    ("empty-side", _sts_with("output", {}), f"{UM}.output", "must not be empty"),
    ("cached-both", _sts_with("cached", {"tokens": 3, "text": {"tokens": 1}}), f"{UM}.cached",
     "never both"),
    ("cached-minutes", _sts_with("cached.text", {"tokens": 1, "minutes": 1.0}),
     f"{UM}.cached.text.minutes", "unknown field"),
    ("connection-empty", _sts_with("connection", {}), f"{UM}.connection.minutes", "is required"),
    ("connection-tokens", _sts_with("connection.tokens", 3), f"{UM}.connection.tokens",
     "unknown field"),
    ("tags-array", _with("metaTags", ["a"]), "metaTags", "must be a JSON object"),
    ("tags-21", _with("metaTags", {f"k{i}": "v" for i in range(21)}), "metaTags",
     "at most 20 entries"),
    ("tag-key-space", _with("metaTags", {"bad key": "v"}), "metaTags.bad key", "1-64 characters"),
    ("tag-key-long", _with("metaTags", {"k" * 65: "v"}), "metaTags." + "k" * 65,
     "1-64 characters"),
    ("tag-key-newline", _with("metaTags", {"key\n": "v"}), "metaTags.key\n", "1-64 characters"),
    ("tag-value-long", _with("metaTags", {"k": "v" * 257}), "metaTags.k", "at most 256"),
    ("tag-value-number", _with("metaTags", {"k": 5}), "metaTags.k", "must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_shapes_are_refused_naming_the_field(
    shared: SandboxServer, http: httpx.Client, body: Any, field: str, rule: str
) -> None:
    response = http.post(shared.url + USAGE, json=body, headers={"paygent-api-key": API_KEY})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith(f"{field}: "), error
    assert rule in error
    assert shared.ledger.count() == 0
    assert shared.ledger.request_log()[-1]["outcome"] == "invalid"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "error"),
    [
        (b'{"agentId": NaN}', "application/json", 400, "NaN is not a JSON number"),
        (b'{"rawUsage": {"audioDuration": 1e400}}', "application/json", 400, "must be finite"),
        (b'{"agentId": ', "application/json", 400, "body: not valid JSON"),
        (b'{"agentId": "\xff"}', "application/json", 400, "body: not UTF-8"),
        (b"{}", "text/plain", 415, "content-type must be application/json"),
        (b"{}", None, 415, "content-type must be application/json, got 'none'"),
    ],
)
def test_bodies_that_are_not_json_objects_are_refused(
    shared: SandboxServer,
    http: httpx.Client,
    content: bytes,
    content_type: str | None,
    status: int,
    error: str,
) -> None:
    headers = {"paygent-api-key": API_KEY}
    if content_type:
        headers["Content-Type"] = content_type
    if b"1e400" in content:
        content = json.dumps(stt_body()).replace("0.45", "1e400").encode()

    response = http.post(shared.url + USAGE, content=content, headers=headers)

    assert response.status_code == status
    assert error in response.json()["error"]
    assert shared.ledger.count() == 0


def test_content_type_with_charset_is_accepted(
    client: httpx.Client, sandbox: SandboxServer
) -> None:
    response = client.post(
        USAGE,
        content=json.dumps(tts_body()),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 200
    assert sandbox.ledger.count() == 1


# --------------------------------------------------------------------------- auth


def test_api_key_is_required(sandbox: SandboxServer, http: httpx.Client) -> None:
    missing = http.post(sandbox.url + USAGE, json=stt_body())
    empty = http.post(sandbox.url + USAGE, json=stt_body(), headers={"paygent-api-key": ""})
    anything = http.post(sandbox.url + USAGE, json=stt_body(), headers={"paygent-api-key": "x"})

    assert (missing.status_code, empty.status_code, anything.status_code) == (401, 401, 200)
    assert missing.json() == {"error": "missing paygent-api-key header"}
    assert sandbox.ledger.count() == 1
    assert [e["outcome"] for e in sandbox.ledger.request_log()] == [
        "unauthorized",
        "unauthorized",
        "accepted",
    ]


def test_configured_api_key_refuses_others(tmp_path: Path, http: httpx.Client) -> None:
    with SandboxServer(tmp_path / "l.sqlite3", api_key="secret") as server:
        wrong = http.post(server.url + USAGE, json=stt_body(), headers={"paygent-api-key": "x"})
        right = http.post(
            server.url + USAGE, json=stt_body(), headers={"paygent-api-key": "secret"}
        )
        assert server.stats()["rejected"] == {"401": 1}

    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid paygent-api-key"}
    assert right.status_code == 200
    assert server.ledger.count() == 1


# --------------------------------------------------------------------------- idempotency


def test_repeated_idempotency_key_is_acknowledged_not_recorded(
    sandbox: SandboxServer, client: httpx.Client
) -> None:
    first, second, third = (post(client, stt_body(), key="rec-1") for _ in range(3))
    other = post(client, tts_body(), key="rec-2")
    unkeyed = [post(client, tts_body()) for _ in range(2)]

    assert [r.status_code for r in (first, second, third, other, *unkeyed)] == [200] * 6
    assert first.json() == {"id": 1, "duplicate": False}
    assert second.json() == third.json() == {"id": 1, "duplicate": True}
    assert sandbox.ledger.count() == 4
    assert sandbox.ledger.keys() == ["rec-1", "rec-2"]
    assert sandbox.ledger.duplicate_count() == 2
    assert sandbox.ledger.duplicate_count("rec-1") == 2
    assert sandbox.ledger.duplicate_count("rec-2") == 0
    assert sandbox.stats()["duplicates"] == 2


# --------------------------------------------------------------------------- faults


def test_injected_failure_sends_status_and_retry_after(tmp_path: Path, http: httpx.Client) -> None:
    with SandboxServer(tmp_path / "l.sqlite3", fail_rate=1.0, retry_after=2) as server:
        response = http.post(
            server.url + USAGE, json=stt_body(), headers={"paygent-api-key": API_KEY}
        )
        server.set_faults(fail_status=429, retry_after=None)
        throttled = http.post(
            server.url + USAGE, json=stt_body(), headers={"paygent-api-key": API_KEY}
        )
        stats = server.stats()

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert "injected failure" in response.json()["error"]
    assert throttled.status_code == 429 and "Retry-After" not in throttled.headers
    assert stats["injected_failures"] == 2 and stats["rejected"] == {"429": 1, "503": 1}
    assert server.ledger.count() == 0
    assert [(e["status"], e["outcome"]) for e in server.ledger.request_log()] == [
        (503, "injected_failure"),
        (429, "injected_failure"),
    ]


def test_latency_delays_requests_without_serializing_them(tmp_path: Path) -> None:
    with (
        SandboxServer(tmp_path / "l.sqlite3", latency_ms=300) as server,
        httpx.Client(base_url=server.url, headers={"paygent-api-key": API_KEY}) as c,
        ThreadPoolExecutor(5) as pool,
    ):
        started = time.monotonic()
        statuses = list(pool.map(lambda _: post(c, tts_body()).status_code, range(5)))
        elapsed = time.monotonic() - started

    assert statuses == [200] * 5
    assert 0.3 <= elapsed < 1.2  # serialized, five would take at least 1.5 s
    assert server.ledger.count() == 5


def test_faults_change_at_runtime_over_http(sandbox: SandboxServer, client: httpx.Client) -> None:
    changed = client.post("/_sandbox/faults", json={"reject_rate": 1.0})
    rejected = post(client, stt_body())
    bad_rate = client.post("/_sandbox/faults", json={"fail_rate": 2})
    unknown = client.post("/_sandbox/faults", json={"down": True})
    restored = client.post("/_sandbox/faults", json={"reject_rate": 0})
    accepted = post(client, stt_body())

    assert changed.status_code == 200 and changed.json()["reject_rate"] == 1.0
    assert rejected.status_code == 400
    assert rejected.json() == {"error": INJECTED_REJECTION_ERROR}
    assert bad_rate.status_code == 400 and bad_rate.json()["error"].startswith("fail_rate:")
    assert unknown.status_code == 400 and "down" in unknown.json()["error"]
    assert restored.status_code == 200 and accepted.status_code == 200
    assert client.get("/_sandbox/faults").json() == sandbox.faults.to_dict()
    stats = client.get("/_sandbox/stats").json()
    assert stats["requests"] == 2
    assert stats["accepted"] == 1 and stats["injected_rejections"] == 1
    assert stats["rejected"] == {"400": 1}
    assert sandbox.ledger.count() == 1


def test_seed_makes_fault_sequence_reproducible(
    sandbox: SandboxServer, client: httpx.Client
) -> None:
    def run() -> list[int]:
        sandbox.set_faults(fail_rate=0.5, seed=7)
        return [post(client, tts_body()).status_code for _ in range(24)]

    first, second = run(), run()

    assert first == second
    assert {200, 503} <= set(first)


def test_invalid_fault_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fail_status"):
        SandboxServer(tmp_path / "l.sqlite3", fail_status=200)
    with pytest.raises(ValueError, match="latency_ms"):
        SandboxServer(tmp_path / "l.sqlite3", latency_ms=-1)
    with pytest.raises(ValueError, match="retry_after"):
        SandboxServer(tmp_path / "l.sqlite3", retry_after=1.5)


# --------------------------------------------------------------------------- lifecycle


def test_restart_on_same_port_keeps_ledger_and_keys(tmp_path: Path, http: httpx.Client) -> None:
    server = SandboxServer(tmp_path / "l.sqlite3", latency_ms=5)
    with server, httpx.Client(headers={"paygent-api-key": API_KEY}) as c:
        url = server.url
        assert c.post(url + USAGE, json=stt_body(), headers={"Idempotency-Key": "a"}).json() == {
            "id": 1,
            "duplicate": False,
        }
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        http.post(url + USAGE, json=stt_body(), headers={"paygent-api-key": API_KEY})

    with server, httpx.Client(headers={"paygent-api-key": API_KEY}) as c:
        assert server.url == url
        assert server.faults.latency_ms == 5
        repeat = c.post(url + USAGE, json=stt_body(), headers={"Idempotency-Key": "a"})
        fresh = c.post(url + USAGE, json=tts_body(), headers={"Idempotency-Key": "b"})

    assert repeat.json() == {"id": 1, "duplicate": True}
    assert fresh.json() == {"id": 2, "duplicate": False}
    assert server.ledger.count() == 2
    assert server.ledger.duplicate_count("a") == 1


def test_health_and_customer_endpoints(sandbox: SandboxServer, client: httpx.Client) -> None:
    health = client.get("/healthz")
    customer = client.post(
        "/api/v1/customers/create-or-get", json={"name": "Acme", "externalId": "cust-a"}
    )

    assert health.status_code == 200
    assert customer.status_code == 200 and customer.json()["externalId"] == "cust-a"
    assert sandbox.ledger.count() == 0
    assert sandbox.ledger.request_log()[0]["outcome"] == "customer"


def test_subprocess_sandbox(tmp_path: Path, http: httpx.Client) -> None:
    process = SandboxProcess(tmp_path / "l.sqlite3", api_key="secret", seed=3).start()
    try:
        assert process.pid > 0
        headers = {"paygent-api-key": "secret"}
        accepted = http.post(process.url + USAGE, json=tts_body(), headers=headers)
        faults = process.set_faults(fail_rate=1.0, retry_after=1)
        failed = http.post(process.url + USAGE, json=tts_body(), headers=headers)
    finally:
        exit_status = process.stop()

    assert accepted.status_code == 200
    assert faults.fail_rate == 1.0 and faults.seed == 3
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "1"
    assert exit_status == 0  # SIGTERM is a clean shutdown
    assert process.ledger.count() == 1


# --------------------------------------------------------------------------- ledger


def test_totals_are_exact(tmp_path: Path, http: httpx.Client) -> None:
    with SandboxServer(tmp_path / "l.sqlite3") as server:
        for _ in range(10):
            http.post(
                server.url + USAGE,
                json=stt_body(audioDuration=0.1),
                headers={"paygent-api-key": API_KEY},
            )

    (total,) = server.ledger.totals(by=())
    assert total["calls"] == 10
    assert total["audio_minutes"] == math.fsum([0.1] * 10) == 1.0
    with pytest.raises(ValueError, match="cannot group by"):
        server.ledger.totals(by=("body",))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paygent-otel")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


def _fill(path: Path) -> None:
    with (
        SandboxServer(path) as server,
        httpx.Client(base_url=server.url, headers={"paygent-api-key": API_KEY}) as c,
    ):
        post(c, stt_body(), key="x")
        post(c, stt_body(), key="x")
        post(c, stt_body(audioDuration=1.2))
        post(c, tts_body())
        post(c, sts_body())


def test_ledger_command_prints_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "l.sqlite3"
    _fill(db)

    assert _cli(["ledger", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0].split() == [
        "customer", "kind", "model", "calls", "audio", "min", "chars", "sts", "tokens", "sts",
        "min",
    ]  # fmt: skip
    assert lines[2].split() == ["cust-a", "sts", "gpt-realtime", "1", "0", "0", "1770", "2.25"]
    assert lines[3].split() == ["cust-a", "stt", "nova-2", "2", "1.65", "0", "0", "0"]
    assert lines[4].split() == ["cust-b", "tts", "eleven_turbo_v2", "1", "0", "1200", "0", "0"]
    assert lines[6].split() == ["total", "4", "1.65", "1200", "1770", "2.25"]
    assert lines[-1] == "idempotent repeats acknowledged, not recorded: 1"


def test_ledger_command_json_and_grouping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "l.sqlite3"
    _fill(db)

    assert _cli(["ledger", "--db", str(db), "--by", "agent,provider", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["duplicates"] == 1
    assert [(g["agent_id"], g["provider"], g["calls"]) for g in report["groups"]] == [
        ("agent-voice", "deepgram", 2),
        ("agent-voice", "elevenlabs", 1),
        ("agent-voice", "openai", 1),
    ]
    assert report["groups"][0]["audio_minutes"] == 1.65


def test_ledger_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["ledger", "--db", str(tmp_path / "missing.sqlite3")]) == 1
    assert "no sandbox ledger" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["ledger", "--by", "customer,colour"])
    assert "customer,agent,indicator,kind,provider,model" in capsys.readouterr().err


def test_commands_have_examples_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("sandbox", "ledger"):
        with pytest.raises(SystemExit):
            _cli([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"paygent-otel {command}" in out


def test_public_surface() -> None:
    assert sandbox_pkg.__all__ == [
        "Faults",
        "Ledger",
        "LedgerWriter",
        "PayloadError",
        "SandboxApp",
        "SandboxProcess",
        "SandboxServer",
        "UsageRow",
        "validate_usage",
    ]
    assert all(getattr(sandbox_pkg, name) for name in sandbox_pkg.__all__)
    assert Ledger is sandbox_pkg.Ledger
