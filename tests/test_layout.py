"""The package layout shows the architecture, and imports only run downwards.

Each subpackage may import only the subpackages below it (``ALLOWED``); the top-level
``_version`` and ``_output`` import nothing of ours and serve everyone. ``__init__``
re-exports and the deprecated aliases of moved modules (``DEPRECATED_ALIASES``) are the
only modules that may reach anywhere. Every import counts, including those in functions
and under ``TYPE_CHECKING``: a type-only upward import is still a dependency to untangle.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "paygent_otel"

LEAVES = frozenset({"_version", "_output", "_deprecated"})
"""Top-level modules that import nothing of ours and may be imported from anywhere."""

ALLOWED: dict[str, frozenset[str]] = {
    "convention": frozenset(),
    "delivery": frozenset({"convention"}),
    "exporters": frozenset({"convention", "delivery"}),
    "recording": frozenset({"convention", "delivery", "exporters"}),
    "_web": frozenset({"convention", "delivery"}),
    "sandbox": frozenset({"_web", "convention", "delivery"}),
    "bridge": frozenset({"_web", "convention", "delivery", "exporters"}),
    "_cli": frozenset(
        {"_web", "convention", "delivery", "exporters", "recording", "sandbox", "bridge"}
    ),
}
"""For each subpackage, the subpackages it may import (besides itself and the leaves)."""

DEPRECATED_ALIASES: dict[str, str] = {
    "paygent_otel.semconv": "paygent_otel.convention.semconv",
    "paygent_otel.genai": "paygent_otel.convention.genai",
    "paygent_otel.trace_exporter": "paygent_otel.exporters.trace",
    "paygent_otel.metric_exporter": "paygent_otel.exporters.metric",
    "paygent_otel.instruments": "paygent_otel.recording.instruments",
    "paygent_otel.baggage": "paygent_otel.recording.baggage",
    "paygent_otel.sampling": "paygent_otel.recording.sampling",
    "paygent_otel.cli": "paygent_otel._cli.main",
    "paygent_otel.demo": "paygent_otel._cli.demo",
    "paygent_otel.doctor": "paygent_otel._cli.doctor",
    "paygent_otel.reconcile": "paygent_otel.delivery.reconcile",
    "paygent_otel.spool_cli": "paygent_otel._cli.spool",
    "paygent_otel.usage_page": "paygent_otel._web.usage_page",
    "paygent_otel.bridge.cli": "paygent_otel._cli.serve",
    "paygent_otel.sandbox.cli": "paygent_otel._cli.sandbox",
}
"""Public modules of 0.1 that moved, and where they are now (aliases removed in 0.3)."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``paygent_otel`` module or name ``path`` imports, as absolute dotted names."""
    this = _module(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("paygent_otel.")}


def _part(dotted: str) -> str:
    """The top-level part of the package a dotted name belongs to."""
    return dotted.split(".")[1]


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_lives_in_a_layer() -> None:
    """A new module must be put in a subpackage (or declared a leaf or alias)."""
    homeless = [
        _module(p)
        for p in _sources()
        if _module(p) != "paygent_otel"
        and _part(_module(p)) not in ALLOWED
        and _part(_module(p)) not in LEAVES
        and _module(p) not in DEPRECATED_ALIASES
        and _part(_module(p)) != "frameworks"
    ]
    assert homeless == []


@pytest.mark.parametrize("path", _sources(), ids=_module)
def test_imports_only_run_downwards(path: Path) -> None:
    module = _module(path)
    if module == "paygent_otel" or module in DEPRECATED_ALIASES or module.endswith("__main__"):
        return
    if _part(module) == "frameworks":  # the deprecated alias package
        return
    own = _part(module)
    allowed = frozenset() if own in LEAVES else ALLOWED[own] | {own} | LEAVES
    upward = sorted(name for name in _imports(path) if _part(name) not in allowed)
    assert upward == [], f"{module} imports above (or beside) its layer: {upward}"


def test_the_layer_table_has_no_cycle() -> None:
    seen: dict[str, int] = {}

    def depth(part: str) -> int:
        if part not in seen:
            seen[part] = -1
            seen[part] = 1 + max((depth(p) for p in ALLOWED[part]), default=0)
        assert seen[part] >= 0, f"cycle through {part}"
        return seen[part]

    for part in ALLOWED:
        depth(part)


@pytest.mark.parametrize("old", sorted(DEPRECATED_ALIASES))
def test_moved_public_modules_keep_a_deprecated_alias(old: str) -> None:
    new = DEPRECATED_ALIASES[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = importlib.import_module(old)
    assert alias is importlib.import_module(new)
    said = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(old in s and new in s for s in said), said


def test_the_architecture_doc_states_the_layer_table() -> None:
    """docs/architecture.md's "may import" column is this test's table."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    stated: dict[str, frozenset[str]] = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith("/`"):
            layer = cells[0].strip("`/")
            names = frozenset(n.strip("` ") for n in cells[2].split(","))
            if cells[2] == "nothing of ours":
                names = frozenset()
            elif cells[2] == "everything":
                names = ALLOWED[layer]
            stated[layer] = names
    assert stated == ALLOWED
