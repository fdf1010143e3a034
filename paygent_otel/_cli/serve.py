"""The ``serve`` command: run the OTLP bridge in the foreground."""

from __future__ import annotations

import argparse
import logging
import math
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from paygent_otel._output import add_command
from paygent_otel.bridge.auth import BearerAuth, TokenError, is_loopback
from paygent_otel.bridge.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DRAIN_GRACE,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_ATTRIBUTE_LENGTH,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_REQUESTS_PER_TOKEN,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_PORT,
    DEFAULT_RATE_LIMIT_PER_TOKEN,
    BridgeConfig,
    Limits,
)
from paygent_otel.delivery.config import (
    MEMORY_SPOOL,
    PAYGENT_BRIDGE_TOKEN,
    ExporterConfig,
    add_setting_flags,
    flag_type,
    flag_values,
    read_setting,
)
from paygent_otel.delivery.units import parse_duration, parse_size

if TYPE_CHECKING:
    from paygent_otel.bridge.server import TlsFiles

__all__ = ["LISTENING_LINE_PREFIX", "PAYGENT_BRIDGE_TOKEN", "register", "run_serve"]

_logger = logging.getLogger("paygent_otel.bridge")

LISTENING_LINE_PREFIX: Final = "paygent-otel bridge listening on "
"""``serve`` prints this, then the URL, once it accepts connections."""

_EPILOG = """\
examples:
  PAYGENT_API_KEY=... paygent-otel serve
      listen on http://127.0.0.1:4319, spool in ~/.local/state/paygent-otel/
  paygent-otel serve --host 0.0.0.0 --token-file /etc/paygent/bridge-tokens
      listen on every interface; senders must send Authorization: Bearer <token>
  paygent-otel serve --host 0.0.0.0 --token-file tokens --tls-cert crt.pem --tls-key key.pem
      the same over HTTPS: tokens do not cross the network in clear text
  paygent-otel serve --endpoint http://127.0.0.1:8787 --spool /tmp/bridge.sqlite3
      deliver to a local sandbox (`paygent-otel sandbox`)
  PGPASSWORD=... paygent-otel serve --spool postgresql://paygent@db.internal/billing
      one of several replicas sharing a queue, dead letters and delivered keys

token file: one token per line, optionally `=agent1,agent2` to limit the agent ids
its records may bill; records for other agents are rejected (partial_success) and
dead-lettered. Tokens: 16+ characters of A-Z a-z 0-9 . _ ~ + / -.

endpoints: POST /v1/traces, /v1/metrics, /v1/logs (protobuf or JSON, gzip or
plain); GET /health; GET /metrics (Prometheus text). Stop with Ctrl-C, or SIGTERM,
which first drains for --drain-grace seconds (/health and exports answer 503):
requests in progress finish, pending records are flushed or stay in the spool, and
the bridge prints how many records it took and how many are left for delivery.

Every limit and timeout, with its default: docs/bridge.md, "Limits and timeouts".
"""


def _whole_seconds(text: str) -> int:
    return math.ceil(parse_duration(text))


_PARSERS: Final[dict[str, Callable[[str], int | float]]] = {
    "count": int,
    "size": flag_type(parse_size),
    "duration": flag_type(parse_duration),
    "rate": float,
}
"""How a limit flag's value is read: sizes take units (64KiB; bare: bytes), durations too
(10s, 500ms; bare: seconds)."""

