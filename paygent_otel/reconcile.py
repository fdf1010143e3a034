"""Deprecated alias of :mod:`paygent_otel.delivery.reconcile` (moved in 0.2; removed in 0.3)."""

from paygent_otel._deprecated import alias

alias(__name__, "paygent_otel.delivery.reconcile")
