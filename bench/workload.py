"""The usage workload every row records, in the shapes the compared clients take.

One deterministic list of STT, TTS and STS records (cycling through the kinds, over 50
customers), with exact expected totals for the ledger check. The same record is given to
the SDK as ``track_*`` arguments, to the bridge as recording-helper arguments or as
convention attributes for ``span.set_attributes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from paygent_otel.convention import semconv as sc
from paygent_otel.sandbox import Ledger

AGENT = "bench-agent"
KINDS = ("stt", "tts", "sts")
_PROVIDERS = {
    "stt": ("deepgram", "nova-2"),
    "tts": ("elevenlabs", "eleven_multilingual_v2"),
    "sts": ("openai", "gpt-4o-realtime-preview"),
}


@dataclass(frozen=True, slots=True)
class Record:
    """One usage record of the workload."""

    seq: int
    kind: str
    customer: str
    indicator: str
    provider: str
    model: str
    minutes: float = 0.0
    """STT audio minutes."""
    characters: int = 0
    """TTS characters."""
    sts: dict[str, Any] | None = None
    """STS ``usageMetadata`` in the API shape (what ``track_sts`` takes)."""


def record(seq: int) -> Record:
    """The ``seq``-th record of the workload (deterministic)."""
    kind = KINDS[seq % 3]
    provider, model = _PROVIDERS[kind]
    base = Record(
        seq=seq,
        kind=kind,
        customer=f"cust_{seq % 50:02d}",
        indicator=f"bench-{kind}",
        provider=provider,
        model=model,
    )
    if kind == "stt":
        return _replace(base, minutes=round(0.01 * (1 + seq % 97), 2))
    if kind == "tts":
        return _replace(base, characters=100 + seq % 1000)
    return _replace(
        base,
        sts={
            "schemaVersion": 1,
            "input": {"text": {"tokens": 50 + seq % 200}, "audio": {"tokens": 400 + seq % 900}},
            "output": {"audio": {"tokens": 600 + seq % 1100}},
            "cached": {"text": {"tokens": 10 + seq % 40}},
            "connection": {"minutes": round(0.5 + (seq % 11) / 10, 1)},
        },
    )


def _replace(base: Record, **changes: Any) -> Record:
    from dataclasses import replace

    return replace(base, **changes)


def records(n: int, start: int = 0) -> list[Record]:
    """Records ``start .. start + n - 1``."""
    return [record(i) for i in range(start, start + n)]


# ---------------------------------------------------------------------------- the three shapes


def sdk_call(client: Any, r: Record) -> Callable[[], object]:
    """A zero-argument call of ``client.track_*`` for ``r`` (arguments built beforehand)."""
    if r.kind == "stt":
        data = {"serviceProvider": r.provider, "model": r.model, "audioDuration": r.minutes}
        return lambda: client.track_stt(AGENT, r.customer, r.indicator, data)
    if r.kind == "tts":
        data = {"serviceProvider": r.provider, "model": r.model, "characterCount": r.characters}
        return lambda: client.track_tts(AGENT, r.customer, r.indicator, data)
    return lambda: client.track_sts(
        AGENT, r.customer, r.indicator, r.sts, service_provider=r.provider, model=r.model
    )


def helper_call(r: Record) -> Callable[[], object]:
    """A zero-argument call of ``record_stt``/``record_tts``/``record_sts`` on the current span."""
    from paygent_otel import record_sts, record_stt, record_tts

    if r.kind == "stt":
        data = {"serviceProvider": r.provider, "model": r.model, "audioDuration": r.minutes}
        return lambda: record_stt(AGENT, r.customer, r.indicator, data)
    if r.kind == "tts":
        data = {"serviceProvider": r.provider, "model": r.model, "characterCount": r.characters}
        return lambda: record_tts(AGENT, r.customer, r.indicator, data)
    return lambda: record_sts(
        AGENT, r.customer, r.indicator, r.sts, service_provider=r.provider, model=r.model
    )


def attributes(r: Record) -> dict[str, Any]:
    """The record as convention attributes (what ``span.set_attributes`` is given)."""
    attrs: dict[str, Any] = {
        sc.USAGE_KIND: r.kind,
        sc.AGENT_ID: AGENT,
        sc.CUSTOMER_ID: r.customer,
        sc.INDICATOR: r.indicator,
        sc.PROVIDER: r.provider,
        sc.MODEL: r.model,
    }
    if r.kind == "stt":
        attrs[sc.STT_AUDIO_MINUTES] = r.minutes
    elif r.kind == "tts":
        attrs[sc.TTS_CHARACTERS] = r.characters
    else:
        attrs.update(sts_attributes(r))
    return attrs


def sts_attributes(r: Record) -> dict[str, Any]:
    """The STS record's quantities as convention attributes."""
    assert r.sts is not None
    return {
        sc.STS_INPUT_TEXT_TOKENS: r.sts["input"]["text"]["tokens"],
        sc.STS_INPUT_AUDIO_TOKENS: r.sts["input"]["audio"]["tokens"],
        sc.STS_OUTPUT_AUDIO_TOKENS: r.sts["output"]["audio"]["tokens"],
        sc.STS_CACHED_TEXT_TOKENS: r.sts["cached"]["text"]["tokens"],
        sc.STS_CONNECTION_MINUTES: r.sts["connection"]["minutes"],
    }


# ---------------------------------------------------------------------------- the ledger check


def expected_totals(rs: Sequence[Record]) -> dict[tuple[str, str], dict[str, float | int]]:
    """What the ledger must hold per (customer, kind): the columns of ``Ledger.totals``."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in rs:
        groups.setdefault((r.customer, r.kind), []).append(r)
    return {
        key: {
            "calls": len(mine),
            "audio_minutes": math.fsum(r.minutes for r in mine),
            "characters": sum(r.characters for r in mine),
            "sts_tokens": sum(int(sum(_walk(r.sts, "tokens"))) for r in mine),
            "sts_minutes": math.fsum(x for r in mine for x in _walk(r.sts, "minutes")),
        }
        for key, mine in groups.items()
    }


def _walk(node: Any, field: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == field and not isinstance(value, dict):
                yield value
            else:
                yield from _walk(value, field)


def verify(ledger: Ledger, rs: Sequence[Record]) -> list[str]:
    """Problems with the ledger against the workload; empty when every record arrived once.

    The SDK sends no key and takes no tag that could name a record, so the check is on
    totals: calls, audio minutes, characters, STS tokens and minutes per (customer, kind).
    """
    return compare_totals(ledger, expected_totals(rs))


def compare_totals(
    ledger: Ledger, want: dict[tuple[str, str], dict[str, float | int]]
) -> list[str]:
    """Ledger totals per (customer, kind) against ``want``: counts exact, minutes to 1e-9."""
    got = {(t["customer_id"], t["kind"]): t for t in ledger.totals(by=("customer_id", "kind"))}
    problems = [f"unexpected records for {key}" for key in got.keys() - want.keys()]
    for key, totals in sorted(want.items()):
        have = got.get(key, {})
        for name, value in totals.items():
            exact = name != "audio_minutes" and name != "sts_minutes"
            ok = (
                have.get(name, 0) == value
                if exact
                else math.isclose(have.get(name, 0), value, rel_tol=1e-9)
            )
            if not ok:
                problems.append(f"{key} {name}: ledger {have.get(name, 0)}, expected {value}")
    return problems