_LIMIT_FLAGS: Final[dict[str, tuple[tuple[str, str, int | float, str, str], ...]]] = {
    "limits (each breach answered with its own status)": (
        ("--max-request-bytes", "size", DEFAULT_MAX_REQUEST_BYTES, "SIZE",
         "request body as received, 413 beyond"),
        ("--max-decompressed-bytes", "size", DEFAULT_MAX_DECOMPRESSED_BYTES, "N",
         "body after gzip, 413 beyond"),
        ("--max-items", "count", DEFAULT_MAX_ITEMS, "N",
         "spans/points/log records per request, 413 beyond"),
        ("--max-attribute-length", "count", DEFAULT_MAX_ATTRIBUTE_LENGTH, "N",
         "longest paygent.* attribute on a usage record; longer ones reject the record"),
        ("--max-concurrent-requests", "count", DEFAULT_MAX_CONCURRENT_REQUESTS, "N",
         "export requests processed at once, 429 + Retry-After beyond"),
        ("--max-requests-per-token", "count", DEFAULT_MAX_REQUESTS_PER_TOKEN, "N",
         "export requests one token may have in progress, 429 beyond"),
        ("--rate-limit-per-token", "rate", DEFAULT_RATE_LIMIT_PER_TOKEN, "R",
         "export requests per second per token (bursts of 2R), 429 beyond; 0: off"),
        ("--memory-budget", "size", DEFAULT_MEMORY_BUDGET, "N",
         "bytes all bodies being read and inflated may hold together, 503 beyond"),
    ),
    "connections": (
        ("--max-connections", "count", DEFAULT_MAX_CONNECTIONS, "N",
         "open connections; a new one evicts the longest-idle one, or is refused with 503 "
         "when all are busy"),
        ("--max-header-bytes", "size", DEFAULT_MAX_HEADER_BYTES, "N",
         "request line and headers, 431 beyond"),
        ("--header-timeout", "duration", DEFAULT_HEADER_TIMEOUT, "S",
         "seconds to send a complete request head, 408 beyond"),
        ("--body-timeout", "duration", DEFAULT_BODY_TIMEOUT, "S",
         "seconds a body may take before --min-body-rate applies"),
        ("--min-body-rate", "size", DEFAULT_MIN_BODY_RATE, "B",
         "bytes/s a body must average after --body-timeout, 408 below"),
        ("--keep-alive-timeout", "duration", DEFAULT_KEEP_ALIVE_TIMEOUT, "S",
         "seconds an idle connection stays open"),
    ),
}  # fmt: skip
"""``serve``'s limit flags by help group: flag, kind (:data:`_PARSERS`), default, metavar,
help."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command to the ``paygent-otel`` parser."""
    serve = add_command(
        commands,
        "serve",
        help="receive OTLP/HTTP (from a Collector) and bill the usage it carries",
        description=(
            "Run the OTLP/HTTP bridge: a receiver for /v1/traces, /v1/metrics and /v1/logs\n"
            "that turns usage-bearing spans, metric points and log records into Paygent\n"
            "tracking calls. A request is acknowledged once its records are in the durable\n"
            "spool; delivery to Paygent follows in the background, with retries. The API\n"
            "key comes from --api-key-file or PAYGENT_API_KEY."
        ),
        epilog=_EPILOG,
        handler=run_serve,
    )
    _add_listening_flags(serve.add_argument_group("listening"))
    delivery = serve.add_argument_group(
        "delivery (each flag's default: its OTEL_EXPORTER_PAYGENT_* variable, see "
        "docs/configuration.md; the cumulative-metric state goes beside the spool, and "
        f"--spool {MEMORY_SPOOL} refuses cumulative metrics)"
    )
    add_setting_flags(delivery)
    delivery.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="read the Paygent API key from FILE (default: $PAYGENT_API_KEY)",
    )
    for title, flags in _LIMIT_FLAGS.items():
        group = serve.add_argument_group(title)
        for flag, kind, default, metavar, text in flags:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            group.add_argument(
                flag,
                type=_PARSERS[kind],
                default=default,
                metavar=metavar,
                help=f"{text} (default {shown})",
            )


