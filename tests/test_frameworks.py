"""The frameworks setting and the dry run, without the frameworks installed.

The frameworks themselves are driven in tests/frameworks (``make test-frameworks``); here
the OTLP/JSON a Collector would write stands for their spans.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from paygent_otel import PaygentSpanExporter

SPANS = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [{"key": "paygent.agent.id", "value": {"stringValue": "voice-bot"}}]
            },
            "scopeSpans": [
                {
                    "scope": {"name": "pipecat"},
                    "spans": [
                        {
                            "traceId": "0af7651916cd43dd8448eb211c80319c",
                            "spanId": "b7ad6b7169203331",
                            "name": "tts",
                            "attributes": [
                                {"key": "metrics.character_count", "value": {"intValue": "12"}},
                                {"key": "gen_ai.provider.name", "value": {"stringValue": "eleven"}},
                                {"key": "gen_ai.request.model", "value": {"stringValue": "flash"}},
                                {"key": "paygent.customer.id", "value": {"stringValue": "cust_a"}},
                            ],
                        },
                        {
                            "traceId": "0af7651916cd43dd8448eb211c80319d",
                            "spanId": "b7ad6b7169203332",
                            "name": "stt",
                            "attributes": [
                                {"key": "metrics.audio_seconds", "value": {"doubleValue": 3.5}},
                                {"key": "gen_ai.provider.name", "value": {"stringValue": "dg"}},
                                {"key": "gen_ai.request.model", "value": {"stringValue": "nova"}},
                            ],
                        },
                        {
                            "traceId": "0af7651916cd43dd8448eb211c80319e",
                            "spanId": "b7ad6b7169203333",
                            "name": "llm",
                            "attributes": [
                                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "9"}},
                                {"key": "paygent.customer.id", "value": {"stringValue": "cust_a"}},
                            ],
                        },
                    ],
                }
            ],
        }
    ]
}


def _dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``paygent-otel dry-run`` on a file of the spans above."""
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(SPANS) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "paygent_otel.cli", "dry-run", *args, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dry_run_prints_what_would_be_billed_and_refused(tmp_path: Path) -> None:
    done = _dry_run(tmp_path, "--frameworks", "pipecat:voice", "--genai")
    assert done.returncode == 1, done.stderr
    assert "BILL   customer=cust_a agent=voice-bot indicator='voice' eleven/flash" in done.stdout
    assert '{"characterCount": 12}' in done.stdout
    assert "REFUSE " in done.stdout and "never named a customer" in done.stdout
    assert "1 records would be billed, 1 refused" in done.stdout  # the llm span bills nothing


def test_dry_run_without_the_framework_bills_nothing_and_bad_input_exits_2(
    tmp_path: Path,
) -> None:
    done = _dry_run(tmp_path)
    assert done.returncode == 0
    assert "0 records would be billed, 0 refused" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "paygent_otel.frameworks.dry_run", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert "cannot read the input" in missing.stderr and "none.json" in missing.stderr


def test_an_unknown_framework_is_logged_and_the_others_still_apply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PAYGENT_FRAMEWORKS", "pipecat, vocode ,livekit:voice")
    caplog.set_level(logging.ERROR, "paygent_otel.frameworks")
    from_env = PaygentSpanExporter(spool_path=":memory:")
    argument = PaygentSpanExporter(spool_path=":memory:", frameworks=())  # beats the env
    try:
        assert from_env._frameworks.names == ("pipecat", "livekit")
        assert from_env._frameworks.indicators == (("livekit", "voice"),)
        assert "unknown framework 'vocode'" in caplog.text
        assert argument._frameworks.names == ()
    finally:
        from_env.shutdown()
        argument.shutdown()
