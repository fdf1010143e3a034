"""Docs that run: every program and command sequence in README.md, docs/*.md and
collector-config/README.md is run as written, against a real local Paygent.

Each fenced block tagged ``python``, ``sh``, ``bash``, ``shell`` or ``console`` is one test
case (``console`` blocks: the lines after ``$ `` are the commands, the rest is output). The
blocks of one document run in order, in one working directory of their own (with
``collector-config`` linked in, as in a clone), with this environment:

- ``OTEL_EXPORTER_PAYGENT_ENDPOINT`` and ``PAYGENT_API_KEY`` aim at a sandbox this module
  starts (a block that starts its own sandbox or exports its own values uses those);
  ``XDG_STATE_HOME`` is the document's directory, so the default spool is there, and one
  exporter has been built beforehand, as on any machine that runs one;
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``) aims
  at a local OTLP/HTTP sink that answers 200, standing in for "your usual OTLP backend";
- ``pip install ...`` lines are not run: a shell function checks that what they name is
  installed in this environment (``make test`` installs the test extra) and fails if not.

A block passes when it exits with status 0 within its time limit; a program or command
sequence that records usage (it names ``record_*``, ``add_*`` or ``paygent.usage.kind``,
or runs a file of the document that does) must also make a sandbox ledger grow: this
module's, or one the block created in its directory. A shell block's background jobs are
stopped when it ends.

An HTML comment right before a block changes what is done with it:

- ``<!-- docs-test: skip (reason) -->``: not run; the reason is reported as the skip reason;
- ``<!-- docs-test: file NAME -->``: the block is the file NAME of the document's directory
  (written before the document's blocks run, used by the blocks that follow); a Python file
  is only compiled here;
- ``<!-- docs-test: background -->``: a command that serves until stopped; it is started,
  waited for until it prints ``listening on``, and kept running for the rest of the
  document.

A Python block that uses ``tracer``, ``provider`` or ``meter`` without defining them is a
fragment: it runs after a prelude that builds them (a ``TracerProvider`` with
``PaygentSpanExporter``, a ``MeterProvider`` with ``PaygentMetricExporter``, resource
``paygent.agent.id=docs-agent``). Any other undefined name fails the test. A block that
defines ``test_*`` functions is run with pytest.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import API_KEY

from paygent_otel.sandbox import Ledger, SandboxServer

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "collector-config" / "README.md",
]
RUNNABLE = {"python", "sh", "bash", "shell", "console"}
BLOCK_TIMEOUT = 90.0
MARK = re.compile(r"<!--\s*docs-test:\s*(skip|file|background)\b\s*(.*?)\s*-->")
USAGE = re.compile(r"\brecord_(?:stt|tts|sts)\(|\badd_(?:stt|tts|sts)\(|paygent\.usage\.kind")
FRAGMENT_NAMES = {"tracer", "provider", "meter"}

PRELUDE = """\
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from paygent_otel import PaygentMetricExporter, PaygentSpanExporter

