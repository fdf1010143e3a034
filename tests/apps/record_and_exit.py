"""A short-lived program that records one usage record per process and exits without
calling ``shutdown()``: the exporter must deliver from the SDK's atexit hook.

``python record_and_exit.py MODE CUSTOMER`` with MODE ``main`` (record on the main thread),
``thread`` (record on another thread), or ``fork`` (the parent and a forked child each record
one, the child with ``CUSTOMER-child``, and each exits normally). Exporter settings come
from the environment (``OTEL_EXPORTER_PAYGENT_*``, ``PAYGENT_API_KEY``).
"""

from __future__ import annotations

import os
import sys
import threading

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paygent_otel import PaygentSpanExporter, record_stt

provider = TracerProvider(resource=Resource.create({"paygent.agent.id": "voice-bot"}))
provider.add_span_processor(BatchSpanProcessor(PaygentSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("record-and-exit")


def record(customer: str) -> None:
    with tracer.start_as_current_span("transcribe"):
        usage = {"serviceProvider": "deepgram", "model": "nova-2", "audioDuration": 0.45}
        record_stt(None, customer, "voice-minutes", usage)


mode, customer = sys.argv[1], sys.argv[2]
if mode == "thread":
    worker = threading.Thread(target=record, args=(customer,))
    worker.start()
    worker.join()
elif mode == "fork":
    record(customer)
    pid = os.fork()
    if pid == 0:
        record(customer + "-child")
        sys.exit(0)  # a normal exit: the child's own atexit hooks run
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
else:
    record(customer)
