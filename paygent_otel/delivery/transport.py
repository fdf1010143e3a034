"""The HTTP side of delivery: one POST of one usage record, and nothing else.

The worker (:mod:`paygent_otel.delivery.worker`) decides what to send and what an answer means;
a sender only posts a body with its idempotency key and reports (status, Retry-After,
text). The runtime stack is :class:`AiohttpSender`; :class:`HttpxSender` serves only an
httpx transport injected through the exporters' ``transport`` argument (tests scripting
answers, custom networking).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

# aiohttp is imported when a sender is made, not with the package: it is half of
# `import paygent_otel`'s time, and an application that never exports pays nothing for it.

__all__ = ["AiohttpSender", "HttpxSender", "Route", "Sender", "describe_error", "route_for"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Route:
    """How requests reach one endpoint: the URL, the proxy in effect, the TLS context."""

    url: str
    proxy: str | None = None
    """Proxy URL without credentials (from ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``,
    unless ``NO_PROXY`` names the host)."""
    proxy_authorization: str | None = None
    """``Proxy-Authorization`` header value, from credentials in the proxy URL."""
    tls: ssl.SSLContext | None = None
    """None for ``http://`` endpoints."""
    ca: str = "system trust store"
    """Where the TLS context's trusted CAs come from (for messages and ``doctor``)."""

    def describe(self) -> str:
        """One line for logs: ``https://host via proxy http://p:3128 (CA: ...)``."""
        text = self.url
        if self.proxy:
            text += f" via proxy {self.proxy}"
        if self.tls is not None:
            text += f" (TLS, CA: {self.ca})"
        return text


def proxy_for(url: str) -> tuple[str | None, str | None]:
    """The proxy for ``url`` as httpx and requests pick it: ``<SCHEME>_PROXY`` (upper or
    lower case), else ``ALL_PROXY``, unless ``NO_PROXY`` matches the host. Returns the proxy
    URL without credentials and a ``Proxy-Authorization`` value for them, if any.

    Read once when the route is built, not per request: aiohttp's own ``trust_env`` reads
    the environment in the loop's executor on every request, which refuses work once the
    interpreter is shutting down.
    """
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None, None
    if "://" not in proxy:
        proxy = "http://" + proxy
    proxy_parts = urlsplit(proxy)
    if proxy_parts.username is None:
        return proxy, None
    credentials = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}"
    authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    bare = proxy_parts._replace(netloc=proxy_parts.netloc.rpartition("@")[2])
    return urlunsplit(bare), authorization


def tls_context(
    certificate: str | None, client_certificate: str | None, client_key: str | None
) -> tuple[ssl.SSLContext, str]:
    """A verifying TLS context: the system trust store, or the CA bundle ``certificate``;
    with a client certificate (and key) when given. Raises ``ValueError`` naming the file."""
    try:
        context = ssl.create_default_context(cafile=certificate)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA bundle {certificate!r}: {exc}") from exc
    if client_certificate:
        try:
            context.load_cert_chain(client_certificate, client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the client certificate {client_certificate!r}"
                f"{f' with key {client_key!r}' if client_key else ''}: {exc}"
            ) from exc
    elif client_key:
        raise ValueError("a client key was given without a client certificate")
    if certificate:
        return context, f"CA bundle {certificate}"
    paths = ssl.get_default_verify_paths()
    return context, f"system trust store ({paths.cafile or paths.capath})"


def route_for(
    url: str,
    *,
    certificate: str | None = None,
    client_certificate: str | None = None,
    client_key: str | None = None,
) -> Route:
    """The route to ``url`` with the proxy and TLS settings in effect now."""
    proxy, proxy_authorization = proxy_for(url)
    if urlsplit(url).scheme != "https":
        return Route(url, proxy, proxy_authorization)
    context, ca = tls_context(certificate, client_certificate, client_key)
    return Route(url, proxy, proxy_authorization, context, ca)


