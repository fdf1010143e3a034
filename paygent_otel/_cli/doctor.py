"""``paygent-otel doctor``: is usage going to flow? One check after another, each a pass or
fail line with what to do about a failure.

In order: configuration (key present, endpoint well formed), name resolution, TCP, TLS and
the CA in use, the proxy in effect, authentication (where it can be checked without billing
anything), the spool. A check that cannot run because an earlier one failed is skipped.
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import httpx

from paygent_otel._output import add_command, human_age
from paygent_otel.delivery.config import (
    MEMORY_SPOOL,
    OTEL_EXPORTER_PAYGENT_CERTIFICATE,
    OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE,
    PAYGENT_API_KEY,
    ExporterConfig,
)
from paygent_otel.delivery.units import duration_type

if TYPE_CHECKING:
    from paygent_otel.delivery.spool import EndpointStatus

__all__ = ["Check", "register", "run_checks"]

STUCK_SECONDS: Final = 300.0
"""A pending record older than this means delivery is not keeping up (or not running)."""


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    """``pass``, ``fail`` or ``skip``."""
    detail: str
    fix: str = ""


@dataclass
class _Target:
    config: ExporterConfig
    timeout: float
    host: str = ""
    port: int = 0
    addresses: tuple[str, ...] = ()
    proxy: str | None = None


Step = Callable[[_Target], Check]


def _configuration(target: _Target) -> Check:
    config = target.config
    endpoint = config.endpoint
    parts = urlsplit(endpoint)
    # The exporter's own validation (endpoint, key, TLS files), as delivery would see it.
    problems = [config.delivery_blocked] if config.delivery_blocked else []
    if not config.api_key and PAYGENT_API_KEY not in (config.delivery_blocked or ""):
        problems.append(f"no API key (${PAYGENT_API_KEY} is not set)")
    if problems:
        return Check(
            "configuration",
            "fail",
            f"endpoint {endpoint}: " + "; ".join(problems),
            "set OTEL_EXPORTER_PAYGENT_ENDPOINT to the base URL only, such as "
            f"https://cp-api.withpaygent.com, and {PAYGENT_API_KEY} (or pass --api-key-file)",
        )
    try:
        target.port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return Check("configuration", "fail", f"endpoint {endpoint}: {exc}", "fix the port")
    target.host = parts.hostname or ""
    key = config.api_key or ""
    return Check(
        "configuration",
        "pass",
        f"endpoint {endpoint}, API key set ({len(key)} characters, ends in ...{key[-4:]})"
        if len(key) > 12
        else f"endpoint {endpoint}, API key set",
    )


def _resolution(target: _Target) -> Check:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Check(
            "name resolution",
            "fail",
            f"{target.host}: {exc.strerror}",
            "check the host name and this machine's DNS (/etc/resolv.conf, /etc/hosts)",
        )
    target.addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return Check("name resolution", "pass", f"{target.host} is {', '.join(target.addresses)}")


def _proxy(target: _Target) -> Check:
    from paygent_otel.delivery.transport import proxy_for

    scheme = urlsplit(target.config.endpoint).scheme
    # The proxy delivery itself uses (the same function picks it for the sender).
    proxy, _ = proxy_for(target.config.endpoint)
    configured = urllib.request.getproxies().get(scheme) or urllib.request.getproxies().get("all")
    if configured and not proxy:
        return Check(
            "proxy", "pass", f"{scheme} proxy {configured} is bypassed for {target.host} (NO_PROXY)"
        )
    if not proxy:
        return Check("proxy", "pass", f"none for {scheme} (HTTP_PROXY/HTTPS_PROXY unset)")
    target.proxy = proxy
    parts = urlsplit(proxy)
    try:
        with socket.create_connection(
            (parts.hostname or "", parts.port or 80), timeout=target.timeout
        ):
            pass
    except OSError as exc:
        return Check(
            "proxy",
            "fail",
            f"{scheme} proxy {proxy} (from {scheme.upper()}_PROXY) is not reachable: {exc}",
            "fix the proxy variable, or add the Paygent host to NO_PROXY",
        )
    return Check(
        "proxy",
        "pass",
        f"{scheme} proxy {proxy} (from {scheme.upper()}_PROXY) reachable; TCP and TLS below "
        "are checked directly, not through it",
    )


def _tcp(target: _Target) -> Check:
    started = time.monotonic()
    try:
        with socket.create_connection((target.host, target.port), timeout=target.timeout) as s:
            peer = s.getpeername()[0]
    except OSError as exc:
        return Check(
            "TCP connect",
            "fail",
            f"{target.host}:{target.port}: {exc.strerror or exc}",
            "is the service up and listening on that port? a firewall in between?",
        )
    return Check(
        "TCP connect",
        "pass",
        f"{peer}:{target.port} in {(time.monotonic() - started) * 1000:.0f} ms",
    )


def _tls_context(config: ExporterConfig) -> tuple[ssl.SSLContext, str]:
    """The context delivery uses (the same function builds it) and where its CAs come from.
    ``ValueError`` names a CA or client-certificate file that cannot be loaded."""
    from paygent_otel.delivery.transport import tls_context

    context, where = tls_context(config.certificate, config.client_certificate, config.client_key)
    if config.client_certificate:
        where += f", client certificate {config.client_certificate}"
    return context, where


def _tls(target: _Target) -> Check:
    if urlsplit(target.config.endpoint).scheme != "https":
        if target.addresses and all(
            ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in target.addresses
        ):
            return Check("TLS", "pass", "not used: http to a loopback address")
        return Check(
            "TLS",
            "fail",
            f"http to {target.host}: the API key and usage would cross the network in clear",
            "use https:// (plain http is for a local sandbox only)",
        )
    try:
        context, where = _tls_context(target.config)
    except ValueError as exc:
        return Check(
            "TLS",
            "fail",
            f"cannot load the CA or client certificate: {exc}",
            f"point ${OTEL_EXPORTER_PAYGENT_CERTIFICATE} (CA bundle) and "
            f"${OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE}/_KEY at readable PEM files",
        )
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=target.timeout) as raw,
            context.wrap_socket(raw, server_hostname=target.host) as tls,
        ):
            version = tls.version()
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "TLS",
            "fail",
            f"the certificate of {target.host} is not trusted: {exc.verify_message}; CA: {where}",
            f"if Paygent is reached through a TLS-inspecting proxy or a private CA, set "
            f"${OTEL_EXPORTER_PAYGENT_CERTIFICATE} to that CA's bundle",
        )
    except (OSError, ssl.SSLError) as exc:
        return Check(
            "TLS", "fail", f"handshake with {target.host} failed: {exc}; CA: {where}",
            "is this port TLS? (http:// for a plain endpoint)",
        )  # fmt: skip
    expires = cert.get("notAfter")
    left = ""
    if isinstance(expires, str):
        days = (ssl.cert_time_to_seconds(expires) - time.time()) / 86_400
        left = f", certificate valid {days:.0f} more days"
    return Check("TLS", "pass", f"{version} with {target.host}{left}; CA: {where}")


def _auth(target: _Target) -> Check:
    """Ask for the sandbox's key check; Paygent has none, and nothing is ever POSTed."""
    from paygent_otel.sandbox.app import AUTH_CHECK_PATH

    url = target.config.endpoint + AUTH_CHECK_PATH
    try:
        context: ssl.SSLContext | bool = _tls_context(target.config)[0]
    except ValueError:
        context = True
    try:
        answer = httpx.get(
            url,
            headers={"paygent-api-key": target.config.api_key or "", **target.config.headers},
            timeout=target.timeout,
            verify=context,
        )
    except httpx.HTTPError as exc:
        return Check("authentication", "fail", f"GET {url}: {exc}", "see the checks above")
    if answer.status_code == 200 and _is_sandbox(answer):
        return Check("authentication", "pass", "the sandbox accepts this API key")
    if answer.status_code in (401, 403):
        return Check(
            "authentication",
            "fail",
            f"the API key is refused ({answer.status_code}: {answer.text[:200]})",
            f"set {PAYGENT_API_KEY} to the key this endpoint expects",
        )
    return Check(
        "authentication",
        "pass",
        "not checked: Paygent offers no way to check a key without recording usage, and "
        "doctor never sends usage. Checked: the key is set. A wrong key shows at the first "
        "delivery as 'the API key is not accepted' in the log, with records kept in the spool",
    )