def _add_listening_flags(listen: argparse._ArgumentGroup) -> None:
    """Where and how ``serve`` listens, who may send, and how it stops."""
    listen.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})"
    )
    listen.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    listen.add_argument(
        "--token",
        metavar="TOKEN[=AGENTS]",
        help=f"a bearer token senders must present (visible in the process list: prefer "
        f"--token-file or ${PAYGENT_BRIDGE_TOKEN})",
    )
    listen.add_argument(
        "--token-file", metavar="FILE", help="bearer tokens, one per line (see below)"
    )
    listen.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    listen.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    listen.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS; then a bearer token "
        "is optional off loopback)",
    )
    listen.add_argument(
        "--drain-grace",
        type=_PARSERS["duration"],
        default=DEFAULT_DRAIN_GRACE,
        metavar="DURATION",
        help="on SIGTERM, how long /health and exports answer 503 before the listener "
        f"closes, so load balancers stop sending (5s, 0; default {DEFAULT_DRAIN_GRACE:g}s)",
    )
    listen.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="bridge processes accepting on the port and sharing the spool (default 1); "
        "one process spools about 8,000 usage spans/s, bound by Python's GIL",
    )
    listen.add_argument(
        "--graceful-timeout",
        type=flag_type(_whole_seconds),
        default=DEFAULT_GRACEFUL_TIMEOUT,
        metavar="DURATION",
        help="on stop, how long requests in progress may take (30s, 2m; bare: seconds; "
        f"default {DEFAULT_GRACEFUL_TIMEOUT}s)",
    )


def _auth(args: argparse.Namespace) -> BearerAuth:
    auth = BearerAuth()
    token = args.token or read_setting(PAYGENT_BRIDGE_TOKEN)
    if token:
        source = "--token" if args.token else PAYGENT_BRIDGE_TOKEN
        auth = BearerAuth.parse([token], source)
    if args.token_file:
        auth = auth.merged(BearerAuth.from_file(args.token_file))
    return auth


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file`` (None without the flag: the env var applies)."""
    if not args.api_key_file:
        return None
    try:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(
            f"cannot read the API key file {args.api_key_file}: {exc.strerror}"
        ) from None
    if not key:
        raise ValueError(f"the API key file {args.api_key_file} is empty")
    return key


def _fail(message: str) -> int:
    print(f"paygent-otel serve: {message}", file=sys.stderr, flush=True)
    return 2


class _Unusable(Exception):
    """A flag, file or setting ``serve`` cannot run with (exit status 2, the message)."""


def run_serve(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM; returns the exit status."""
    # The server extra (uvicorn, starlette) is needed only here, not to build the parser.
    from paygent_otel.bridge.server import (
        bind_socket,
        keep_large_buffers_returnable,
        raise_open_file_limit,
    )

    try:
        auth = _auth_for_host(args)
        if args.workers < 1:
            raise _Unusable("--workers must be at least 1")
        limits = _limits(args)
        tls = _tls(args)
        config = _bridge_config(args, auth, limits)
    except _Unusable as exc:
        return _fail(str(exc))
    keep_large_buffers_returnable()
    files = raise_open_file_limit()
    if files < args.max_connections + 64:
        _logger.warning(
            "bridge: the open-file limit (%d) is below --max-connections (%d) plus room for "
            "the spool and delivery; raise `ulimit -n` or lower --max-connections",
            files,
            args.max_connections,
        )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    if args.workers > 1:
        return _run_workers(config, sock, args)
    return _run_one(config, sock, args, tls)


