"""The ``serve`` command: run the OTLP bridge in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Final

from .._config import MEMORY_SPOOL, ExporterConfig
from .auth import BearerAuth, TokenError, is_loopback
from .config import (
    DEFAULT_FLUSH_TIMEOUT,
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

PAYGENT_BRIDGE_TOKEN: Final = "PAYGENT_BRIDGE_TOKEN"  # noqa: S105 (a variable name)
"""Environment variable holding one bearer token (``TOKEN`` or ``TOKEN=agent1,agent2``)."""
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
  PGPASSWORD=... paygent-otel serve --spool postgresql://paygent@db.internal/billing
      one of several replicas sharing a queue, dead letters and delivered keys

token file: one token per line, optionally `=agent1,agent2` to limit the agent ids
its records may bill; records for other agents are rejected (partial_success) and
dead-lettered. Tokens: 16+ characters of A-Z a-z 0-9 . _ ~ + / -.

endpoints: POST /v1/traces, /v1/metrics, /v1/logs (protobuf or JSON, gzip or
plain); GET /health; GET /metrics (Prometheus text). Stop with Ctrl-C or SIGTERM:
requests in progress finish, pending records are flushed or stay in the spool.
"""


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
            "key comes from PAYGENT_API_KEY."
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
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="bridge processes accepting on the port and sharing the spool (default 1); "
        "one process spools about 8,000 usage spans/s, bound by Python's GIL",
    )
    listen.add_argument(
        "--graceful-timeout",
        type=int,
        default=DEFAULT_GRACEFUL_TIMEOUT,
        metavar="S",
        help=f"on stop, seconds requests in progress may take (default {DEFAULT_GRACEFUL_TIMEOUT})",
    )
    delivery = serve.add_argument_group("delivery (defaults from the OTEL_EXPORTER_PAYGENT_* env)")
    delivery.add_argument("--endpoint", help="Paygent API base URL")
    delivery.add_argument(
        "--spool",
        metavar="FILE|URL",
        help="durable spool (SQLite); cumulative-metric state goes beside it. A postgresql:// "
        "URL: one spool every replica shares (pip install 'paygent-otel[postgres]'; password "
        "masked in logs, prefer PGPASSWORD). "
        f"{MEMORY_SPOOL!r} keeps records in memory (lost on a crash; cumulative metrics refused)",
    )
    delivery.add_argument("--spool-max-bytes", type=int, metavar="N", help="spool size cap")
    delivery.add_argument(
        "--max-in-flight", type=int, metavar="N", help="concurrent tracking requests to Paygent"
    )
    delivery.add_argument(
        "--flush-timeout",
        type=float,
        default=DEFAULT_FLUSH_TIMEOUT,
        metavar="S",
        help="on stop, seconds spent delivering pending records "
        f"(default {DEFAULT_FLUSH_TIMEOUT:g})",
    )
    limits = serve.add_argument_group("limits (each breach answered with its own status)")
    limits.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help=f"request body as received, 413 beyond (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    limits.add_argument(
        "--max-decompressed-bytes",
        type=int,
        default=DEFAULT_MAX_DECOMPRESSED_BYTES,
        metavar="N",
        help=f"body after gzip, 413 beyond (default {DEFAULT_MAX_DECOMPRESSED_BYTES})",
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
    token = args.token or os.environ.get(PAYGENT_BRIDGE_TOKEN, "").strip()
    if token:
        source = "--token" if args.token else PAYGENT_BRIDGE_TOKEN
        auth = BearerAuth.parse([token], source)
    if args.token_file:
        auth = auth.merged(BearerAuth.from_file(args.token_file))
    return auth


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
    for name in ("max_request_bytes", "max_decompressed_bytes", "max_items", "workers"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    exporter = ExporterConfig.resolve(
        None,
        endpoint=args.endpoint,
        spool_path=args.spool,
        spool_max_bytes=args.spool_max_bytes,
        max_in_flight=args.max_in_flight,
    )
    if not exporter.api_key and not exporter.durable:
        # Every request would be refused: nothing can be sent, nothing can be kept.
        return _fail(f"set PAYGENT_API_KEY (or use a durable --spool instead of {MEMORY_SPOOL})")
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
        flush_timeout=args.flush_timeout,
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    if args.workers > 1:
        return _run_workers(config, sock, args)
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


def _run_workers(config: BridgeConfig, sock: socket.socket, args: argparse.Namespace) -> int:
    """``--workers N``: the spool is checked here, then N processes serve (workers.py)."""
    from .._serving import base_url
    from .._spool import open_spool
    from .workers import run_workers

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
