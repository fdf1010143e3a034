"""Aliases that keep the module paths of 0.1 importing after the 0.2 layout moved them."""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["REMOVED_IN", "alias"]

REMOVED_IN = "0.3.0"


def alias(old: str, new: str) -> None:
    """Make module ``old`` the module ``new``, with a DeprecationWarning naming both.

    Called from the body of the module at the old path: importing it warns once and hands
    back the new module itself, so its names (and ``mock.patch`` targets) stay the same.
    """
    warnings.warn(
        f"{old} has moved to {new}; import it from there (or from paygent_otel). "
        f"The old path is removed in {REMOVED_IN}.",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
