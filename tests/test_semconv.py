"""The convention module, its generated doc table and the public surface stay in step."""

from __future__ import annotations

import re
from pathlib import Path

import paygent_otel
from paygent_otel.convention import semconv as sc
from paygent_otel.convention.semconv_doc import (
    BEGIN_MARKER,
    END_MARKER,
    attribute_docs,
    render_tables,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "semantic-conventions.md"


def test_doc_table_is_the_generated_one() -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER)
    assert text[start:end] == render_tables(), (
        "docs/semantic-conventions.md is stale: "
        "paste `python -m paygent_otel.convention.semconv_doc`"
    )


def test_every_attribute_constant_is_in_the_doc_and_documented() -> None:
    text = DOC.read_text()
    docs = attribute_docs()
    constants = {
        name: value
        for name, value in vars(sc).items()
        if name.isupper() and isinstance(value, str) and value.startswith("paygent.")
    }
    assert len(constants) >= 29
    for name, value in constants.items():
        assert value in docs, f"{name} has no docstring in semconv.py"
        if value == sc.META_PREFIX:
            assert "`paygent.meta.<key>`" in text
        else:
            assert f"`{value}`" in text, f"{value} missing from {DOC.name}"


def test_every_quantity_row_names_unit_and_json_field() -> None:
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(
            r"^\| `(paygent\.(?:stt|tts|sts)\.[a-z.]+)` \|.*$", DOC.read_text(), re.M
        )
    }
    assert set(rows) == set(sc.QUANTITIES)
    for name, q in sc.QUANTITIES.items():
        assert f"`{q.unit.value}`" in rows[name]
        assert ".".join(q.json_path) in rows[name]
        assert ("(value / 60)" in rows[name]) == (q.unit is sc.Unit.SECONDS)


def test_seconds_and_minutes_twins_share_one_json_field() -> None:
    for q in sc.QUANTITIES.values():
        if q.unit is sc.Unit.SECONDS:
            twin = sc.QUANTITIES[q.name.removesuffix(".seconds") + ".minutes"]
            assert twin.json_path == q.json_path and twin.unit is sc.Unit.MINUTES


def test_public_surface() -> None:
    assert sorted(paygent_otel.__all__) == paygent_otel.__all__
    for name in paygent_otel.__all__:
        assert getattr(paygent_otel, name) is not None
    assert {"Identity", "PaygentSpanExporter", "record_stt", "record_tts", "record_sts"} <= set(
        paygent_otel.__all__
    )
    # Only the sampler and its processor are public in sampling (the demo route is not).
    assert paygent_otel.recording.sampling.__all__ == ["UsageSampler", "UsageSpanProcessor"]