def _is_sandbox(answer: httpx.Response) -> bool:
    try:
        return bool(answer.json().get("sandbox"))
    except (ValueError, AttributeError):
        return False


def _spool(target: _Target) -> Check:
    """The spool file: present or creatable, private, a spool, and what it holds. Read-only:
    the check changes nothing in the file."""
    from paygent_otel.delivery.spool import open_sqlite_view

    path = Path(target.config.spool_path)
    if target.config.spool_path == MEMORY_SPOOL:
        return Check(
            "spool",
            "pass",
            "in memory (records are lost on a crash or a Paygent outage longer than the process)",
        )
    if not path.exists():
        return _spool_to_come(path)
    problem = _spool_file_problem(path)
    if problem is not None:
        return problem
    spool = open_sqlite_view(path, max_bytes=target.config.spool_max_bytes)
    try:
        endpoints = spool.endpoints()
        invalid = spool.dead_letter_counts().get("invalid", 0)
    finally:
        spool.close()
    return _spool_contents(target, path, endpoints, invalid)


def _spool_to_come(path: Path) -> Check:
    """A spool not created yet: can this user create it?"""
    folder = next((p for p in path.parents if p.exists()), Path("/"))
    if os.access(folder, os.W_OK | os.X_OK):
        return Check("spool", "pass", f"{path}: not created yet; {folder} is writable")
    return Check(
        "spool",
        "fail",
        f"{path}: not created yet, and {folder} is not writable by this user",
        "point OTEL_EXPORTER_PAYGENT_SPOOL_PATH at a writable place",
    )


