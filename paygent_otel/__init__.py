"""Bill AI speech usage recorded with OpenTelemetry to Paygent.

Set usage as span attributes (or metric points) following the Paygent semantic convention
(:mod:`paygent_otel.semconv`), and let :class:`PaygentSpanExporter` or
:class:`PaygentMetricExporter` turn them into Paygent tracking calls.
"""

from ._config import ExporterConfig
from ._mapping import IdentityDefaults, Rejection, RejectReason, UsageRecord, map_usage
from ._retry import RetryPolicy
from ._version import __version__
from .baggage import PaygentBaggageSpanProcessor
from .instruments import UsageInstruments, create_usage_counters
from .metric_exporter import PaygentMetricExporter
from .recording import Identity, record_sts, record_stt, record_tts
from .sampling import UsageSampler, UsageSpanProcessor
from .semconv import UsageKind
from .trace_exporter import PaygentSpanExporter

__all__ = [
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
]
