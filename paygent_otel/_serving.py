"""What the sandbox and the bridge share to serve HTTP with uvicorn in a thread."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import socket
from typing import Final

__all__ = ["HTTP_IMPLEMENTATION", "LOOP_IMPLEMENTATION", "base_url", "bind_socket"]

HTTP_IMPLEMENTATION: Final = "httptools" if importlib.util.find_spec("httptools") else "h11"
"""The sandbox's uvicorn HTTP parser: httptools (the ``server`` extra) when installed; h11
alone took about 60% of the sandbox's CPU per request. The bridge always uses httptools,
through its own guarded protocol (``bridge/server.py``)."""

LOOP_IMPLEMENTATION: Final = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
"""uvicorn's event loop: uvloop when installed."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets copy it from this one. Without it, Nagle holds each response body
    # for the client's delayed ACK: 40 ms per request on a keep-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # A restarted server takes its port back while old connections are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def base_url(host: str, port: int, scheme: str = "http") -> str:
    """``http://host:port`` (or ``https``), with brackets around an IPv6 address."""
    host = host.strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"
