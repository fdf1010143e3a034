"""The bridge's work on an admitted export request: decode it, map its usage, commit it.

Runs in a worker thread. A request's usage records are committed to the spool of the
shared :class:`~paygent_otel.delivery.pipeline.DeliveryPipeline` before the app answers 200;
metric requests are committed under one lock, so the positions of cumulative streams move
only with their records.
"""

from __future__ import annotations

import threading
from typing import Any

from paygent_otel.bridge.admission import Refusal, unavailable
from paygent_otel.bridge.auth import Grant
from paygent_otel.bridge.config import BridgeConfig
from paygent_otel.bridge.cumulative import CumulativeStore
from paygent_otel.bridge.guard import BudgetExhausted, BudgetHold
from paygent_otel.bridge.metrics import BridgeCounters
from paygent_otel.bridge.otlp import (
    BodyTooLarge,
    Extraction,
    InvalidRequest,
    Signal,
    UnsupportedEncoding,
    UsageExtractor,
    count_items,
    decode_request,
    decompress,
)
from paygent_otel.convention.frameworks import parse_frameworks
from paygent_otel.convention.mapping import IdentityDefaults, Rejection
from paygent_otel.delivery.pipeline import DeliveryPipeline

__all__ = ["UsageIntake"]


class UsageIntake:
    """Decodes, maps and commits export requests for one bridge."""

    def __init__(
        self,
        config: BridgeConfig,
        pipeline: DeliveryPipeline,
        cumulative: CumulativeStore | None,
        counters: BridgeCounters,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.cumulative = cumulative
        self.counters = counters
        self.lock = threading.Lock()
        """Held while metrics are committed, and while the pipeline and store close."""
        self.closed = False
        agent_id = config.exporter.agent_id
        self.extractor = self._extractor(agent_id)
        self._extractors = {agent_id: self.extractor}

    def _extractor(self, agent_id: str | None) -> UsageExtractor:
        exporter = self.config.exporter
        return UsageExtractor(
            IdentityDefaults(
                agent_id=agent_id,
                customer_id=exporter.customer_id,
                indicator=exporter.indicator,
                trace_tags=exporter.trace_tags,
            ),
            genai=exporter.genai,
            frameworks=parse_frameworks(exporter.frameworks),
            max_attribute_length=self.config.limits.max_attribute_length,
        )

    def extractor_for(self, grant: Grant) -> UsageExtractor:
        """A token limited to exactly one agent supplies that agent id to records without one
        (a Collector that drops a resource cannot then lose them)."""
        agent = grant.single_agent or self.config.exporter.agent_id
        extractor = self._extractors.get(agent)
        if extractor is None:
            extractor = self._extractors[agent] = self._extractor(agent)
        return extractor

    def close(self) -> int:
        """Deliver what is pending within the flush timeout, close the spool and the store;
        the records left undelivered."""
        self.closed = True
        with self.lock:
            left = self.pipeline.shutdown(self.config.flush_timeout)
            if self.cumulative is not None:
                self.cumulative.close()
        return left

    def process(
        self,
        signal: Signal,
        body: bytes,
        encoding: str,
        json_encoded: bool,
        grant: Grant,
        hold: BudgetHold,
    ) -> tuple[Extraction, int]:
        """Decode, map and commit one request (in a worker thread). Returns refused count."""
        request = self._decoded(signal, body, encoding, json_encoded, hold)
        limits = self.config.limits
        items = count_items(signal, request)
        if items > limits.max_items:
            raise Refusal(
                413,
                "too_many_items",
                f"{items} {signal.item_name} in one request exceed the limit of "
                f"{limits.max_items} (--max-items); lower the sender's batch size",
            )
        self.counters.received(signal, items)
        extractor = self.extractor_for(grant)
        if signal is Signal.METRICS:
            with self.lock:
                return self._commit_metrics(extractor, request, grant)
        if signal is Signal.TRACES:
            extraction = extractor.spans(request, grant.agents)
        else:
            extraction = extractor.logs(request, grant.agents)
        return extraction, self._submit(extraction)

    def _decoded(
        self, signal: Signal, body: bytes, encoding: str, json_encoded: bool, hold: BudgetHold
    ) -> Any:
        try:
            raw = decompress(body, encoding, self.config.limits.max_decompressed_bytes, hold.take)
            request = decode_request(signal, raw, json_encoded=json_encoded)
            del raw
        except BudgetExhausted as exc:
            raise unavailable(self.config, str(exc), "memory_budget") from None
        except BodyTooLarge as exc:
            raise Refusal(413, "decompressed_too_large", str(exc)) from None
        except UnsupportedEncoding as exc:
            raise Refusal(415, "unsupported_encoding", str(exc)) from None
        except InvalidRequest as exc:
            raise Refusal(400, "bad_request", str(exc)) from None
        return request

    def _commit_metrics(
        self, extractor: UsageExtractor, request: Any, grant: Grant
    ) -> tuple[Extraction, int]:
        """Metrics under the lock: the cumulative positions move only with their records."""
        if self.closed:
            return Extraction(Signal.METRICS), 1
        cumulative = self.cumulative
        extraction = extractor.metrics(request, cumulative, grant.agents)
        if cumulative is None or not extraction.updates:
            return extraction, self._submit(extraction)
        cumulative.journal(extraction.updates, [r.idempotency_key for r in extraction.records])
        refused = self._submit(extraction)
        if refused:
            cumulative.discard()
        else:
            cumulative.commit()
        return extraction, refused

    def _submit(self, extraction: Extraction) -> int:
        refused = 0
        if extraction.records or extraction.rejections:
            conflicts: list[Rejection] = []
            refused = self.pipeline.submit(
                extraction.records, extraction.rejections, conflicts=conflicts
            )
            extraction.refuse(conflicts)  # reported in partial_success like invalid records
        self.counters.found(
            extraction.signal,
            len(extraction.records),
            (r.reason.value for r in extraction.rejections),
        )
        return refused
