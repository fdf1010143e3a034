"""The sandbox's ASGI app: Paygent's ``/api/v2/usage`` with strict validation and fault injection.

A request to a Paygent API route goes through, in this order:

1. ``latency_ms`` (an ``asyncio.sleep``, so concurrent requests wait side by side);
2. ``fail_rate``: answer ``fail_status`` (with ``Retry-After`` when ``retry_after`` is set);
3. ``reject_rate``: answer 400 ``{"error": "sandbox injected rejection"}``;
4. the ``paygent-api-key`` check (401);
5. content type (415), UTF-8 JSON (400) and the documented shape (400, naming the field);
6. the record is stored in the ledger; the answer is 200 ``{"id": N, "duplicate": false}``,
   or, for an ``Idempotency-Key`` already recorded, 200 ``{"id": N, "duplicate": true}``
   with the first record's id and nothing stored.

Every answer is written to the ledger's request log before it is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, NoReturn, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from paygent_otel.sandbox.ledger import LedgerWriter, Outcome, UsageRow

__all__ = [
    "AUTH_CHECK_PATH",
    "CUSTOMERS_PATH",
    "DEFAULT_FAIL_STATUS",
    "INJECTED_REJECTION_ERROR",
    "MAX_SAFE_INTEGER",
    "USAGE_PATH",
    "Faults",
    "PayloadError",
    "SandboxApp",
    "validate_usage",
]

DEFAULT_FAIL_STATUS: Final = 503
"""Status of an injected failure unless ``fail_status`` says otherwise."""

INJECTED_REJECTION_ERROR: Final = "sandbox injected rejection"
"""The ``error`` of a 400 injected by ``reject_rate``."""

MAX_SAFE_INTEGER: Final = 2**53 - 1
"""Largest token or character count accepted: the largest integer every JSON parser keeps."""

USAGE_PATH: Final = "/api/v2/usage"
"""Paygent's standalone usage endpoint (``track_stt``, ``track_tts``, ``track_sts``)."""

CUSTOMERS_PATH: Final = "/api/v1/customers/create-or-get"
"""Paygent's customer endpoint; the sandbox acknowledges it and stores nothing."""

AUTH_CHECK_PATH: Final = "/api/v2/auth-check"
"""The sandbox's own key check (``paygent-otel doctor``): 200 for a key the usage route
would accept, 401 otherwise. Bills nothing, logs nothing; faults do not apply. Paygent
itself has no such route."""


_Parsed = TypeVar("_Parsed")

