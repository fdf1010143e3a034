"""The benchmark of paygent-otel against paygent-sdk 4.9.7 (``make bench``; see README.md)."""
