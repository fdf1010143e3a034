"""Bill AI speech usage recorded with OpenTelemetry to Paygent.

Set usage as span attributes (or metric points) following the Paygent semantic convention
(:mod:`paygent_otel.semconv`, in :mod:`paygent_otel.convention`), and let
:class:`PaygentSpanExporter` or :class:`PaygentMetricExporter` turn them into Paygent
tracking calls. What this module exports is the public API; ``docs/architecture.md`` says
how the subpackages are layered.
"""

from paygent_otel._version import __version__
from paygent_otel.convention import semconv
from paygent_otel.convention.mapping import (
    IdentityDefaults,
    Rejection,
    RejectReason,
    UsageRecord,
    map_usage,
)
from paygent_otel.convention.semconv import UsageKind
from paygent_otel.delivery.config import ExporterConfig
from paygent_otel.delivery.retry import RetryPolicy
from paygent_otel.exporters import PaygentMetricExporter, PaygentSpanExporter
from paygent_otel.recording import (
    ConversationIdentityProcessor,
    Identity,
    PaygentBaggageSpanProcessor,
    UsageInstruments,
    UsageSampler,
    UsageSpanProcessor,
    create_usage_counters,
    record_sts,
    record_stt,
    record_tts,
)

__all__ = [
    "ConversationIdentityProcessor",
    "ExporterConfig",
    "Identity",
    "IdentityDefaults",
    "PaygentBaggageSpanProcessor",
    "PaygentMetricExporter",
    "PaygentSpanExporter",
    "RejectReason",
    "Rejection",
    "RetryPolicy",
    "UsageInstruments",
    "UsageKind",
    "UsageRecord",
    "UsageSampler",
    "UsageSpanProcessor",
    "__version__",
    "create_usage_counters",
    "map_usage",
    "record_sts",
    "record_stt",
    "record_tts",
    "semconv",
]