def describe_error(exc: BaseException, route: Route, timeout: float) -> str:
    """What went wrong with one request, in words that point at the fix."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"TLS certificate of {exc.host} not trusted ({exc.certificate_error}); trusted CAs: "
            f"{route.ca}. Set OTEL_EXPORTER_PAYGENT_CERTIFICATE to the CA bundle that signed "
            "the server's certificate"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake with {exc.host} failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"cannot connect to the proxy {route.proxy}: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy {route.proxy} answered {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host name {exc.host} ({exc.os_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused by {exc.host}:{exc.port}"
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    return f"{type(exc).__name__}: {exc}"


def is_connect_failure(exc: BaseException) -> bool:
    """The request never reached the server (so every other request would fail too)."""
    import aiohttp

    return isinstance(
        exc, httpx.ConnectError | aiohttp.ClientConnectorError | ConnectionRefusedError
    )


class _OwnThreadLookups:
    """The two calls aiohttp's ``ThreadedResolver`` makes of its loop, each run in a
    short-lived thread of its own instead of the loop's default executor.

    The executor refuses work once interpreter shutdown has begun ("cannot schedule new
    futures after interpreter shutdown"), which is exactly when a short script's atexit
    flush must resolve the endpoint's host name.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        return await _in_own_thread(self._loop, lambda: socket.getaddrinfo(*args, **kwargs))

    async def getnameinfo(self, *args: Any) -> Any:
        return await _in_own_thread(self._loop, lambda: socket.getnameinfo(*args))


async def _in_own_thread(loop: asyncio.AbstractEventLoop, call: Callable[[], _T]) -> _T:
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(_T, result))

    def work() -> None:
        try:
            result = call()
        except BaseException as exc:
            outcome: tuple[_T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed while we looked up
            loop.call_soon_threadsafe(settle, *outcome)

    try:
        threading.Thread(target=work, name="paygent-otel-lookup", daemon=True).start()
    except RuntimeError:
        return call()  # no thread can start now: look up in place
    return await future


class Sender(Protocol):
    """Posts one usage record."""

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text)."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


class HttpxSender:
    """POSTs through an injected httpx transport (tests, custom TLS or proxies)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, url: str, headers: dict[str, str], timeout: float
    ) -> None:
        self._url = url
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers)
        # httpx logs every request at INFO: one line per usage record is noise for the user.
        self._quiet = _ThreadFilter(threading.current_thread().name)
        logging.getLogger("httpx").addFilter(self._quiet)

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text)."""
        response = await self._client.post(
            self._url, content=body, headers={"Idempotency-Key": key}
        )
        return response.status_code, response.headers.get("Retry-After"), response.text

    async def aclose(self) -> None:
        await self._client.aclose()
        logging.getLogger("httpx").removeFilter(self._quiet)


class _ThreadFilter(logging.Filter):
    """Drops the records logged by one thread (the delivery worker's)."""

    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self._thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != self._thread_name


class AiohttpSender:
    """POSTs with aiohttp itself: the runtime HTTP stack.

    Not ``httpx.AsyncClient`` over an aiohttp transport: httpx's client layers (URL
    merging, cookies, auth and redirect handling, its own request and response objects)
    cost more CPU per delivered record than the switch allows (``make bench`` row 11;
    figures in ``bench/RESULTS.md``, the decision in the README's dependency notes).
    """

    def __init__(self, route: Route, headers: dict[str, str], max_in_flight: int) -> None:
        import aiohttp
        from yarl import URL  # aiohttp's own URL type: parsed once, not per request

        self._url = URL(route.url)
        self._headers = headers
        self._proxy = route.proxy
        self._proxy_headers = (
            {"Proxy-Authorization": route.proxy_authorization}
            if route.proxy_authorization
            else None
        )
        resolver = aiohttp.ThreadedResolver(
            loop=cast(asyncio.AbstractEventLoop, _OwnThreadLookups(asyncio.get_running_loop()))
        )
        # Timeouts are applied by the caller (asyncio.timeout around each post).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_in_flight,
                resolver=resolver,
                ssl=route.tls if route.tls is not None else True,
            ),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text; empty after a 2xx)."""
        async with self._session.post(
            self._url,
            data=body,
            headers={**self._headers, "Idempotency-Key": key},
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            allow_redirects=False,  # as with httpx: a redirect is an answer, not followed
        ) as response:
            raw = await response.read()
            if 200 <= response.status < 300:
                return response.status, None, ""
            text = raw.decode("utf-8", "replace")
            return response.status, response.headers.get("Retry-After"), text

    async def aclose(self) -> None:
        await self._session.close()
