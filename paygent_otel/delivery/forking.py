"""fork() hooks registered when the first object that needs them is made, not at import."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["register_at_fork_once"]

_registered: set[str] = set()
_lock = threading.Lock()


def register_at_fork_once(
    name: str,
    *,
    before: Callable[[], None] | None = None,
    after_in_parent: Callable[[], None] | None = None,
    after_in_child: Callable[[], None] | None = None,
) -> None:
    """``os.register_at_fork`` with these hooks, the first time ``name`` is registered."""
    with _lock:
        if name in _registered:
            return
        _registered.add(name)
    hooks = {"before": before, "after_in_parent": after_in_parent, "after_in_child": after_in_child}
    os.register_at_fork(**{k: v for k, v in hooks.items() if v is not None})
