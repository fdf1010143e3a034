"""Copy a conversation's customer onto the spans started under it (bounded state).

Pipecat's service spans (``tts``, ``stt``, ``llm_response``) start from a context of their
own, so the caller's baggage never reaches them; the customer can only go on the root
``conversation`` span (``PipelineWorker(additional_span_attributes=...)``), whose attributes
are set right after it starts. :class:`ConversationIdentityProcessor` keeps each *live*
conversation span (a root span of the process, or a span named ``conversation``) by trace
id and, as any other span of that trace starts, copies the conversation's identity
attributes onto it. The spans then carry the customer for every exporter on the provider:
the Paygent exporter in the process and an OTLP exporter on the way to a Collector and the
bridge alike.

State is bounded: an entry lives from the conversation's start to its end, and at most
``max_conversations`` are kept (the oldest is forgotten past that, with a warning once).
A span that starts after its conversation ended, or in a conversation that never named a
customer, is not stamped; its usage is then refused with the reason.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from paygent_otel.convention import semconv as sc
from paygent_otel.recording.baggage import BAGGAGE_KEYS

__all__ = ["DEFAULT_MAX_CONVERSATIONS", "ConversationIdentityProcessor"]

_logger = logging.getLogger("paygent_otel.frameworks")

DEFAULT_MAX_CONVERSATIONS: Final = 10_000
"""Live conversations remembered at once (one reference to the live span each)."""

CONVERSATION_SPAN_NAMES: Final = frozenset({"conversation"})
"""Spans remembered even when they are not the root of their trace (Pipecat's root span
when the pipeline runs inside a span of the application)."""


class ConversationIdentityProcessor(SpanProcessor):
    """Stamps each span with the identity of the live conversation of its trace.

    Copies :data:`~paygent_otel.recording.baggage.BAGGAGE_KEYS` (agent, customer, indicator, plan)
    and ``paygent.meta.*`` from the conversation span as it is *when the span starts*,
    never over an attribute the span already has. Add it to the ``TracerProvider`` (its
    position among the processors does not matter: it only writes attributes at start).
    """

    def __init__(self, *, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be at least 1, got {max_conversations}")
        self._max = max_conversations
        self._live: OrderedDict[int, list[Span]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False
        self.forgotten = 0
        """Conversations dropped because more than ``max_conversations`` were live."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def _remember(self, trace_id: int, span: Span) -> None:
        with self._lock:
            self._live.setdefault(trace_id, []).append(span)
            self._live.move_to_end(trace_id)
            if len(self._live) <= self._max:
                return
            self._live.popitem(last=False)
            self.forgotten += 1
            warn, self._warned = not self._warned, True
        if warn:
            _logger.warning(
                "paygent: more than %d conversations are live at once; the oldest is "
                "forgotten and spans starting in it get no customer (their usage is refused). "
                "Raise ConversationIdentityProcessor(max_conversations=...). Said once",
                self._max,
            )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Remember a conversation span; stamp any other span with its trace's identity."""
        context = span.get_span_context()
        parent = span.parent
        if parent is None or parent.is_remote or span.name in CONVERSATION_SPAN_NAMES:
            self._remember(context.trace_id, span)
            if parent is None or parent.is_remote:
                return
        with self._lock:
            conversations = list(self._live.get(context.trace_id, ()))
        existing = span.attributes or {}
        # The innermost conversation first (a Pipecat conversation inside an app's span).
        for conversation in reversed(conversations):
            if conversation is span:
                continue
            identity = {
                key: value
                for key, value in (conversation.attributes or {}).items()
                if (key in BAGGAGE_KEYS or key.startswith(sc.META_PREFIX)) and key not in existing
            }
            if identity:
                span.set_attributes(identity)
                return

    def on_end(self, span: ReadableSpan) -> None:
        """Forget a conversation once it ends."""
        context = span.get_span_context()
        if context is None:
            return
        with self._lock:
            spans = self._live.get(context.trace_id)
            if spans is None:
                return
            # on_end gets a snapshot of the span, not the live object kept at start.
            spans[:] = [s for s in spans if s.get_span_context().span_id != context.span_id]
            if not spans:
                del self._live[context.trace_id]

    def shutdown(self) -> None:
        """Forget every conversation."""
        with self._lock:
            self._live.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered."""
        return True