_resource = Resource.create({"paygent.agent.id": "docs-agent"})
provider = TracerProvider(resource=_resource)
provider.add_span_processor(BatchSpanProcessor(PaygentSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("docs")
_meters = MeterProvider(
    metric_readers=[PeriodicExportingMetricReader(PaygentMetricExporter())], resource=_resource
)
metrics.set_meter_provider(_meters)
meter = metrics.get_meter("docs")
# ---- the documented block
"""

PIP_CHECK = """\
import sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

args = sys.argv[1:]
if not args or args[0] != "install":
    sys.exit(f"docs test: only `pip install` is understood, not {args}")
missing = []
for text in (a for a in args[1:] if not a.startswith("-")):
    requirement = Requirement("paygent-otel" + text[1:] if text.startswith(".") else text)
    try:
        requires = distribution(requirement.name).requires or []
    except PackageNotFoundError:
        missing.append(requirement.name)
        continue
    for extra in requirement.extras:
        for needed in map(Requirement, requires):
            if needed.marker and needed.marker.evaluate({"extra": extra}):
                try:
                    distribution(needed.name)
                except PackageNotFoundError:
                    missing.append(f"{needed.name} (extra {extra} of {requirement.name})")
if missing:
    sys.exit(f"docs test: pip install {' '.join(args[1:])}: not installed: {missing}")
"""


@dataclass
class Block:
    """One fenced code block of a document."""

    doc: Path
    line: int
    lang: str
    text: str
    mark: str | None = None
    argument: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def commands(self) -> str:
        if self.lang != "console":
            return self.text
        return "\n".join(line[2:] for line in self.text.splitlines() if line.startswith("$ "))


def blocks_of(doc: Path) -> list[Block]:
    """The runnable blocks of ``doc``, with the mark of the comment right before each."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = i + 1
        while not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if lang in RUNNABLE:
            block = Block(doc, i + 1, lang, body)
            mark = MARK.search(previous)
            if mark:
                block.mark, block.argument = mark.group(1), mark.group(2).strip("() ")
            found.append(block)
        i = end + 1
    return found


BLOCKS = [block for doc in DOCUMENTS for block in blocks_of(doc)]
LAST_BLOCK = {block.doc: block for block in BLOCKS}


# ----------------------------------------------------------------- the environment


class _Sink(BaseHTTPRequestHandler):
    """Any OTLP/HTTP export: 200 with an empty (valid) protobuf answer."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a block's process group: SIGTERM (the servers flush), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.poll()
                return
            process.poll()
            time.sleep(0.05)


@dataclass
class Session:
    """One document's working directory, environment and background servers."""

    directory: Path
    env: dict[str, str]
    sandbox: SandboxServer
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ledger_total(self) -> int:
        """Usage rows in the module's sandbox and in every sandbox ledger in the directory."""
        total = self.sandbox.ledger.count()
        for path in self.directory.rglob("*.sqlite3"):
            try:
                total += Ledger(path).count()
            except Exception:
                continue  # a spool or another SQLite file
        return total

    def run(self, argv: list[str], block: Block, *, wait: bool = True) -> tuple[int, str]:
        """Run ``argv`` in its own process group; (exit status, output)."""
        log = self.directory / f".block-{block.line}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait:
            self.background.append(process)
            deadline = time.monotonic() + 20.0
            while "listening on" not in log.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    _stop_group(process)
                    return process.returncode or 1, log.read_text(errors="replace")
                time.sleep(0.1)
            return 0, log.read_text(errors="replace")
        try:
            status = process.wait(BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = -1
        _stop_group(process)  # its background jobs
        output = log.read_text(errors="replace")
        if status == -1:
            output += f"\n[docs test: stopped after {BLOCK_TIMEOUT:g} s]"
        return status, output

    def close(self) -> None:
        """Stop the document's background servers (their ports are free for the next one)."""
        while self.background:
            _stop_group(self.background.pop())


@pytest.fixture(scope="module")
def sessions() -> Iterator[dict[Path, Session]]:
    """Per document a Session, all sharing one sandbox and one OTLP sink.

    The directories are not under pytest's shared temporary root, which another pytest run
    of the same user may prune while these blocks still use them."""
    top = Path(tempfile.mkdtemp(prefix="paygent-docs-"))
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sandbox = SandboxServer(top / "ledger.sqlite3")
    sandbox.start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PAYGENT_", "OTEL_"))}
    base |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OTEL_EXPORTER_PAYGENT_ENDPOINT": sandbox.url,
        "PAYGENT_API_KEY": API_KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",  # the sink speaks OTLP/HTTP
        "PYTHONUNBUFFERED": "1",
    }
    created: dict[Path, Session] = {}
    for n, doc in enumerate(DOCUMENTS):
        directory = top / f"{n}-{doc.stem}"
        directory.mkdir()
        (directory / "collector-config").symlink_to(ROOT / "collector-config")
        (directory / ".pip_check.py").write_text(PIP_CHECK)
        for block in blocks_of(doc):
            if block.mark == "file":
                (directory / block.argument).write_text(block.text)
        created[doc] = Session(
            directory, {**base, "XDG_STATE_HOME": str(directory / "state")}, sandbox
        )
    # Each default spool exists, as on any machine where an exporter has run.
    build = (
        "import os, sys\nfrom paygent_otel import PaygentSpanExporter\n"
        "for state in sys.argv[1:]:\n"
        "    os.environ['XDG_STATE_HOME'] = state\n"
        "    PaygentSpanExporter().shutdown()\n"
    )
    states = [s.env["XDG_STATE_HOME"] for s in created.values()]
    subprocess.run([sys.executable, "-c", build, *states], env=base, check=True, timeout=60)
    try:
        yield created
    finally:
        for session in created.values():
            session.close()
        sandbox.stop()
        sink.shutdown()
        shutil.rmtree(top, ignore_errors=True)


# ----------------------------------------------------------------- running one block


def _undefined_names(tree: ast.Module) -> set[str]:
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            bound.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - bound


def _python_argv(block: Block, session: Session) -> list[str]:
    tree = ast.parse(block.text, filename=block.id)
    undefined = _undefined_names(tree)
    unknown = undefined - FRAGMENT_NAMES
    assert not unknown, (
        f"{block.id} uses {sorted(unknown)} without defining them: import or define them in "
        "the block, or mark it `<!-- docs-test: skip (reason) -->`"
    )
    source = (PRELUDE if undefined else "") + block.text
    path = session.directory / f"block_{block.line}.py"
    path.write_text(source)
    if _defines_tests(block):
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name]
    return [sys.executable, path.name]


def _shell_argv(block: Block, session: Session) -> list[str]:
    script = (
        f'pip() {{ {shlex.quote(sys.executable)} "$DOCS_DIR/.pip_check.py" "$@"; }}\n'
        f"DOCS_DIR={shlex.quote(str(session.directory))}\n"
        "set -e\n" + block.commands()
    )
    return ["bash", "-c", script]


def _defines_tests(block: Block) -> bool:
    return re.search(r"^def test_", block.text, re.MULTILINE) is not None


def _records_usage(block: Block, session: Session) -> bool:
    if block.lang == "python":
        # A block of tests checks its own ledger: pytest fails when an assertion does.
        return USAGE.search(block.text) is not None and not _defines_tests(block)
    if USAGE.search(block.text):
        return True
    files = [session.directory / name for name in re.findall(r"[\w./-]+\.py\b", block.commands())]
    return any(path.is_file() and USAGE.search(path.read_text()) for path in files)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block_runs(block: Block, sessions: dict[Path, Session]) -> None:
    session = sessions[block.doc]
    if block.mark == "skip":
        if block is LAST_BLOCK[block.doc]:
            session.close()
        pytest.skip(f"{block.id}: {block.argument}")
    try:
        _run_and_check(block, session)
    finally:
        if block is LAST_BLOCK[block.doc]:
            session.close()


DEFAULT_PORTS = {"paygent-otel sandbox": 8787, "paygent-otel serve": 4319}
"""The servers documented blocks start, on their default ports."""


def _default_ports(block: Block) -> list[int]:
    commands = block.commands() if block.lang != "python" else ""
    return [
        port
        for command, port in DEFAULT_PORTS.items()
        if re.search(rf"^\s*(?:\S+=\S+\s+)*{command}\b(?!.*--port)", commands, re.MULTILINE)
    ]


def _wait_until_free(port: int, block: Block) -> None:
    """The block starts a server on ``port``: a lingering server of an earlier block gets a
    few seconds to close; anything else holding it is named in the failure."""
    deadline = time.monotonic() + 10.0
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{block.id} starts a server on its documented port {port}, which "
                        "another process holds: stop it and run the test again"
                    )
        time.sleep(0.2)


