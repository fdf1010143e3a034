"""Every package ``paygent_otel`` imports is declared in ``pyproject.toml``.

A package that only arrives as a dependency of a dependency can disappear with that
dependency's next release; declaring it says which versions this code was written for.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib.metadata import distributions, requires
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "paygent_otel"


def _imported_modules() -> set[str]:
    """Every module outside the standard library that the package imports, by full name
    (``google.rpc``, not ``google``: namespace packages come from several distributions)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.update(_imported_from(node.module, [a.name for a in node.names]))
    return {
        name
        for name in names
        if name.partition(".")[0] not in sys.stdlib_module_names
        and name.partition(".")[0] != "paygent_otel"
    }


def _imported_from(module: str, names: list[str]) -> set[str]:
    """``from module import a, b``: the submodules a and b where they are modules (so
    ``from opentelemetry import trace`` counts opentelemetry.trace), else ``module``."""
    if module.partition(".")[0] in sys.stdlib_module_names | {"paygent_otel"}:
        return set()
    found = set()
    for name in names:
        try:
            is_module = importlib.util.find_spec(f"{module}.{name}") is not None
        except ModuleNotFoundError:
            is_module = False
        found.add(f"{module}.{name}" if is_module else module)
    return found


def _distribution_of_files() -> dict[Path, str]:
    owner: dict[Path, str] = {}
    for dist in distributions():
        for file in dist.files or []:
            if file.suffix in {".py", ".so", ".pyd"}:
                owner[Path(str(dist.locate_file(file))).resolve()] = _normal(dist.metadata["Name"])
    return owner


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """Distribution names in paygent-otel's requirements (any extra), normalised."""
    return {
        _normal(re.split(r"[\s\[<>=;!~]", requirement, maxsplit=1)[0])
        for requirement in requires("paygent-otel") or []
    }


def test_every_imported_package_is_declared() -> None:
    owner = _distribution_of_files()
    declared = _declared()
    undeclared = {}
    for module in sorted(_imported_modules()):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{module} is imported but not installed"
        if spec.origin is not None:
            dist = owner.get(Path(spec.origin).resolve(), "(no distribution)")
        else:  # a namespace package: whoever installed the files in its folder
            folders = {Path(p).resolve() for p in spec.submodule_search_locations or []}
            dist = next((d for f, d in owner.items() if f.parent in folders), "(none)")
        if dist not in declared:
            undeclared[module] = dist
    assert undeclared == {}, "declare these distributions in pyproject.toml"
