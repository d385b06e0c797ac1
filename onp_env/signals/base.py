"""The one interface of a trigger-free signal: per-unit evidence computed once per model from the
model and its clean defense set only (never the trigger, never the test split).

A signal is a name, a version (bumped whenever its numbers can change), a bounded `Params`
dataclass and `compute(model, layout, x, y)`. Signals sit below the environment and the defenses:
the environment turns them into observation columns (onp_env.env.signals), and a defense built on
a signal is that signal plus a selection rule (baselines.nc)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from onp_env.config import from_dict
from onp_env.devices import resolve_device
from onp_env.graph.units import UnitLayout


@dataclass
class SignalResult:
    units: torch.Tensor
    """(units,) evidence per unit, higher = more suspicious; NaN where the signal cannot judge."""
    globals: dict[str, float] = field(default_factory=dict)
    """Model-level evidence (e.g. an inversion's anomaly index)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What a reader may want to see (per-class norms, the steps taken): plain data."""


class Signal(ABC):
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type]
    observed: ClassVar[dict[str, tuple[str, float]]] = {}
    """Globals the environment observes: suffix of the observation's name (`{name}_{suffix}`) ->
    (key of SignalResult.globals, divisor); the quotient is clipped to [-1, 1]."""

    def __init__(self, seed: int = 0, device: str = "cpu", **params: Any):
        self.params: Any = from_dict(self.Params, params, f"signal {self.name} parameters")
        self.seed = seed
        self.device = resolve_device(device)

    @abstractmethod
    def compute(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> SignalResult:
        """Evidence for `model` (left unchanged) from clean images `x` with labels `y`; on the CPU."""
