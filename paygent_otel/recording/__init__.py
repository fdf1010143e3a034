"""What application code calls to record usage: the ``record_*`` helpers (span
attributes) and their :class:`Identity`, the metric instruments, identity from baggage,
the conversation identity processor of voice frameworks, and the sampler that keeps
usage spans."""

from paygent_otel.recording.baggage import PaygentBaggageSpanProcessor, identity_from_baggage
from paygent_otel.recording.helpers import Identity, record_sts, record_stt, record_tts
from paygent_otel.recording.identity import ConversationIdentityProcessor
from paygent_otel.recording.instruments import UsageInstruments, create_usage_counters
from paygent_otel.recording.sampling import UsageSampler, UsageSpanProcessor

__all__ = [
    "ConversationIdentityProcessor",
    "Identity",
    "PaygentBaggageSpanProcessor",
    "UsageInstruments",
    "UsageSampler",
    "UsageSpanProcessor",
    "create_usage_counters",
    "identity_from_baggage",
    "record_sts",
    "record_stt",
    "record_tts",
]
