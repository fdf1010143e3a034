"""Who may send usage to the bridge: bearer tokens, optionally limited to some agents.

A token file holds one token per line, optionally followed by ``=`` and the comma-separated
agent ids that token may bill (``#`` starts a comment)::

    # team voice: only its own agents
    3f9c0a6b1d2e4f5a8b7c6d5e4f3a2b1c=agent-support-voice,agent-sales-voice
    # the platform gateway: any agent
    9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d

Tokens are compared in constant time (digests of equal length, every token checked).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["MIN_TOKEN_LENGTH", "BearerAuth", "Grant", "TokenError", "is_loopback"]

_logger = logging.getLogger("paygent_otel.bridge.auth")

MIN_TOKEN_LENGTH: Final = 16
"""Shortest token accepted: a guessable token is no protection."""

_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+$")


class TokenError(ValueError):
    """A token or token file that cannot be used (the bridge refuses to start)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated caller may do."""

    agents: frozenset[str] | None
    """The agent ids its records may bill; None for any agent."""
    name: str = "anonymous"
    """Where the token was configured (``FILE line N``), for logs and per-token limits;
    never the token itself."""

    @property
    def single_agent(self) -> str | None:
        """The agent id when the token may bill exactly one agent, else None."""
        if self.agents is not None and len(self.agents) == 1:
            return next(iter(self.agents))
        return None


_ANY_AGENT = Grant(None)

_TokenEntry = tuple[str, frozenset[str] | None, str]


def _parse_line(line: str, where: str) -> _TokenEntry:
    token, sep, agents_text = line.partition("=")
    token = token.strip()
    if not _TOKEN_RE.match(token):
        raise TokenError(
            f"{where}: a token may only hold A-Z a-z 0-9 and . _ ~ + / - "
            "(and `=` only to start its agent list)"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
    if not sep:
        return token, None, where
    agents = frozenset(a.strip() for a in agents_text.split(",") if a.strip())
    if not agents:
        raise TokenError(f"{where}: `=` must be followed by at least one agent id")
    return token, agents, where


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class BearerAuth:
    """The configured tokens; :meth:`check` an ``Authorization`` header against them."""

    def __init__(self, tokens: Iterable[_TokenEntry] = ()) -> None:
        self._tokens: list[tuple[bytes, Grant]] = []
        seen: set[bytes] = set()
        for token, agents, name in tokens:
            digest = _digest(token)
            if digest in seen:
                raise TokenError("the same token is configured twice")
            seen.add(digest)
            self._tokens.append((digest, Grant(agents, name)))

    @classmethod
    def parse(cls, lines: Iterable[str], source: str) -> BearerAuth:
        """Tokens from lines of the token-file format (``TOKEN`` or ``TOKEN=agent,...``)."""
        entries = []
        for number, raw in enumerate(lines, start=1):
            line = raw.split("#", 1)[0].strip()
            if line:
                entries.append(_parse_line(line, f"{source} line {number}"))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BearerAuth:
        """Read a token file; warns when others may read it."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
            mode = file.stat().st_mode
        except OSError as exc:
            raise TokenError(f"cannot read the token file {file}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            _logger.warning("token file %s is readable by other users; chmod 600 it", file)
        auth = cls.parse(text.splitlines(), str(file))
        if not auth.required:
            raise TokenError(f"the token file {file} holds no token")
        return auth

    def merged(self, other: BearerAuth) -> BearerAuth:
        """Both sets of tokens."""
        combined = BearerAuth()
        combined._tokens = [*self._tokens, *other._tokens]
        if len({d for d, _ in combined._tokens}) != len(combined._tokens):
            raise TokenError("the same token is configured twice")
        return combined

    @property
    def required(self) -> bool:
        """True when at least one token is configured (requests must then carry one)."""
        return bool(self._tokens)

    def check(self, authorization: str | None) -> Grant | None:
        """The caller's grant, or None when the header is missing or matches no token.

        With no token configured every caller gets a grant for any agent.
        """
        if not self._tokens:
            return _ANY_AGENT
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = _digest(presented.strip())
        match: Grant | None = None
        for candidate, grant in self._tokens:
            # No early exit: the time taken does not tell which token (or how much) matched.
            if hmac.compare_digest(digest, candidate):
                match = grant
        return match


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
