"""Render the convention's tables for ``docs/semantic-conventions.md`` from the code.

``python -m paygent_otel.convention.semconv_doc`` prints them; ``tests/test_semconv.py`` fails when
the document and the code drift apart.
"""

from __future__ import annotations

import ast
import inspect
import itertools
from typing import Final

from paygent_otel.convention import semconv as sc

__all__ = ["BEGIN_MARKER", "END_MARKER", "attribute_docs", "render_tables"]

BEGIN_MARKER: Final = "<!-- BEGIN GENERATED: python -m paygent_otel.convention.semconv_doc -->"
END_MARKER: Final = "<!-- END GENERATED -->"

_IDENTITY_ROWS = {
    sc.USAGE_KIND: ("string", "", "required", "(selects the call)"),
    sc.AGENT_ID: ("string", "", "required*", "`agentId`"),
    sc.CUSTOMER_ID: ("string", "", "required*", "`customerId`"),
    sc.INDICATOR: ("string", "", "optional", "`indicator`"),
    sc.PROVIDER: ("string", "", "required*", "`rawUsage.provider`"),
    sc.MODEL: ("string", "", "required*", "`rawUsage.model`"),
    sc.PLAN: ("string", "", "optional (`default`)", "`rawUsage.plan`"),
    sc.META_PREFIX + "<key>": ("string", "", "optional", "`metaTags.<key>`"),
    sc.USAGE_ID: ("string", "", "optional, never inherited", "(the `Idempotency-Key`)"),
}


def attribute_docs() -> dict[str, str]:
    """The first sentence of each constant's docstring, keyed by the constant's value."""
    tree = ast.parse(inspect.getsource(sc))
    docs: dict[str, str] = {}
    body = tree.body
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split()).replace("``", "`")
            docs[node.value.value] = text.split(". ")[0].rstrip(".") + "."
    return docs


def _json_field(q: sc.Quantity) -> str:
    path = "rawUsage." + ".".join(q.json_path)
    return f"`{path}`" + (" (value / 60)" if q.unit is sc.Unit.SECONDS else "")


def render_tables() -> str:
    """Markdown tables of every attribute and metric instrument, as the code defines them."""
    docs = attribute_docs()
    lines = [
        BEGIN_MARKER,
        "",
        "### Record and identity attributes",
        "",
        "| Attribute | Type | Required | Paygent JSON field | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (type_, _unit, required, field) in _IDENTITY_ROWS.items():
        meaning = docs.get(name, docs.get(sc.META_PREFIX, ""))
        lines.append(f"| `{name}` | {type_} | {required} | {field} | {meaning} |")
    lines += [
        "",
        "\\* required after inheritance: the record, then its span, then the resource, then "
        "the exporter's defaults.",
        "",
        "### Quantity attributes (and metric instruments of the same name)",
        "",
        "| Attribute / instrument | Kind | Type | Unit | Paygent JSON field | Meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for q in sc.QUANTITIES.values():
        type_ = "int" if q.is_count else "double"
        lines.append(
            f"| `{q.name}` | {q.kind.value} | {type_} | `{q.unit.value}` | {_json_field(q)} "
            f"| {docs.get(q.name, '')} |"
        )
    lines += [
        "",
        f"Span event name for one extra record per event: `{sc.USAGE_EVENT_NAME}`.",
        "",
        "Metric instruments must be a Counter or ObservableCounter with DELTA temporality; an "
        "empty unit is accepted, and for counts `1` or `{...}` too; helper arguments and rules "
        "are in [metrics.md](metrics.md).",
        "",
    ]
    lines.append(END_MARKER)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_tables())
