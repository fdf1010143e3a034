"""Deprecated (moved in 0.2; removed in 0.3): ``ConversationIdentityProcessor`` is
``paygent_otel.ConversationIdentityProcessor``; the framework rules are in
:mod:`paygent_otel.convention.frameworks`."""

import warnings

from paygent_otel._deprecated import REMOVED_IN
from paygent_otel.convention.frameworks import (
    FRAMEWORKS,
    Claim,
    FrameworkMetric,
    FrameworkSet,
    parse_frameworks,
)
from paygent_otel.recording.identity import ConversationIdentityProcessor

warnings.warn(
    "paygent_otel.frameworks has moved: ConversationIdentityProcessor to paygent_otel, "
    "the framework rules to paygent_otel.convention.frameworks. The old path is removed "
    f"in {REMOVED_IN}.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "FRAMEWORKS",
    "Claim",
    "ConversationIdentityProcessor",
    "FrameworkMetric",
    "FrameworkSet",
    "parse_frameworks",
]
