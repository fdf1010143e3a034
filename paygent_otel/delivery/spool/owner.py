"""Who holds a lease, whether that holder still lives, and a spool's life across fork().

A lease names its holder ``host:pid:process nonce:instance``. A holder on this host whose
process is gone (or whose pid a later process was given) holds nothing: its leases are
released at once. A spool's lock is held across fork(), so no thread is inside SQLite in
the child's copy, and the child resets its spools.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import weakref
from collections.abc import Iterable
from typing import Protocol

from paygent_otel.delivery.forking import register_at_fork_once

__all__ = ["ForkAware", "dead_owners", "owner_token", "process_nonce", "track"]


class ForkAware(Protocol):
    """A spool whose lock is held across fork() and which resets itself in the child."""

    _lock: threading.Lock

    def _after_fork(self) -> None: ...


_nonces: dict[int, str] = {}
_live_spools: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_held_across_fork: list[ForkAware] = []


def process_nonce() -> str:
    """Tells this process from an earlier one given the same pid (a restarted container's 1)."""
    return _nonces.setdefault(os.getpid(), uuid.uuid4().hex[:8])


def owner_token() -> str:
    """``host:pid:process nonce:instance``: who holds a lease, and whether it still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_nonce()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_owners(owners: Iterable[str]) -> list[str]:
    """The lease holders among ``owners`` that are processes of this host no longer alive."""
    host = socket.gethostname()
    pid = os.getpid()
    dead = []
    for owner in owners:
        parts = owner.split(":")
        if parts[0] != host or len(parts) < 2 or not parts[1].isdigit():
            continue
        owner_pid = int(parts[1])
        # Same pid, other nonce: an earlier process whose pid this one was given.
        reused = owner_pid == pid and len(parts) == 4 and parts[2] != process_nonce()
        if reused or (owner_pid != pid and not _pid_alive(owner_pid)):
            dead.append(owner)
    return dead


def _before_fork() -> None:
    # Hold every spool's lock across fork(), so no thread is inside SQLite (holding its
    # locks and mutexes, or half-way through a transaction) in the child's copy.
    for spool in list(_live_spools):
        spool._lock.acquire()
        _held_across_fork.append(spool)


def _after_fork_in_parent() -> None:
    while _held_across_fork:
        _held_across_fork.pop()._lock.release()


def _after_fork_in_child() -> None:
    _held_across_fork.clear()
    for spool in list(_live_spools):
        spool._after_fork()


def track(spool: ForkAware) -> None:
    """Hold ``spool``'s lock across fork() and reset it in the child (hooks set once)."""
    _live_spools.add(spool)
    register_at_fork_once(
        "spool",
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