def _spool_file_problem(path: Path) -> Check | None:
    """A failed check if the file is not this user's to use, is readable by others, or is
    not a spool."""
    from paygent_otel.delivery.spool import check_spool_file

    problems = []
    if not os.access(path, os.R_OK | os.W_OK):
        problems.append("not readable and writable by this user")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"mode {stat.filemode(path.stat().st_mode)}: others may read it")
    if problems:
        return Check("spool", "fail", f"{path}: {'; '.join(problems)}", f"chmod 600 {path}")
    try:
        check_spool_file(path)
    except ValueError as exc:
        return Check(
            "spool", "fail", str(exc), "point OTEL_EXPORTER_PAYGENT_SPOOL_PATH at the spool"
        )
    return None


def _spool_contents(
    target: _Target, path: Path, endpoints: list[EndpointStatus], invalid: int
) -> Check:
    """What the spool holds per endpoint: a failure when records wait too long or died."""
    from paygent_otel.delivery.spool import destination_id

    mine = destination_id(target.config.endpoint)
    lines, stuck, dead_total = [], False, invalid
    for e in endpoints:
        name = "this endpoint" if e.dest == mine else (e.url or f"endpoint {e.dest}")
        oldest = e.oldest_pending_age
        age = "" if oldest is None else f", oldest {human_age(oldest)}"
        lines.append(f"{name}: {e.pending} pending{age}, {e.dead_letters} dead")
        stuck |= oldest is not None and oldest > STUCK_SECONDS
        dead_total += e.dead_letters
    if invalid:
        lines.append(f"invalid records: {invalid} dead")
    detail = f"{path} (mode {stat.filemode(path.stat().st_mode)}): " + (
        "; ".join(lines) if lines else "empty"
    )
    if not (stuck or dead_total):
        return Check("spool", "pass", detail)
    return Check(
        "spool",
        "fail",
        detail,
        "see `paygent-otel spool status` and `spool dead`; "
        + (
            "records wait longer than 5 min: is an exporter running and delivering? "
            if stuck
            else ""
        )
        + ("retry dead letters once the cause is fixed (`spool retry`)" if dead_total else ""),
    )


