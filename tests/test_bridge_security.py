"""Attacks on the OTLP receiver, each answered with the right status and a clear message.

Every error answer must be a ``google.rpc.Status`` in the request's encoding (a Collector
that cannot decode the answer logs an error and drops the data), and must leave the ledger
and the spool untouched.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import partially_rejected
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paygent_otel._cli.main import main
from paygent_otel.bridge import (
    TRACES_PATH,
    BearerAuth,
    BridgeServer,
    Limits,
    TokenError,
    is_loopback,
)
from paygent_otel.convention import semconv as sc
from paygent_otel.delivery.spool import SqliteSpool
from paygent_otel.sandbox import SandboxServer

PB = {"Content-Type": "application/x-protobuf"}
TEAM_TOKEN = "team-voice-0123456789abcdef"
GATEWAY_TOKEN = "gateway-fedcba9876543210"


def usage(agent: str | None = "agent-voice", customer: str = "cust-1") -> dict[str, Any]:
    attributes: dict[str, Any] = {
        sc.USAGE_KIND: "tts",
        sc.TTS_CHARACTERS: 100,
        sc.CUSTOMER_ID: customer,
        sc.PROVIDER: "el",
        sc.MODEL: "m1",
    }
    if agent is not None:
        attributes[sc.AGENT_ID] = agent
    return attributes


def spans(*records: dict[str, Any], resource: dict[str, Any] | None = None) -> bytes:
    """One span per record, from a real TracerProvider through the SDK's OTLP encoder."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource or {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    for attributes in records:
        with tracer.start_as_current_span("usage", attributes=attributes):
            pass
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


def refused(response: httpx.Response, status: int) -> str:
    """Assert an error answer in protobuf; return its message."""
    assert response.status_code == status, response.content
    assert response.headers["content-type"] == "application/x-protobuf"
    return str(status_pb2.Status.FromString(response.content).message)


def nothing_stored(server: BridgeServer, sandbox: SandboxServer) -> None:
    assert server.app.pipeline.force_flush(5.0)
    assert sandbox.ledger.count() == 0
    spool = server.app.pipeline.spool
    assert isinstance(spool, SqliteSpool)
    assert spool.dead_letters() == []


# --------------------------------------------------------------------------- binding


def test_listening_beyond_loopback_needs_a_token(tmp_path, capsys) -> None:
    spool = str(tmp_path / "spool.sqlite3")
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--spool", spool]) == 2
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without a bearer token" in error
    assert "--token-file" in error
    assert not Path(spool).exists()  # refused before anything was opened
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert (
        not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("bridge.internal")
    )


def test_bad_tokens_stop_the_start(tmp_path, capsys) -> None:
    spool = str(tmp_path / "spool.sqlite3")
    assert main(["serve", "--port", "0", "--spool", spool, "--token", "short"]) == 2
    assert "shorter than 16 characters" in capsys.readouterr().err
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# teams\n{TEAM_TOKEN}=\n")
    assert main(["serve", "--port", "0", "--spool", spool, "--token-file", str(token_file)]) == 2
    assert "line 2: `=` must be followed by at least one agent id" in capsys.readouterr().err
    with pytest.raises(TokenError, match="same token is configured twice"):
        BearerAuth.parse([TEAM_TOKEN, f"{TEAM_TOKEN}=a"], "test")


def test_a_readable_token_file_is_flagged(tmp_path, caplog) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{GATEWAY_TOKEN}\n")
    os.chmod(token_file, stat.S_IRUSR | stat.S_IWUSR | stat.S_IROTH)
    assert BearerAuth.from_file(token_file).required
    assert "readable by other users" in caplog.text


# --------------------------------------------------------------------------- tokens


def test_missing_or_wrong_bearer_token_is_401(bridge, sandbox) -> None:
    auth = BearerAuth.parse([GATEWAY_TOKEN], "test")
    server = bridge(auth=auth)
    body = spans(usage())
    url = server.url + TRACES_PATH
    wrong = [
        {},
        {"Authorization": "Bearer " + GATEWAY_TOKEN[:-1] + "x"},
        {"Authorization": "Basic " + GATEWAY_TOKEN},
        {"Authorization": "Bearer"},
    ]
    for headers in wrong:
        response = httpx.post(url, content=body, headers={**PB, **headers})
        assert "missing or invalid bearer token" in refused(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    json_answer = httpx.post(url, content=b"{}", headers={"Content-Type": "application/json"})
    assert json_answer.status_code == 401 and "bearer token" in json_answer.json()["message"]
    nothing_stored(server, sandbox)
    ok = httpx.post(url, content=body, headers={**PB, "Authorization": f"bearer {GATEWAY_TOKEN}"})
    assert ok.status_code == 200
    assert server.app.pipeline.force_flush(5.0)
    assert sandbox.ledger.count() == 1


def test_a_token_limited_to_agents_cannot_bill_for_another(bridge, sandbox) -> None:
    auth = BearerAuth.parse([f"{TEAM_TOKEN}=agent-voice,agent-sales", GATEWAY_TOKEN], "test")
    server = bridge(auth=auth)
    body = spans(
        usage("agent-voice"),
        usage("agent-billing"),  # another team's agent
        usage(None),  # inherits the resource's agent
        resource={sc.AGENT_ID: "agent-sales"},
    )
    headers = {**PB, "Authorization": f"Bearer {TEAM_TOKEN}"}
    response = httpx.post(server.url + TRACES_PATH, content=body, headers=headers)
    partially_rejected(
        response, 1, "paygent.agent.id 'agent-billing' is not allowed for this bearer token"
    )
    assert server.app.pipeline.force_flush(5.0)
    assert sorted(r["agent_id"] for r in sandbox.ledger.rows()) == ["agent-sales", "agent-voice"]
    spool = server.app.pipeline.spool
    assert isinstance(spool, SqliteSpool)
    [dead] = spool.dead_letters(status="invalid")
    assert '"agentId":"agent-billing"' in dead.body
    # The unrestricted gateway token may bill any agent.
    gateway = {**PB, "Authorization": f"Bearer {GATEWAY_TOKEN}"}
    body = spans(usage("agent-billing", customer="cust-2"))
    assert httpx.post(server.url + TRACES_PATH, content=body, headers=gateway).status_code == 200


# --------------------------------------------------------------------------- sizes


def test_oversized_body_is_413(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_request_bytes=4096))
    body = spans(*[usage(customer=f"cust-{i}") for i in range(40)])
    assert len(body) > 4096
    message = refused(httpx.post(server.url + TRACES_PATH, content=body, headers=PB), 413)
    assert "exceeds the limit of 4096 bytes (--max-request-bytes)" in message
    # Without Content-Length (chunked), the limit holds while reading.
    chunked = httpx.post(
        server.url + TRACES_PATH, content=iter([body[:3000], body[3000:]]), headers=PB
    )
    assert "exceeds the limit of 4096 bytes" in refused(chunked, 413)
    nothing_stored(server, sandbox)