_MAX_LATENCY_MS = 600_000.0  # longer than any client timeout; a typo, not a test


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Fault injection settings; every field is validated on construction (``ValueError``)."""

    latency_ms: float = 0.0
    """Added to every Paygent API request before it is handled, in milliseconds."""
    fail_rate: float = 0.0
    """Probability (0..1) of answering ``fail_status`` instead of handling the request."""
    fail_status: int = DEFAULT_FAIL_STATUS
    """HTTP status of an injected failure (400..599)."""
    retry_after: int | None = None
    """Whole seconds sent as ``Retry-After`` on injected failures (HTTP allows no fractions)."""
    reject_rate: float = 0.0
    """Probability (0..1) of answering 400 ``sandbox injected rejection``."""
    seed: int | None = None
    """Seed of the random draws, for reproducible fault sequences (None: unseeded)."""

    def __post_init__(self) -> None:
        _check_number("latency_ms", self.latency_ms, 0.0, _MAX_LATENCY_MS)
        _check_number("fail_rate", self.fail_rate, 0.0, 1.0)
        _check_number("reject_rate", self.reject_rate, 0.0, 1.0)
        _check_int("fail_status", self.fail_status, 400, 599)
        if self.retry_after is not None:
            _check_int("retry_after", self.retry_after, 0, 86_400)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)

    def replace(self, **changes: Any) -> Faults:
        """A copy with some settings changed; ``ValueError`` for unknown names or bad values."""
        unknown = changes.keys() - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the body of ``GET /_sandbox/faults``)."""
        return dataclasses.asdict(self)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {_json_type(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be between {low:g} and {high:g}, got {value}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be between {low} and {high}, got {value}")


# --------------------------------------------------------------------------- validation


class PayloadError(ValueError):
    """A request body that breaks the documented shape; the message names field and rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        """Dotted path of the offending field (``body`` for the document itself)."""
        self.rule = rule
        """The rule it breaks, such as ``must be > 0, got 0``."""


_TOP_FIELDS = frozenset({"agentId", "customerId", "indicator", "rawUsage", "metaTags"})
_RAW_USAGE_FIELDS = frozenset(
    {"provider", "model", "plan", "audioDuration", "characterCount", "usageMetadata"}
)
_KIND_BY_FIELD: Final = {"audioDuration": "stt", "characterCount": "tts", "usageMetadata": "sts"}
_METADATA_FIELDS = frozenset({"schemaVersion", "input", "output", "cached", "connection"})
_SIDES: Final = {
    "input": frozenset({"text", "audio", "image", "video"}),
    "output": frozenset({"text", "audio"}),
}
_MODALITY_FIELDS = frozenset({"tokens", "minutes"})
_CACHED_MODALITIES = frozenset({"text", "audio", "image"})
_TOKENS_ONLY = frozenset({"tokens"})
_MINUTES_ONLY = frozenset({"minutes"})
_MAX_META_TAGS = 20
_MAX_META_VALUE = 256
_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


_JSON_TYPES: Final = (
    (type(None), "null"),
    (bool, "boolean"),  # before int: a bool is an int to Python
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return next(
        (name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__
    )


def _object(value: object, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(where, f"must be a JSON object, got {_json_type(value)}")
    unknown = value.keys() - allowed
    if unknown:
        raise PayloadError(
            f"{where}.{min(unknown)}", f"unknown field (allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _string(value: object, where: str, *, required: bool) -> str:
    if not isinstance(value, str):
        raise PayloadError(where, f"must be a string, got {_json_type(value)}")
    if required and not value.strip():
        raise PayloadError(where, "must be a non-empty string (not blank)")
    return value


def _integer(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(where, f"must be a JSON integer, got {_json_type(value)}")
    if value < minimum:
        raise PayloadError(where, f"must be >= {minimum}, got {value}")
    if value > MAX_SAFE_INTEGER:
        raise PayloadError(where, f"must be <= 2**53-1, got {value}")
    return value


def _minutes(value: object, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(where, f"must be a JSON number (minutes), got {_json_type(value)}")
    if isinstance(value, int) and value > MAX_SAFE_INTEGER:
        raise PayloadError(where, f"must be <= 2**53-1, got {value}")
    minutes = float(value)
    if not math.isfinite(minutes):
        raise PayloadError(where, f"must be finite, got {value}")
    if positive and minutes <= 0:
        raise PayloadError(where, f"must be > 0, got {value}")
    if minutes < 0:
        raise PayloadError(where, f"must be >= 0, got {value}")
    return minutes


def _quantity(
    value: object, where: str, allowed: frozenset[str], tokens: list[int], minutes: list[float]
) -> None:
    """One ``{"tokens": N, "minutes": F}`` object; its values go to the running sums."""
    obj = _object(value, where, allowed)
    if not obj:
        raise PayloadError(where, f"must have {' and/or '.join(sorted(allowed))}")
    if "tokens" in obj:
        tokens.append(_integer(obj["tokens"], f"{where}.tokens", 0))
    if "minutes" in obj:
        minutes.append(_minutes(obj["minutes"], f"{where}.minutes", positive=False))


def _usage_metadata(value: object, where: str) -> tuple[int, float]:
    """Validate ``usageMetadata``; return (all tokens added up, all minutes added up)."""
    meta = _object(value, where, _METADATA_FIELDS)
    if "schemaVersion" not in meta:
        raise PayloadError(f"{where}.schemaVersion", "is required")
    version = meta["schemaVersion"]
    if isinstance(version, bool) or version != 1 or not isinstance(version, int):
        raise PayloadError(f"{where}.schemaVersion", f"must be the integer 1, got {version!r}")
    tokens: list[int] = []
    minutes: list[float] = []
    for side, modalities in _SIDES.items():
        if side in meta:
            side_where = f"{where}.{side}"
            entries = _object(meta[side], side_where, modalities)
            if not entries:
                raise PayloadError(side_where, "must not be empty (leave it out instead)")
            for modality, usage in entries.items():
                _quantity(usage, f"{side_where}.{modality}", _MODALITY_FIELDS, tokens, minutes)
    if "cached" in meta:
        cached_where = f"{where}.cached"
        cached = _object(meta["cached"], cached_where, _CACHED_MODALITIES | _TOKENS_ONLY)
        if not cached:
            raise PayloadError(cached_where, "must not be empty (leave it out instead)")
        if "tokens" in cached:
            if len(cached) > 1:
                raise PayloadError(
                    cached_where,
                    'either {"tokens": N} or per-modality text/audio/image counts, never both',
                )
            tokens.append(_integer(cached["tokens"], f"{cached_where}.tokens", 0))
        else:
            for modality, usage in cached.items():
                _quantity(usage, f"{cached_where}.{modality}", _TOKENS_ONLY, tokens, minutes)
    if "connection" in meta:
        connection_where = f"{where}.connection"
        connection = _object(meta["connection"], connection_where, _MINUTES_ONLY)
        if "minutes" not in connection:
            raise PayloadError(f"{connection_where}.minutes", "is required")
        minutes.append(
            _minutes(connection["minutes"], f"{connection_where}.minutes", positive=False)
        )
    return sum(tokens), math.fsum(minutes)


def _meta_tags(value: object) -> None:
    if not isinstance(value, dict):
        raise PayloadError("metaTags", f"must be a JSON object, got {_json_type(value)}")
    if len(value) > _MAX_META_TAGS:
        raise PayloadError("metaTags", f"at most {_MAX_META_TAGS} entries, got {len(value)}")
    for key, tag in value.items():
        if not _META_KEY.fullmatch(key):
            raise PayloadError(f"metaTags.{key}", "key must be 1-64 characters of A-Z a-z 0-9 _ -")
        if not isinstance(tag, str):
            raise PayloadError(f"metaTags.{key}", f"must be a string, got {_json_type(tag)}")
        if len(tag) > _MAX_META_VALUE:
            raise PayloadError(
                f"metaTags.{key}", f"at most {_MAX_META_VALUE} characters, got {len(tag)}"
            )


def validate_usage(
    document: object, *, body: str, received_at: float, idempotency_key: str | None
) -> UsageRow:
    """Check one parsed ``/api/v2/usage`` body against the documented shape.

    Returns the ledger row it becomes; raises :class:`PayloadError` naming the first field
    that breaks a rule. Unknown fields are errors at every level.
    """
    doc = _object(document, "body", _TOP_FIELDS)
    for name in ("agentId", "customerId", "indicator", "rawUsage"):
        if name not in doc:
            raise PayloadError(name, "is required")
    agent_id = _string(doc["agentId"], "agentId", required=True)
    customer_id = _string(doc["customerId"], "customerId", required=True)
    indicator = _string(doc["indicator"], "indicator", required=False)
    raw = _object(doc["rawUsage"], "rawUsage", _RAW_USAGE_FIELDS)
    for name in ("provider", "model", "plan"):
        if name not in raw:
            raise PayloadError(f"rawUsage.{name}", "is required")
    provider = _string(raw["provider"], "rawUsage.provider", required=False)
    model = _string(raw["model"], "rawUsage.model", required=False)
    plan = _string(raw["plan"], "rawUsage.plan", required=False)
    quantity = _raw_quantity(raw)
    meta_tags: str | None = None
    if "metaTags" in doc:
        _meta_tags(doc["metaTags"])
        meta_tags = json.dumps(doc["metaTags"], separators=(",", ":"))
    return UsageRow(
        received_at=received_at,
        idempotency_key=idempotency_key,
        agent_id=agent_id,
        customer_id=customer_id,
        indicator=indicator,
        kind=quantity.kind,
        provider=provider,
        model=model,
        plan=plan,
        audio_minutes=quantity.audio_minutes,
        characters=quantity.characters,
        usage_metadata=quantity.usage_metadata,
        sts_tokens=quantity.sts_tokens,
        sts_minutes=quantity.sts_minutes,
        meta_tags=meta_tags,
        body=body,
    )


class _Quantity(NamedTuple):
    """The usage ``rawUsage`` carries: its kind and the ledger columns of that kind."""

    kind: str
    audio_minutes: float | None = None
    characters: int | None = None
    usage_metadata: str | None = None
    sts_tokens: int | None = None
    sts_minutes: float | None = None


def _raw_quantity(raw: dict[str, Any]) -> _Quantity:
    """The one quantity field of ``rawUsage`` (``audioDuration``, ``characterCount`` or
    ``usageMetadata``), validated."""
    present = [name for name in _KIND_BY_FIELD if name in raw]
    if len(present) != 1:
        raise PayloadError(
            "rawUsage",
            "needs exactly one of audioDuration (STT), characterCount (TTS), "
            f"usageMetadata (STS), got {' and '.join(present) or 'none'}",
        )
    (field,) = present
    kind = _KIND_BY_FIELD[field]
    if field == "audioDuration":
        return _Quantity(
            kind, audio_minutes=_minutes(raw[field], f"rawUsage.{field}", positive=True)
        )
    if field == "characterCount":
        return _Quantity(kind, characters=_integer(raw[field], f"rawUsage.{field}", 1))
    sts_tokens, sts_minutes = _usage_metadata(raw[field], f"rawUsage.{field}")
    return _Quantity(
        kind,
        usage_metadata=json.dumps(raw[field], separators=(",", ":")),
        sts_tokens=sts_tokens,
        sts_minutes=sts_minutes,
    )


def _customer_document(document: object, **_request: object) -> dict[str, Any]:
    """A ``create-or-get`` body: any JSON object (the sandbox stores no customer)."""
    if not isinstance(document, dict):
        raise PayloadError("body", f"must be a JSON object, got {_json_type(document)}")
    return document


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


# Python's json accepts NaN and Infinity, which are not JSON and no Paygent parser takes.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


# --------------------------------------------------------------------------- the app


class _Refusal(Exception):
    """Stops a request early with an error answer (logged like every answer)."""

    def __init__(
        self, status: int, outcome: Outcome, error: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.outcome = outcome
        self.error = error
        self.headers = headers


class SandboxApp:
    """A local Paygent: the ASGI app (:attr:`asgi`), its faults and its counters.

    ``writer`` must only be used by the event loop that serves :attr:`asgi`.
    """

    def __init__(
        self,
        writer: LedgerWriter,
        *,
        api_key: str | None = None,
        faults: Faults | None = None,
        page_spools: Sequence[Path] = (),
    ) -> None:
        self.writer = writer
        """Where accepted usage and the request log go."""
        self._api_key = api_key.encode() if api_key else None
        self._faults = faults if faults is not None else Faults()
        self._rng = random.Random(self._faults.seed)
        self._counts: Counter[str] = Counter()
        self._refused: Counter[int] = Counter()
        self.asgi = Starlette(
            routes=[
                Route(USAGE_PATH, self._usage, methods=["POST"]),
                Route(CUSTOMERS_PATH, self._customer, methods=["POST"]),
                Route(AUTH_CHECK_PATH, self._auth_check, methods=["GET"]),
                *(Route(p, self._health, methods=["GET"]) for p in ("/health", "/healthz")),
                Route("/_sandbox/stats", self._stats, methods=["GET"]),
                Route("/_sandbox/faults", self._get_faults, methods=["GET"]),
                Route("/_sandbox/faults", self._post_faults, methods=["POST"]),
                *self._page_routes(page_spools),
            ]
        )
        """The Starlette application to serve."""

    def _page_routes(self, spools: Sequence[Path]) -> list[Route]:
        """``GET /usage``: the usage page over the ledger (and ``spools``, when given)."""
        from paygent_otel._web.usage_page import USAGE_PAGE_PATH
        from paygent_otel.sandbox.usage import sandbox_page

        return [Route(USAGE_PAGE_PATH, sandbox_page(self, spools), methods=["GET"])]

    @property
    def has_api_key(self) -> bool:
        """True when ``api_key`` was given (else any non-empty key is accepted)."""
        return self._api_key is not None

    def accepts_key(self, key: str) -> bool:
        """True for the configured API key (never when none is configured)."""
        return self._api_key is not None and hmac.compare_digest(key.encode(), self._api_key)

    @property
    def faults(self) -> Faults:
        """The fault settings in force."""
        return self._faults

    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault settings (the others stay); returns the new settings.

        Safe to call from another thread: the settings are replaced in one assignment.
        A ``seed`` in ``changes`` restarts the random sequence.
        """
        faults = self._faults.replace(**changes)
        if "seed" in changes:
            self._rng = random.Random(faults.seed)
        self._faults = faults
        return faults

    def stats(self) -> dict[str, Any]:
        """Counts since this app was created (the body of ``GET /_sandbox/stats``).

        ``requests`` counts requests to Paygent API routes; ``rejected`` maps each non-2xx
        status answered to its count (injected failures and rejections included).
        """
        return {
            "requests": self._counts["requests"],
            "accepted": self._counts[Outcome.ACCEPTED],
            "duplicates": self._counts[Outcome.DUPLICATE],
            "injected_failures": self._counts[Outcome.INJECTED_FAILURE],
            "injected_rejections": self._counts[Outcome.INJECTED_REJECTION],
            "rejected": {str(status): n for status, n in sorted(self._refused.items())},
        }

    # ----------------------------------------------------------------- Paygent API routes

    async def _usage(self, request: Request) -> Response:
        return await self._api_call(request, validate_usage, self._record)

    async def _customer(self, request: Request) -> Response:
        return await self._api_call(request, _customer_document, self._acknowledge_customer)

    async def _record(self, row: UsageRow, received_at: float, key: str | None) -> Response:
        """Store an accepted usage record, or acknowledge a repeat of its Idempotency-Key."""
        usage_id = self.writer.usage_id(key) if key is not None else None
        if usage_id is not None:
            self.writer.log_request(received_at, "POST", USAGE_PATH, key, 200, Outcome.DUPLICATE)
            await self.writer.committed()
            self._counts[Outcome.DUPLICATE] += 1
            return JSONResponse({"id": usage_id, "duplicate": True})
        usage_id = self.writer.record_usage(row, "POST", USAGE_PATH)
        await self.writer.committed()
        self._counts[Outcome.ACCEPTED] += 1
        return JSONResponse({"id": usage_id, "duplicate": False})

    async def _acknowledge_customer(
        self, document: dict[str, Any], received_at: float, key: str | None
    ) -> Response:
        """Answer ``create-or-get`` as Paygent does; the sandbox stores no customer."""
        self.writer.log_request(received_at, "POST", CUSTOMERS_PATH, key, 200, Outcome.CUSTOMER)
        await self.writer.committed()
        external_id = document.get("externalId")
        return JSONResponse(
            {
                "id": f"sandbox-{external_id}",
                "externalId": external_id,
                "name": document.get("name"),
            }
        )

    async def _api_call(
        self,
        request: Request,
        parse: Callable[..., _Parsed],
        answer: Callable[[_Parsed, float, str | None], Awaitable[Response]],
    ) -> Response:
        """One Paygent API request: admit it (:meth:`_admit`), decode its JSON body and
        ``parse`` it, or answer the refusal; then count it and let ``answer`` reply.

        ``parse(document, body=, received_at=, idempotency_key=)`` raises
        :class:`PayloadError` for a body of the wrong shape.
        """
        received_at = time.time()
        # One pass over the raw header list; Starlette's Headers scans it per lookup.
        headers: dict[bytes, bytes] = dict(request.scope["headers"])
        key = headers.get(b"idempotency-key", b"").decode("latin-1") or None
        try:
            text = await self._admit(request, headers)
            try:
                document = _DECODER.decode(text)
                parsed = parse(document, body=text, received_at=received_at, idempotency_key=key)
            except PayloadError as exc:
                raise _Refusal(400, Outcome.INVALID, str(exc)) from None
            except ValueError as exc:
                raise _Refusal(400, Outcome.INVALID, f"body: not valid JSON: {exc}") from None
        except _Refusal as refusal:
            return await self._refuse(request, received_at, key, refusal)
        self._counts["requests"] += 1
        return await answer(parsed, received_at, key)

    async def _admit(self, request: Request, headers: dict[bytes, bytes]) -> str:
        """Faults, auth and content type, shared by the API routes; returns the body text."""
        faults = self._faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000.0)
        if _draw(self._rng, faults.fail_rate):
            raise _Refusal(
                faults.fail_status,
                Outcome.INJECTED_FAILURE,
                f"sandbox injected failure ({faults.fail_status})",
                None if faults.retry_after is None else {"Retry-After": str(faults.retry_after)},
            )
        if _draw(self._rng, faults.reject_rate):
            raise _Refusal(400, Outcome.INJECTED_REJECTION, INJECTED_REJECTION_ERROR)
        self._check_key(headers)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise _Refusal(
                415,
                Outcome.INVALID,
                f"content-type must be application/json, got {content_type or 'none'!r}",
            )
        body = await request.body()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refusal(400, Outcome.INVALID, f"body: not UTF-8: {exc}") from None

    def _check_key(self, headers: dict[bytes, bytes]) -> None:
        """The ``paygent-api-key`` check of every API route (401 when it fails)."""
        api_key = headers.get(b"paygent-api-key", b"")
        if not api_key:
            raise _Refusal(401, Outcome.UNAUTHORIZED, "missing paygent-api-key header")
        if self._api_key is not None and not hmac.compare_digest(api_key, self._api_key):
            raise _Refusal(401, Outcome.UNAUTHORIZED, "invalid paygent-api-key")

    async def _auth_check(self, request: Request) -> Response:
        """``GET /api/v2/auth-check``: the key check alone, for ``paygent-otel doctor``."""
        try:
            self._check_key(dict(request.scope["headers"]))
        except _Refusal as refusal:
            return JSONResponse({"error": refusal.error}, refusal.status)
        return JSONResponse({"ok": True, "sandbox": True})

    async def _refuse(
        self, request: Request, received_at: float, key: str | None, refusal: _Refusal
    ) -> Response:
        self._counts["requests"] += 1
        self._counts[refusal.outcome] += 1
        self._refused[refusal.status] += 1
        self.writer.log_request(
            received_at, request.method, request.scope["path"], key, refusal.status, refusal.outcome
        )
        await self.writer.committed()
        return JSONResponse({"error": refusal.error}, refusal.status, headers=refusal.headers)

    # ----------------------------------------------------------------- admin routes

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _get_faults(self, request: Request) -> Response:
        return JSONResponse(self._faults.to_dict())

    async def _post_faults(self, request: Request) -> Response:
        try:
            changes = _DECODER.decode((await request.body()).decode("utf-8"))
            if not isinstance(changes, dict):
                raise ValueError(f"body must be a JSON object, got {_json_type(changes)}")
            faults = self.set_faults(**changes)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(faults.to_dict())


def _draw(rng: random.Random, rate: float) -> bool:
    # Rates 0 and 1 consume no draw, so switching one fault on or off does not shift the
    # seeded sequence of the other.
    if rate <= 0.0:
        return False
    return rate >= 1.0 or rng.random() < rate
