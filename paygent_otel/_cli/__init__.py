"""The ``paygent-otel`` command line (private: run it, do not import it)."""