def test_gzip_bomb_is_413_without_inflating_it(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_decompressed_bytes=1 << 20))
    bomb = gzip.compress(spans(usage()) + b"\0" * (64 << 20), compresslevel=9)
    assert len(bomb) < 100_000  # 64 MiB of zeros, under 100 KB on the wire
    response = httpx.post(
        server.url + TRACES_PATH, content=bomb, headers={**PB, "Content-Encoding": "gzip"}
    )
    assert "decompressed body exceeds the limit of 1048576 bytes" in refused(response, 413)
    nothing_stored(server, sandbox)


def test_too_many_records_in_one_request_is_413(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_items=10))
    body = spans(*[usage(customer=f"cust-{i}") for i in range(11)])
    message = refused(httpx.post(server.url + TRACES_PATH, content=body, headers=PB), 413)
    assert "11 spans in one request exceed the limit of 10 (--max-items)" in message
    nothing_stored(server, sandbox)


def test_over_long_usage_attributes_reject_the_record(bridge, sandbox) -> None:
    server = bridge(limits=Limits(max_attribute_length=256))
    body = spans(usage(customer="c" * 100_000), resource={sc.AGENT_ID: "agent-voice"})
    response = httpx.post(server.url + TRACES_PATH, content=body, headers=PB)
    partially_rejected(
        response, 1, "paygent.customer.id is 100000 characters long, over the limit of 256"
    )
    assert server.app.pipeline.force_flush(5.0)
    assert sandbox.ledger.count() == 0
    spool = server.app.pipeline.spool
    assert isinstance(spool, SqliteSpool)
    [dead] = spool.dead_letters(status="invalid")
    assert len(dead.body) < 2000  # the dead letter keeps a clipped copy


# --------------------------------------------------------------------------- malformed input


PB_TYPE, JSON_TYPE = "application/x-protobuf", "application/json"
DEEP_VALUE = (
    b'{"resourceSpans": [{"resource": {"attributes": [{"key": "k", "value": '
    + b'{"arrayValue": {"values": [' * 200
    + b"{}"
    + b"]}}" * 200
    + b"}]}}]}"
)


def nested_protobuf(depth: int) -> bytes:
    request = ExportTraceServiceRequest()
    value = request.resource_spans.add().resource.attributes.add(key="k").value
    for _ in range(depth):
        value = value.array_value.values.add()
    return request.SerializeToString()


BAD_ID = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}'
MALFORMED = [
    (PB_TYPE, "", b"\xff\xff\xff\xff", 400, "not an OTLP protobuf traces request"),
    (JSON_TYPE, "", b"{not json", 400, "not valid JSON"),
    (JSON_TYPE, "", b'{"resourceSpans": 5}', 400, "not an OTLP/JSON traces request"),
    (JSON_TYPE, "", BAD_ID, 400, "traceId 'zz' is not a hex string"),
    (JSON_TYPE, "", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (JSON_TYPE, "", DEEP_VALUE, 400, "not an OTLP/JSON traces request"),
    (PB_TYPE, "", nested_protobuf(300), 400, "not an OTLP protobuf traces request"),
    (PB_TYPE, "gzip", gzip.compress(b"x" * 1000)[:20], 400, "truncated"),
    (PB_TYPE, "gzip", b"not gzip at all", 400, "not valid gzip"),
    (PB_TYPE, "br", b"", 415, "Content-Encoding 'br' is not supported"),
    ("text/plain", "", b"hello", 415, "Content-Type 'text/plain' is not supported"),
]


@pytest.mark.parametrize(("content_type", "encoding", "body", "status", "expected"), MALFORMED)
def test_malformed_requests_are_refused_with_a_reason(
    bridge, sandbox, content_type, encoding, body, status, expected
) -> None:
    server = bridge()
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    response = httpx.post(server.url + TRACES_PATH, content=body, headers=headers)
    assert response.status_code == status
    if content_type == JSON_TYPE:
        message = response.json()["message"]
    else:
        message = refused(response, status)
    assert expected in message
    nothing_stored(server, sandbox)