def _run_and_check(block: Block, session: Session) -> None:
    if block.mark == "file":
        if block.argument.endswith(".py"):
            compile(block.text, block.id, "exec")
        return  # run by the blocks that use it
    for port in _default_ports(block):
        _wait_until_free(port, block)
    expect_usage = _records_usage(block, session)
    before = session.ledger_total()
    if block.lang == "python":
        argv = _python_argv(block, session)
    else:
        argv = _shell_argv(block, session)
    status, output = session.run(argv, block, wait=block.mark != "background")
    assert status == 0, f"{block.id} exited with {status}:\n{block.text}\n--- output ---\n{output}"
    if expect_usage:
        deadline = time.monotonic() + 10.0
        while session.ledger_total() <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.ledger_total() > before, (
            f"{block.id} records usage, but no sandbox ledger received any:\n{output}"
        )


# ----------------------------------------------------------------- links


def test_every_relative_link_and_repository_path_exists() -> None:
    missing = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)}: link {target}")
        for path in re.findall(r"`([\w.-]+(?:/[\w.*-]+)+\.(?:md|py|yaml|env|toml))`", text):
            if not any((base / path).exists() for base in (ROOT, doc.parent)) and not any(
                ROOT.glob(path)
            ):
                missing.append(f"{doc.relative_to(ROOT)}: `{path}`")
    assert missing == []
