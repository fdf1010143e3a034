"""The Paygent usage convention: attribute names (``semconv``), the one mapping from
attributes to usage records (``mapping``), the GenAI and voice-framework mappings.

It imports nothing else of this package: everything else is built on it.
"""
