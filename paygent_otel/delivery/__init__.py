"""Delivery of usage records to Paygent: settings, the spool backends, the retry
decision, the worker and its transport, self-metrics, the journal and its conservation
report. It knows the convention's records and nothing of the exporters above it.
"""
