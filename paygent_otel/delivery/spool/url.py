"""A PostgreSQL spool URL that keeps its password out of every log line and repr.

The spool location travels through the configuration, log messages and ``repr`` as a plain
string. A :class:`SpoolUrl` *is* that string with the password replaced by ``****``, so
whatever prints it (``%s``, f-strings, ``repr``, ``str()``) prints the masked form; only
:attr:`SpoolUrl.dsn` holds the URL the connection is made with.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "PG_URL_SCHEMES",
    "SpoolUrl",
    "is_pg_url",
    "mask_password",
    "redact",
    "spool_location",
]

PG_URL_SCHEMES = ("postgresql://", "postgres://")
"""A spool location starting with one of these selects the PostgreSQL spool."""
_MASK = "****"


def is_pg_url(location: str) -> bool:
    """True when ``location`` names a PostgreSQL database rather than a file."""
    return location.strip().lower().startswith(PG_URL_SCHEMES)


def mask_password(url: str) -> str:
    """``url`` with the password (``user:PASSWORD@`` and ``?password=``) replaced by ``****``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        if password:
            netloc = f"{user}:{_MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in pairs):
            query = urlencode(
                [(name, _MASK if name == "password" else value) for name, value in pairs],
                safe="/*",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for name, v in parse_qsl(parts.query, keep_blank_values=True) if name == "password"]
    return [p for p in found if p]


def redact(text: str, url: str) -> str:
    """``text`` (a driver's error message) with any password of ``url`` replaced by ``****``."""
    for password in _passwords(url):
        text = text.replace(password, _MASK)
    return text


class SpoolUrl(str):
    """A PostgreSQL URL whose text is masked; :attr:`dsn` is the real one (with password)."""

    dsn: str

    def __new__(cls, url: str) -> SpoolUrl:
        """Wrap ``url`` (already a :class:`SpoolUrl`: returned as it is)."""
        if isinstance(url, SpoolUrl):
            return url
        masked = super().__new__(cls, mask_password(url.strip()))
        masked.dsn = url.strip()
        return masked

    def __reduce__(self) -> tuple[Any, ...]:
        # copy/pickle rebuild from the real URL, not from the masked text.
        return (SpoolUrl, (self.dsn,))


def spool_location(location: str) -> str:
    """``location`` as given, or a :class:`SpoolUrl` when it is a PostgreSQL URL."""
    return SpoolUrl(location) if is_pg_url(location) else location
