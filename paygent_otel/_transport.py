"""The HTTP side of delivery: one POST of one usage record, and nothing else.

The worker (:mod:`paygent_otel._delivery`) decides what to send and what an answer means;
a sender only posts a body with its idempotency key and reports (status, Retry-After,
text). Production uses :class:`AiohttpSender`; :class:`HttpxSender` takes an injected
httpx transport (tests, custom networking).
"""

from __future__ import annotations

from typing import Protocol

import aiohttp
import httpx

__all__ = ["AiohttpSender", "HttpxSender", "Sender"]


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

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text)."""
        response = await self._client.post(
            self._url, content=body, headers={"Idempotency-Key": key}
        )
        return response.status_code, response.headers.get("Retry-After"), response.text

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpSender:
    """POSTs with aiohttp itself: the default.

    httpx's client layers (URL merging, cookies, auth and redirect handling, its own
    request and response objects) over the aiohttp transport cost about 60% more CPU per
    request than aiohttp alone on this path (``bench/README.md``, delivery profile).
    """

    def __init__(self, url: str, headers: dict[str, str], max_in_flight: int) -> None:
        from yarl import URL

        self._url = URL(url)
        self._headers = headers
        # Timeouts are applied by the caller (asyncio.timeout around each post).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_in_flight),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def post(self, body: bytes, key: str) -> tuple[int, str | None, str]:
        """(status, Retry-After header, response text; empty after a 2xx)."""
        async with self._session.post(
            self._url,
            data=body,
            headers={**self._headers, "Idempotency-Key": key},
            allow_redirects=False,  # as with httpx: a redirect is an answer, not followed
        ) as response:
            raw = await response.read()
            if 200 <= response.status < 300:
                return response.status, None, ""
            text = raw.decode("utf-8", "replace")
            return response.status, response.headers.get("Retry-After"), text

    async def aclose(self) -> None:
        await self._session.close()