_STEPS: Final[tuple[tuple[str, Step, tuple[str, ...]], ...]] = (
    ("configuration", _configuration, ()),
    ("name resolution", _resolution, ("configuration",)),
    ("TCP connect", _tcp, ("name resolution",)),
    ("TLS", _tls, ("TCP connect",)),
    ("proxy", _proxy, ("configuration",)),
    ("authentication", _auth, ("TLS", "proxy")),
    ("spool", _spool, ()),
)


def run_checks(config: ExporterConfig, timeout: float = 5.0) -> Iterator[Check]:
    """Run every check in order; a check whose prerequisite failed is skipped."""
    target = _Target(config, timeout)
    failed: set[str] = set()
    for name, step, needs in _STEPS:
        blocked = [n for n in needs if n in failed]
        if blocked:
            failed.add(name)
            yield Check(name, "skip", f"needs {' and '.join(blocked)}")
            continue
        check = step(target)
        if check.status == "fail":
            failed.add(name)
        yield check


_EPILOG = """\
examples:
  paygent-otel doctor                        the configuration the exporters would use
  paygent-otel doctor --endpoint http://127.0.0.1:8787 --spool ./spool.sqlite3

reads what the exporters read: OTEL_EXPORTER_PAYGENT_ENDPOINT, PAYGENT_API_KEY,
OTEL_EXPORTER_PAYGENT_SPOOL_PATH (and their TRACES_ forms), OTEL_EXPORTER_PAYGENT_CERTIFICATE
(a CA bundle), OTEL_EXPORTER_PAYGENT_CLIENT_CERTIFICATE and _CLIENT_KEY (mutual TLS),
HTTP_PROXY/HTTPS_PROXY/NO_PROXY. Sends no usage: against the sandbox the key is checked
with GET /api/v2/auth-check; Paygent has no such route, so there only its presence is.
exit status: 0 every check passed, 1 a check failed.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``doctor`` command."""
    parser = add_command(
        commands,
        "doctor",
        help="check configuration, network, TLS, proxy, key and spool; the fix for each failure",
        description=(
            "Check, in order, whether usage can flow to Paygent: configuration, name\n"
            "resolution, TCP, TLS and the CA in use, the proxy in effect, authentication\n"
            "(where that bills nothing) and the spool. One pass/fail line each, with the\n"
            "fix for a failure."
        ),
        epilog=_EPILOG,
        handler=_doctor,
    )
    parser.add_argument("--endpoint", help="Paygent API base URL (default: as the exporters)")
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"read the key from FILE (default: ${PAYGENT_API_KEY})",
    )
    parser.add_argument(
        "--spool", metavar="PATH", help="spool file (default: as the span exporter)"
    )
    parser.add_argument(
        "--timeout", type=duration_type(minimum=0.001), default=5.0, metavar="DURATION",
        help="per network check (default 5s)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def _doctor(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # its one line per request
    api_key = None
    if args.api_key_file:
        api_key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    try:
        config = ExporterConfig.resolve(
            "traces", endpoint=args.endpoint, api_key=api_key, spool_path=args.spool
        )
    except ValueError as exc:  # a bad --endpoint: report it as the configuration check
        config = replace(
            ExporterConfig.resolve("traces", api_key=api_key, spool_path=args.spool),
            endpoint=args.endpoint,
            delivery_blocked=str(exc),
        )
    checks = []
    for check in run_checks(config, args.timeout):
        checks.append(check)
        if not args.json:
            print(f"{check.status.upper():<4}  {check.name}: {check.detail}", flush=True)
            if check.fix:
                print(f"      fix: {check.fix}", flush=True)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(
            "\nall checks passed"
            if not failed
            else f"\n{len(failed)} checks failed: {', '.join(c.name for c in failed)}",
            file=sys.stdout,
        )
    return 1 if failed else 0
