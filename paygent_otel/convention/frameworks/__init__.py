"""Bill the speech usage voice-agent frameworks already record on OpenTelemetry (opt-in).

Pipecat (``pipecat-ai``) and LiveKit Agents (``livekit-agents``) put TTS characters, STT
audio seconds and realtime token counts on their own spans and metrics. With
``frameworks=("pipecat", "livekit")`` (``OTEL_EXPORTER_PAYGENT_FRAMEWORKS=pipecat,livekit``)
the span exporter, the metric exporter and the bridge turn them into the same usage records
the Paygent convention produces, through the one mapping (:func:`paygent_otel.map_usage`).

A framework's spans are recognised by their instrumentation scope (``pipecat`` and
``livekit-agents``); every span of that scope is *claimed* by the framework rule, which
alone decides what is usage, so the GenAI mapping never bills it a second time and the
cascaded ``llm`` spans are never speech usage. A span that carries a record of the Paygent
convention (``record_*`` wrote onto it) is billed from the convention only.

Each entry may name an indicator default for that framework's records:
``pipecat:voice-agent`` (it beats the exporter's ``indicator`` default, never an indicator
set on the span, its conversation or the resource). See ``docs/frameworks.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from paygent_otel.convention import semconv as sc
from paygent_otel.convention.frameworks import livekit, pipecat
from paygent_otel.convention.frameworks.rules import FrameworkRule

__all__ = [
    "FRAMEWORKS",
    "Claim",
    "FrameworkMetric",
    "FrameworkSet",
    "parse_frameworks",
]

_logger = logging.getLogger("paygent_otel.frameworks")

FRAMEWORKS: Final[Mapping[str, FrameworkRule]] = {
    pipecat.RULE.name: pipecat.RULE,
    livekit.RULE.name: livekit.RULE,
}
"""The frameworks that can be enabled, by the name the setting uses."""

Attributes = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Claim:
    """A span of an enabled framework: its rule decides what (if anything) it bills."""

    rule: FrameworkRule
    indicator: str | None
    """The framework's indicator default (None: the exporter's)."""

    def record(self, name: str, attributes: Attributes) -> dict[str, Any] | None:
        """The convention attributes the span stands for, or None when it is not usage.

        Raises ``ValueError`` naming the attributes when the framework's values are unusable.
        """
        return self.rule.span_record(name, attributes)


@dataclass(frozen=True, slots=True)
class FrameworkMetric:
    """A framework's own usage counter, billed as the convention quantity it measures."""

    rule: FrameworkRule
    quantity: str
    """The convention quantity (and usage instrument) name, e.g. ``paygent.stt.audio.seconds``."""
    indicator: str | None

    def attributes(self, attributes: Attributes) -> dict[str, Any]:
        """A point's attributes with the framework's provider/model renamed to the
        convention's (one the point already names in the convention wins), and the
        framework's indicator default added when the point names no indicator."""
        translated = dict(attributes)
        for source, target in self.rule.metric_identity.items():
            if source in translated and target not in translated:
                translated[target] = translated.pop(source)
        if self.indicator is not None:
            translated.setdefault(sc.INDICATOR, self.indicator)
        return translated


@dataclass(frozen=True, slots=True)
class FrameworkSet:
    """The enabled frameworks and their indicator defaults."""

    rules: tuple[FrameworkRule, ...] = ()
    indicators: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    def indicator(self, rule: FrameworkRule) -> str | None:
        return dict(self.indicators).get(rule.name)

    def _rule(self, scope: str) -> FrameworkRule | None:
        for rule in self.rules:
            if scope in rule.scopes:
                return rule
        return None

    def claim(self, scope: str) -> Claim | None:
        """The claim of the framework whose instrumentation scope is ``scope``, or None."""
        rule = self._rule(scope)
        return None if rule is None else Claim(rule, self.indicator(rule))

    def may_bill(self, scope: str, name: str) -> bool:
        """Cheap test run on every span: is it a usage span of an enabled framework?"""
        rule = self._rule(scope)
        return rule is not None and name in rule.usage_spans

    def metric(self, scope: str, name: str) -> FrameworkMetric | None:
        """The usage counter ``name`` of an enabled framework's ``scope``, or None."""
        rule = self._rule(scope)
        if rule is None or name not in rule.metrics:
            return None
        return FrameworkMetric(rule, rule.metrics[name], self.indicator(rule))

    @property
    def attribute_prefixes(self) -> tuple[str, ...]:
        """Attribute prefixes the enabled rules read (the bridge keeps only these)."""
        return tuple(p for rule in self.rules for p in rule.attribute_prefixes)


def parse_frameworks(items: str | Iterable[str] | None) -> FrameworkSet:
    """``"pipecat,livekit:voice"`` or ``("pipecat", "livekit:voice")`` -> a set.

    Each item is a framework name, optionally followed by ``:indicator``. An unknown name
    is logged as an error and left out (the other frameworks still bill).
    """
    if items is None:
        return FrameworkSet()
    if isinstance(items, str):
        items = items.split(",")
    rules: list[FrameworkRule] = []
    indicators: list[tuple[str, str]] = []
    for item in items:
        name, _, indicator = item.strip().partition(":")
        name = name.strip().lower()
        if not name:
            continue
        rule = FRAMEWORKS.get(name)
        if rule is None:
            _logger.error(
                "paygent: unknown framework %r in the frameworks setting "
                "(OTEL_EXPORTER_PAYGENT_FRAMEWORKS); known: %s. It is ignored",
                name,
                ", ".join(FRAMEWORKS),
            )
            continue
        if rule not in rules:
            rules.append(rule)
        if indicator.strip():
            indicators.append((name, indicator.strip()))
    return FrameworkSet(tuple(rules), tuple(indicators))
