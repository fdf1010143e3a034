"""Importing any module of the package does nothing but define names.

No fork hooks, no logging filters or handlers, no threads, no warnings (the deprecated
aliases of moved modules excepted: warning is their job), and ``import paygent_otel``
leaves aiohttp and the server packages unloaded until they are used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_layout import DEPRECATED_ALIASES

PACKAGE = Path(__file__).resolve().parent.parent / "paygent_otel"

_PROBE = """
import json, logging, os, sys, threading, warnings
calls = []


def ours(what, original):
    # Only what our modules do counts: the OpenTelemetry SDK registers its own at import.
    def spy(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("paygent_otel"):
            calls.append(f"{what} from {caller}")
        return original(*args, **kwargs)
    return spy


os.register_at_fork = ours("os.register_at_fork", os.register_at_fork)
logging.Logger.addFilter = ours("Logger.addFilter", logging.Logger.addFilter)
logging.Logger.addHandler = ours("Logger.addHandler", logging.Logger.addHandler)
warnings.simplefilter("error")
threads = threading.active_count()
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in ("aiohttp", "uvicorn", "starlette", "psycopg", "prometheus_client")
                if m in sys.modules)
print(json.dumps({"calls": calls, "threads": threading.active_count() - threads,
                  "loaded": loaded}))
"""


def _import_fresh(*modules: str) -> dict[str, object]:
    """What importing ``modules`` in a fresh interpreter did: our own calls to the hooks
    above, the threads it left, and which of the heavy packages it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name.endswith("__main__") or name in DEPRECATED_ALIASES:
            continue
        if name == "paygent_otel.frameworks":  # the deprecated alias package
            continue
        names.append(name)
    return names


def test_import_paygent_otel_loads_no_http_stack_or_server() -> None:
    assert _import_fresh("paygent_otel") == {"calls": [], "threads": 0, "loaded": []}


def test_no_module_does_work_when_imported() -> None:
    """Every module, in one fresh interpreter: no hooks, filters, threads or warnings."""
    result = _import_fresh(*_modules())
    assert (result["calls"], result["threads"]) == ([], 0)
