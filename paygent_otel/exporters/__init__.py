"""The OpenTelemetry exporters that turn usage on spans and metric points into Paygent
tracking calls, with the extraction of usage from each signal."""

from paygent_otel.exporters.metric import PaygentMetricExporter
from paygent_otel.exporters.trace import PaygentSpanExporter

__all__ = ["PaygentMetricExporter", "PaygentSpanExporter"]
