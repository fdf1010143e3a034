"""The ``serve`` command: run the OTLP bridge in the foreground."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Final

from .._config import (
    MEMORY_SPOOL,
    PAYGENT_BRIDGE_TOKEN,
    ExporterConfig,
    add_setting_flags,
    flag_type,
    flag_values,
    read_setting,
)
from .._units import parse_duration, parse_size
from .auth import BearerAuth, TokenError, is_loopback
from .config import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_ATTRIBUTE_LENGTH,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PORT,
    BridgeConfig,
    Limits,
)

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
  paygent-otel serve --endpoint http://127.0.0.1:8787 --spool /tmp/bridge.sqlite3
      deliver to a local sandbox (`paygent-otel sandbox`)

token file: one token per line, optionally `=agent1,agent2` to limit the agent ids
its records may bill; records for other agents are rejected (partial_success) and
dead-lettered. Tokens: 16+ characters of A-Z a-z 0-9 . _ ~ + / -.

endpoints: POST /v1/traces, /v1/metrics, /v1/logs (protobuf or JSON, gzip or
plain); GET /health; GET /metrics (Prometheus text). Stop with Ctrl-C or SIGTERM:
requests in progress finish, pending records are flushed or stay in the spool.
"""


def _whole_seconds(text: str) -> int:
    return math.ceil(parse_duration(text))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command to the ``paygent-otel`` parser."""
    serve = commands.add_parser(
        "serve",
        help="receive OTLP/HTTP (from a Collector) and bill the usage it carries",
        description=(
            "Run the OTLP/HTTP bridge: a receiver for /v1/traces, /v1/metrics and /v1/logs "
            "that turns usage-bearing spans, metric points and log records into Paygent "
            "tracking calls. A request is acknowledged once its records are in the durable "
            "spool; delivery to Paygent follows in the background, with retries. The API "
            "key comes from --api-key-file or PAYGENT_API_KEY."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen = serve.add_argument_group("listening")
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
    listen.add_argument(
        "--graceful-timeout",
        type=flag_type(_whole_seconds),
        default=DEFAULT_GRACEFUL_TIMEOUT,
        metavar="DURATION",
        help="on stop, how long requests in progress may take (30s, 2m; bare: seconds; "
        f"default {DEFAULT_GRACEFUL_TIMEOUT}s)",
    )
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
    limits = serve.add_argument_group("limits (each breach answered with its own status)")
    limits.add_argument(
        "--max-request-bytes",
        type=flag_type(parse_size),
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="SIZE",
        help="request body as received, 413 beyond (8MiB, 1000000; bare: bytes; "
        f"default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    limits.add_argument(
        "--max-decompressed-bytes",
        type=flag_type(parse_size),
        default=DEFAULT_MAX_DECOMPRESSED_BYTES,
        metavar="SIZE",
        help=f"body after gzip, 413 beyond (bare: bytes; default {DEFAULT_MAX_DECOMPRESSED_BYTES})",
    )
    limits.add_argument(
        "--max-items",
        type=int,
        default=DEFAULT_MAX_ITEMS,
        metavar="N",
        help=f"spans/points/log records per request, 413 beyond (default {DEFAULT_MAX_ITEMS})",
    )
    limits.add_argument(
        "--max-attribute-length",
        type=int,
        default=DEFAULT_MAX_ATTRIBUTE_LENGTH,
        metavar="N",
        help="longest paygent.* attribute on a usage record; longer ones reject the record "
        f"(default {DEFAULT_MAX_ATTRIBUTE_LENGTH})",
    )
    limits.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        metavar="N",
        help="export requests processed at once, 429 + Retry-After beyond "
        f"(default {DEFAULT_MAX_CONCURRENT_REQUESTS})",
    )
    serve.set_defaults(handler=run_serve)


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


def run_serve(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM; returns the exit status."""
    # The server extra (uvicorn, starlette) is needed only here, not to build the parser.
    from .app import BridgeApp
    from .server import BridgeServer, bind_socket, run_until_signalled

    try:
        auth = _auth(args)
    except TokenError as exc:
        return _fail(str(exc))
    if not is_loopback(args.host) and not auth.required:
        return _fail(
            f"refusing to listen on {args.host} without a bearer token: anyone who can reach "
            "this port could bill usage to your Paygent account. Pass --token-file FILE (or "
            f"set {PAYGENT_BRIDGE_TOKEN}), or listen on 127.0.0.1"
        )
    for name in ("max_request_bytes", "max_decompressed_bytes", "max_items"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    try:
        api_key = _api_key(args)
    except ValueError as exc:
        return _fail(str(exc))
    settings = flag_values(args)
    settings["api_key"] = api_key
    exporter = ExporterConfig.resolve(None, **settings)
    if exporter.delivery_blocked:
        # A service that could not deliver would take usage in and hold it silently.
        return _fail(f"cannot deliver: {exporter.delivery_blocked}")
    if not exporter.api_key and not exporter.durable:
        # Every request would be refused: nothing can be sent, nothing can be kept.
        return _fail(
            f"set PAYGENT_API_KEY or pass --api-key-file FILE (or use a durable --spool "
            f"instead of {MEMORY_SPOOL})"
        )
    config = BridgeConfig(
        exporter=exporter,
        auth=auth,
        limits=Limits(
            max_request_bytes=args.max_request_bytes,
            max_decompressed_bytes=args.max_decompressed_bytes,
            max_items=args.max_items,
            max_attribute_length=args.max_attribute_length,
            max_concurrent_requests=max(1, args.max_concurrent_requests),
        ),
        flush_timeout=exporter.flush_timeout,
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    try:
        app = BridgeApp(config)
    except Exception as exc:
        sock.close()
        _logger.debug("bridge start failed", exc_info=True)
        return _fail(f"cannot open the spool {exporter.spool_path}: {exc}")
    server = BridgeServer(app, args.host, graceful_timeout=args.graceful_timeout)
    server.start(sock=sock)
    # Tests and scripts wait for this exact line (LISTENING_LINE_PREFIX + URL).
    print(f"{LISTENING_LINE_PREFIX}{server.url}", flush=True)
    print(
        f"spool: {exporter.spool_path}; delivering to {exporter.endpoint}"
        + ("" if auth.required else "; no bearer token required (loopback only)"),
        flush=True,
    )
    signalled = run_until_signalled(server)
    print("paygent-otel bridge stopped", flush=True)
    return 0 if signalled else 1
