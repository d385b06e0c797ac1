"""Trigger-free signals: per-unit evidence from a model and its clean defense set (base.Signal)."""

from onp_env.signals.base import Signal, SignalResult
from onp_env.signals.trigger_inversion import TriggerInversion

SIGNALS: dict[str, type[Signal]] = {TriggerInversion.name: TriggerInversion}

__all__ = ["SIGNALS", "Signal", "SignalResult", "TriggerInversion"]