def _auth_for_host(args: argparse.Namespace) -> BearerAuth:
    """The bearer tokens; none is refused off loopback (unless client certificates)."""
    try:
        auth = _auth(args)
    except TokenError as exc:
        raise _Unusable(str(exc)) from None
    if not is_loopback(args.host) and not auth.required and not args.tls_client_ca:
        raise _Unusable(
            f"refusing to listen on {args.host} without a bearer token: anyone who can reach "
            "this port could bill usage to your Paygent account. Pass --token-file FILE (or "
            f"set {PAYGENT_BRIDGE_TOKEN}) or --tls-client-ca, or listen on 127.0.0.1"
        )
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise _Unusable("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
    return auth


def _limits(args: argparse.Namespace) -> Limits:
    """The limit flags' values, each checked for its kind."""
    values = {}
    for flags in _LIMIT_FLAGS.values():
        for flag, kind, _, _, _ in flags:
            value = values[flag] = getattr(args, flag[2:].replace("-", "_"))
            if kind in ("count", "size") and value < 1:
                raise _Unusable(f"{flag} must be at least 1")
            if (kind == "duration" and value <= 0) or (kind == "rate" and value < 0):
                raise _Unusable(f"{flag} must be more than 0")
    return Limits(**{flag[2:].replace("-", "_"): value for flag, value in values.items()})


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    """The bridge's own TLS files, checked by loading them (None: plain HTTP)."""
    from paygent_otel.bridge.server import TlsFiles

    if not args.tls_cert:
        return None
    tls = TlsFiles(
        cert=Path(args.tls_cert),
        key=Path(args.tls_key),
        client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )
    try:
        tls.context()
    except (OSError, ssl.SSLError) as exc:
        raise _Unusable(f"cannot use the TLS files: {exc}") from None
    return tls


def _bridge_config(args: argparse.Namespace, auth: BearerAuth, limits: Limits) -> BridgeConfig:
    """The delivery settings (flags, then environment) and everything else, checked."""
    try:
        api_key = _api_key(args)
    except ValueError as exc:
        raise _Unusable(str(exc)) from None
    settings = flag_values(args)
    settings["api_key"] = api_key
    exporter = ExporterConfig.resolve(None, **settings)
    if exporter.delivery_blocked:
        # A service that could not deliver would take usage in and hold it silently.
        raise _Unusable(f"cannot deliver: {exporter.delivery_blocked}")
    if not exporter.api_key and not exporter.durable:
        # Every request would be refused: nothing can be sent, nothing can be kept.
        raise _Unusable(
            f"set PAYGENT_API_KEY or pass --api-key-file FILE (or use a durable --spool "
            f"instead of {MEMORY_SPOOL})"
        )
    return BridgeConfig(
        exporter=exporter, auth=auth, limits=limits, flush_timeout=exporter.flush_timeout
    )


def _run_one(
    config: BridgeConfig, sock: socket.socket, args: argparse.Namespace, tls: TlsFiles | None
) -> int:
    """One bridge process serving ``sock`` until a signal; the exit status."""
    from paygent_otel.bridge.app import BridgeApp
    from paygent_otel.bridge.server import BridgeServer, run_until_signalled

    exporter = config.exporter
    try:
        app = BridgeApp(config)
    except Exception as exc:
        sock.close()
        _logger.debug("bridge start failed", exc_info=True)
        return _fail(f"cannot open the spool {exporter.spool_path}: {exc}")
    server = BridgeServer(
        app,
        args.host,
        graceful_timeout=args.graceful_timeout,
        drain_grace=args.drain_grace,
        tls=tls,
    )
    server.start(sock=sock)
    # Tests and scripts wait for this exact line (LISTENING_LINE_PREFIX + URL).
    print(f"{LISTENING_LINE_PREFIX}{server.url}", flush=True)
    print(
        f"spool: {exporter.spool_path}; delivering to {exporter.endpoint}"
        + ("" if config.auth.required else "; no bearer token required (loopback only)"),
        flush=True,
    )
    signalled = run_until_signalled(server)
    print(
        f"paygent-otel bridge stopped: {app.handed_to_spool} usage records handed to the "
        f"spool by this run; {app.left_in_spool} left in {exporter.spool_path} for delivery",
        flush=True,
    )
    return 0 if signalled else 1


def _run_workers(config: BridgeConfig, sock: socket.socket, args: argparse.Namespace) -> int:
    """``--workers N``: the spool is checked here, then N processes serve (workers.py)."""
    from paygent_otel._web.serving import base_url
    from paygent_otel.bridge.workers import run_workers
    from paygent_otel.delivery.spool import open_spool

    exporter = config.exporter
    try:
        open_spool(exporter.spool_path, max_bytes=exporter.spool_max_bytes).close()
    except Exception as exc:
        sock.close()
        return _fail(f"cannot open the spool {exporter.spool_path}: {exc}")
    print(f"{LISTENING_LINE_PREFIX}{base_url(args.host, sock.getsockname()[1])}", flush=True)
    print(f"spool: {exporter.spool_path}; delivering to {exporter.endpoint}; "
          f"{args.workers} worker processes", flush=True)  # fmt: skip
    status = run_workers(config, sock, args.host, args.graceful_timeout, args.workers)
    print("paygent-otel bridge stopped", flush=True)
    return status
