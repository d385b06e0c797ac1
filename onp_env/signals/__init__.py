"""Trigger-free signals: per-unit evidence from a model and its clean defense set (base.Signal)."""

from onp_env.signals.base import Signal, SignalResult
from onp_env.signals.latent_shift import LatentShift
from onp_env.signals.trigger_inversion import TriggerInversion

SIGNALS: dict[str, type[Signal]] = {s.name: s for s in (TriggerInversion, LatentShift)}

__all__ = ["SIGNALS", "LatentShift", "Signal", "SignalResult", "TriggerInversion"]
