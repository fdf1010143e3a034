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


def _otlp_value(value: str | int | float) -> dict[str, str | float]:
    """An attribute value as OTLP/JSON spells it (64-bit ints as strings)."""
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    return {"doubleValue": value}


def _otlp_attributes(attributes: dict[str, str | int | float]) -> list[dict[str, object]]:
    return [{"key": key, "value": _otlp_value(value)} for key, value in attributes.items()]


def _otlp_span(
    trace_id: str, span_id: str, name: str, attributes: dict[str, str | int | float]
) -> dict[str, object]:
    return {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "attributes": _otlp_attributes(attributes),
    }


SPANS = {
    "resourceSpans": [
        {
            "resource": {"attributes": _otlp_attributes({"paygent.agent.id": "voice-bot"})},
            "scopeSpans": [
                {
                    "scope": {"name": "pipecat"},
                    "spans": [
                        _otlp_span(
                            "0af7651916cd43dd8448eb211c80319c",
                            "b7ad6b7169203331",
                            "tts",
                            {
                                "metrics.character_count": 12,
                                "gen_ai.provider.name": "eleven",
                                "gen_ai.request.model": "flash",
                                "paygent.customer.id": "cust_a",
                            },
                        ),
                        _otlp_span(
                            "0af7651916cd43dd8448eb211c80319d",
                            "b7ad6b7169203332",
                            "stt",
                            {
                                "metrics.audio_seconds": 3.5,
                                "gen_ai.provider.name": "dg",
                                "gen_ai.request.model": "nova",
                            },
                        ),
                        _otlp_span(
                            "0af7651916cd43dd8448eb211c80319e",
                            "b7ad6b7169203333",
                            "llm",
                            {"gen_ai.usage.input_tokens": 9, "paygent.customer.id": "cust_a"},
                        ),
                    ],
                }
            ],
        }
    ]
}
"""What a Collector writes for three Pipecat spans (OTLP/JSON)."""


def _dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``paygent-otel dry-run`` on a file of the spans above."""
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(SPANS) + "\n")
    return _dry_run_of(*args, str(path))


def _dry_run_of(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygent_otel._cli.main", "dry-run", *args],
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
    missing = _dry_run_of(str(tmp_path / "none.json"))
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
