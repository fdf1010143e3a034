"""What a framework rule is: which spans and counters it reads, and how."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.genai import (
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
)

__all__ = ["FrameworkRule", "number", "priced"]

Attributes = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class FrameworkRule:
    """One framework's mapping onto the convention."""

    name: str
    scopes: frozenset[str]
    """Instrumentation scope names of the framework's tracers and meters."""
    usage_spans: frozenset[str]
    """Span names that may carry usage; every other span of the scopes bills nothing."""
    span_record: Callable[[str, Attributes], dict[str, Any] | None]
    """Span name and attributes -> convention attributes, or None (not usage)."""
    metrics: Mapping[str, str]
    """Framework usage counter name -> convention quantity name."""
    metric_identity: Mapping[str, str]
    """Framework point attribute -> convention attribute (provider, model)."""
    attribute_prefixes: tuple[str, ...]
    """Prefixes of the span attributes the rule reads."""
    missing_customer: str
    """How a user of this framework names the customer (said when none is found)."""


def number(attributes: Attributes, name: str) -> int | float | None:
    """A numeric attribute, None when absent; ``ValueError`` naming it when not a number."""
    value = attributes.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    return value


def priced(
    record: dict[str, Any], attributes: Attributes, provider: object, model: object
) -> dict[str, Any]:
    """Add ``paygent.provider``/``paygent.model`` unless the span already sets them.

    ``provider``/``model`` are the framework's own values; the GenAI attributes
    (``gen_ai.provider.name``, ``gen_ai.response.model``, ``gen_ai.request.model``) are used
    when they are missing or blank.
    """
    if sc.PROVIDER not in attributes:
        for value in (provider, attributes.get(GEN_AI_PROVIDER_NAME)):
            if isinstance(value, str) and value.strip():
                record[sc.PROVIDER] = value
                break
    if sc.MODEL not in attributes:
        for value in (
            model,
            attributes.get(GEN_AI_RESPONSE_MODEL),
            attributes.get(GEN_AI_REQUEST_MODEL),
        ):
            if isinstance(value, str) and value.strip() and value != "unknown":
                record[sc.MODEL] = value
                break
    return record
