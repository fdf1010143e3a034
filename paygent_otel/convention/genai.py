"""Bill spans of existing GenAI instrumentations as speech-to-speech records (opt-in).

Instrumentations of OpenAI Realtime, LiveKit and other GenAI clients already put token
counts on their spans with the OpenTelemetry GenAI semantic conventions
(``gen_ai.usage.*``). With ``genai=True`` (``OTEL_EXPORTER_PAYGENT_GENAI=true``) the span
exporter turns such a span into one STS record when a customer id is known for it (on the
span, for example copied from baggage, on the resource, or the exporter default), so that
usage is billed without adding any attribute. A span that carries a record of the Paygent
convention (attributes or ``paygent.usage`` events) is billed from the convention only.

The counts map as ``paygent-sdk``'s OpenAI Realtime mapping
(``speech_to_speech_metadata_from_openai_realtime_usage``) maps the same usage:

- per-modality input counts (``gen_ai.usage.{text,audio,image}.input_tokens``) are sent as
  given, and what no modality claims of the total is text when no text count is given;
  without any, the whole input total minus the cached tokens is text;
- cached tokens are sent per modality (``gen_ai.usage.{m}.cache_read.input_tokens``) when
  split, else as one undivided count (``gen_ai.usage.cache_read.input_tokens``);
- per-modality output counts are sent as given (the rest of the total as text when no text
  count is given); without any, the output total is text.

A subset is never added on top of its total: totals only check their parts, and parts
that add up to more than their total make the span invalid (rejected with the attribute
names and values) rather than guessed at. Older attribute spellings
(``gen_ai.usage.prompt_tokens``, ``gen_ai.usage.input_audio_tokens``, ...) are read only
for a count whose current name is absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from paygent_otel.convention import semconv as sc

__all__ = [
    "GENAI_COUNT_ATTRIBUTES",
    "GEN_AI_PROVIDER_NAME",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_SYSTEM",
    "genai_record",
    "has_genai_usage",
]

GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
"""The GenAI provider (``openai``, ...); becomes ``paygent.provider``."""
GEN_AI_SYSTEM: Final = "gen_ai.system"
"""Deprecated name of :data:`GEN_AI_PROVIDER_NAME`, read when that is absent."""
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
"""The model that answered; becomes ``paygent.model``."""
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
"""The model asked for; becomes ``paygent.model`` when the response model is absent."""

_PREFIX = "gen_ai.usage."
_MODALITIES = ("text", "audio", "image")

# Each count: its current name first, then older spellings still emitted in the wild
# (LiveKit, Langfuse-style and pre-1.30 instrumentations), read only when it is absent.
_INPUT = (f"{_PREFIX}input_tokens", f"{_PREFIX}prompt_tokens")
_OUTPUT = (f"{_PREFIX}output_tokens", f"{_PREFIX}completion_tokens")
_CACHED = (
    f"{_PREFIX}cache_read.input_tokens",
    f"{_PREFIX}cache_read_input_tokens",
    f"{_PREFIX}input_cached_tokens",
)
_INPUT_BY = {m: (f"{_PREFIX}{m}.input_tokens", f"{_PREFIX}input_{m}_tokens") for m in _MODALITIES}
_OUTPUT_BY = {
    m: (f"{_PREFIX}{m}.output_tokens", f"{_PREFIX}output_{m}_tokens") for m in _MODALITIES
}
_CACHED_BY = {m: (f"{_PREFIX}{m}.cache_read.input_tokens",) for m in _MODALITIES}

GENAI_COUNT_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    name
    for names in (
        _INPUT,
        _OUTPUT,
        _CACHED,
        *_INPUT_BY.values(),
        *_OUTPUT_BY.values(),
        *_CACHED_BY.values(),
    )
    for name in names
)
"""Every ``gen_ai.usage.*`` attribute the mapping reads (current names and older ones)."""

_STS_INPUT = {
    "text": sc.STS_INPUT_TEXT_TOKENS,
    "audio": sc.STS_INPUT_AUDIO_TOKENS,
    "image": sc.STS_INPUT_IMAGE_TOKENS,
}
_STS_OUTPUT = {"text": sc.STS_OUTPUT_TEXT_TOKENS, "audio": sc.STS_OUTPUT_AUDIO_TOKENS}
_STS_CACHED = {
    "text": sc.STS_CACHED_TEXT_TOKENS,
    "audio": sc.STS_CACHED_AUDIO_TOKENS,
    "image": sc.STS_CACHED_IMAGE_TOKENS,
}

Attributes = Mapping[str, Any]
_Count = tuple[str, int]
"""A count read from a span: the attribute it came from, and its value."""


def has_genai_usage(attributes: Attributes) -> bool:
    """Cheap test: does the span carry any ``gen_ai.usage.*`` token count the mapping reads?"""
    return any(name in attributes for name in GENAI_COUNT_ATTRIBUTES)


def _count(attributes: Attributes, names: Sequence[str]) -> _Count | None:
    """The first of ``names`` present (the current spelling first), validated."""
    for name in names:
        if name in attributes:
            value = attributes[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"{name} must be a whole number of tokens, got {type(value).__name__} "
                    f"{value!r:.40}"
                )
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{name} must be a whole number of tokens, got {value}")
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
            return name, int(value)
    return None


def _check_parts(total: _Count | None, parts: Sequence[_Count | None]) -> None:
    """Parts of a total must not add up to more than it: never guess which one is wrong."""
    given = [part for part in parts if part is not None]
    if total is None or not given:
        return
    added = sum(value for _, value in given)
    if added > total[1]:
        names = " + ".join(f"{name} ({value})" for name, value in given)
        raise ValueError(
            f"{names} = {added} exceeds its total {total[0]} ({total[1]}): the parts of a "
            "total cannot add up to more than it (inconsistent counts, nothing billed)"
        )


def _value(count: _Count | None) -> int:
    return 0 if count is None else count[1]


def _text(attributes: Attributes, names: Sequence[str]) -> str | None:
    for name in names:
        value = attributes.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        if value.strip():
            return value
    return None


def genai_record(attributes: Attributes) -> dict[str, Any] | None:
    """The convention attributes of the STS record a GenAI span stands for, or None.

    None when the span carries no token count. The result holds ``paygent.usage.kind``
    (``sts``), the ``paygent.sts.*`` token counts and, unless the span already sets them,
    ``paygent.provider`` (``gen_ai.provider.name``, else ``gen_ai.system``) and
    ``paygent.model`` (``gen_ai.response.model``, else ``gen_ai.request.model``).
    Raises ``ValueError`` naming the attributes when the counts are not whole non-negative
    numbers or when parts exceed their total.
    """
    counts = _Counts.read(attributes)
    quantities = {**counts.inputs(), **counts.outputs(), **counts.cached_quantities()}
    if not quantities:
        return None
    record: dict[str, Any] = {sc.USAGE_KIND: sc.UsageKind.STS.value, **quantities}
    for attribute, names in (
        (sc.PROVIDER, (GEN_AI_PROVIDER_NAME, GEN_AI_SYSTEM)),
        (sc.MODEL, (GEN_AI_RESPONSE_MODEL, GEN_AI_REQUEST_MODEL)),
    ):
        if attribute not in attributes:
            value = _text(attributes, names)
            if value is not None:
                record[attribute] = value
    return record


@dataclass(frozen=True, slots=True)
class _Counts:
    """The token counts of one GenAI span: totals and per-modality parts, validated."""

    total_in: _Count | None
    total_out: _Count | None
    cached_total: _Count | None
    input_by: dict[str, _Count | None]
    output_by: dict[str, _Count | None]
    cached_by: dict[str, _Count | None]

    @classmethod
    def read(cls, attributes: Attributes) -> _Counts:
        """Read and check the counts; ``ValueError`` names what is inconsistent."""
        counts = cls(
            _count(attributes, _INPUT),
            _count(attributes, _OUTPUT),
            _count(attributes, _CACHED),
            {m: _count(attributes, names) for m, names in _INPUT_BY.items()},
            {m: _count(attributes, names) for m, names in _OUTPUT_BY.items()},
            {m: _count(attributes, names) for m, names in _CACHED_BY.items()},
        )
        counts._check()
        return counts

    def _check(self) -> None:
        inputs, cached = self.input_by, self.cached_by
        _check_parts(self.total_in, list(inputs.values()))
        _check_parts(self.total_out, list(self.output_by.values()))
        _check_parts(self.cached_total, list(cached.values()))
        _check_parts(self.total_in, [self.cached_total])
        _check_parts(self.total_in, list(cached.values()))
        for m in _MODALITIES:
            _check_parts(inputs[m], [cached[m]])
        image_out = self.output_by["image"]
        if image_out is not None and image_out[1]:
            raise ValueError(
                f"{image_out[0]} ({image_out[1]}): Paygent's speech-to-speech record has no "
                "output image quantity, so this usage cannot be billed"
            )

    def inputs(self) -> dict[str, int]:
        """The input quantities: the modality split, else the uncached total as text."""
        inputs, total_in = self.input_by, self.total_in
        if any(_value(c) for c in inputs.values()):
            quantities = {_STS_INPUT[m]: c[1] for m, c in inputs.items() if c is not None}
            if inputs["text"] is None and total_in is not None:
                # Modality counts are subsets of the total: what no modality claims is text
                # (a span that gives only its audio subset must not under-bill its text).
                quantities[_STS_INPUT["text"]] = total_in[1] - _sum(inputs)
            return quantities
        if total_in is None:
            return {}
        # Without a split the SDK bills the uncached input as text and the cache apart.
        cached = _sum(self.cached_by) if self.cached_total is None else self.cached_total[1]
        return {sc.STS_INPUT_TEXT_TOKENS: total_in[1] - cached}

    def outputs(self) -> dict[str, int]:
        """The output quantities: the modality split, else the total as text."""
        outputs, total_out = self.output_by, self.total_out
        if any(_value(c) for c in outputs.values()):
            quantities = {
                _STS_OUTPUT[m]: c[1]
                for m, c in outputs.items()
                if c is not None and m in _STS_OUTPUT
            }
            if outputs["text"] is None and total_out is not None:
                quantities[_STS_OUTPUT["text"]] = total_out[1] - _sum(outputs)
            return quantities
        # An output total alone is billed as text: every realtime model answers in text
        # or text+audio, and dropping it (as the SDK does) would bill nothing for it.
        return {} if total_out is None else {sc.STS_OUTPUT_TEXT_TOKENS: total_out[1]}

    def cached_quantities(self) -> dict[str, int]:
        """The cached counts per modality when split, else the undivided count."""
        if _sum(self.cached_by):
            return {_STS_CACHED[m]: c[1] for m, c in self.cached_by.items() if c is not None}
        if self.cached_total is None:
            return {}
        return {sc.STS_CACHED_TOKENS: self.cached_total[1]}


def _sum(counts: Mapping[str, _Count | None]) -> int:
    return sum(_value(c) for c in counts.values())
