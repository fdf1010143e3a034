"""What the bridge checks before it works on an export request, and how it reads the body.

Cheapest first, before the body is read: the bearer token, the media type, a length, the
shutdown, then fairness between tokens (a rate and a count of requests in progress per
token). The body is read under the size limit and the shared memory budget. A check that
fails raises :class:`Refusal` (the status, reason and message the app answers with);
a sender that went away raises :class:`Gone`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Final

from starlette.requests import Request

from paygent_otel.bridge.auth import Grant
from paygent_otel.bridge.config import BridgeConfig
from paygent_otel.bridge.guard import BudgetExhausted, BudgetHold, TokenBuckets
from paygent_otel.bridge.otlp import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE

__all__ = ["CONNECTION_EXTENSION", "Admission", "Gone", "Refusal", "unavailable"]

CONNECTION_EXTENSION: Final = "paygent.connection"
"""ASGI scope extension the server sets to a dict; ``closed`` names why the server closed
the connection under a request (``body_timeout``), so the app does not count it as the
client's doing."""

_PROTOBUF_TYPES: Final = frozenset({PROTOBUF_CONTENT_TYPE, "application/protobuf"})


class Gone(Exception):
    """The connection closed under the request (``reason``): nothing to answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Refusal(Exception):
    """The request is answered ``status`` (counted under ``reason``) with ``message``."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def unavailable(config: BridgeConfig, message: str, reason: str) -> Refusal:
    """A 503 with the configured ``Retry-After``: the sender should come back later."""
    return Refusal(503, reason, message, {"Retry-After": str(config.retry_after_seconds)})


class Admission:
    """The checks made before an export request is processed, and the requests in progress
    per token (released by :meth:`release`)."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.closing = False
        """Set by the app's drain and close: exports are answered 503."""
        self._per_token: Counter[str] = Counter()
        self._rates = TokenBuckets(config.limits.rate_limit_per_token)

    def admit(self, request: Request, media_type: str, json_encoded: bool) -> Grant:
        """The checks made before the body is read, cheapest first; the caller's grant,
        counted as in progress for its token until :meth:`release`."""
        grant = self._checked(request, media_type, json_encoded)
        self._per_token[grant.name] += 1
        return grant

    def release(self, token: str) -> None:
        """The request of ``token`` admitted by :meth:`admit` is over."""
        self._per_token[token] -= 1
        if not self._per_token[token]:
            del self._per_token[token]

    def _checked(self, request: Request, media_type: str, json_encoded: bool) -> Grant:
        headers = request.headers
        grant = self.config.auth.check(headers.get("authorization"))
        if grant is None:
            raise Refusal(
                401,
                "unauthorized",
                "missing or invalid bearer token (send Authorization: Bearer <token>)",
                {"WWW-Authenticate": 'Bearer realm="paygent-otel"'},
            )
        if not json_encoded and media_type not in _PROTOBUF_TYPES:
            raise Refusal(
                415,
                "unsupported_media_type",
                f"Content-Type {media_type or 'none'!r} is not supported; send "
                f"{PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}",
            )
        if (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        ):
            # HTTP/1.0 without Content-Length: the body would be read as empty and billed
            # as nothing.
            raise Refusal(
                411,
                "length_required",
                "a request body needs a Content-Length (or chunked transfer encoding)",
            )
        if self.closing:
            raise unavailable(self.config, "the bridge is shutting down", "shutting_down")
        if not self.config.auth.required:
            return grant  # no tokens (loopback, or client certificates): none to be fair between
        self._fair(grant)
        return grant

    def _fair(self, grant: Grant) -> None:
        """Fairness between tokens: a request rate, and a count of requests in progress."""
        limits = self.config.limits
        wait = self._rates.take(grant.name)
        if wait:
            raise Refusal(
                429,
                "rate_limited",
                f"more than {limits.rate_limit_per_token:g} export requests per second for "
                f"this token (--rate-limit-per-token); retry later",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if self._per_token[grant.name] >= limits.max_requests_per_token:
            raise Refusal(
                429,
                "token_busy",
                f"this token already has {limits.max_requests_per_token} export requests in "
                "progress (--max-requests-per-token); retry later",
                {"Retry-After": "1"},
            )

    async def read_body(self, request: Request, hold: BudgetHold) -> bytes:
        """The request body, under the size limit; its bytes are taken from ``hold``."""
        limit = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        too_large = Refusal(
            413,
            "body_too_large",
            f"the request body exceeds the limit of {limit} bytes (--max-request-bytes); "
            "lower the sender's batch size",
        )
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        try:
            if declared.isdigit():
                hold.take(int(declared))
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    closed = request.scope.get("extensions", {}).get(CONNECTION_EXTENSION, {})
                    raise Gone(str(closed.get("closed", "client_disconnected")))
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                if not declared.isdigit():
                    hold.take(len(chunk))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except BudgetExhausted as exc:
            raise unavailable(self.config, str(exc), "memory_budget") from None
