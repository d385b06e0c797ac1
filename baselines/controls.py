"""Controls: magnitude pruning and random pruning, the floor any backdoor defense must beat.

- `magnitude`: prune the units with the smallest magnitude (|BatchNorm gamma| for BN channels, L2
  norm of the weight row for hidden Linear neurons), normalised by the layer's mean so layers of
  different scale compete fairly. The classic pruning criterion (e.g. Han et al., NeurIPS 2015;
  Liu et al., "Network Slimming", ICCV 2017 for BN gamma); not a backdoor defense by design.
- `random`: prune a seeded random set of units.
Both prune a fixed share of all units (`ratio`, default 5%, this project's choice)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import Defense, top_units
from onp_env.config import bounded
from onp_env.graph.units import UnitLayout


@dataclass
class RatioParams:
    ratio: float = bounded(0.05, ge=0, le=1)
    """Share of all units to prune."""


class Magnitude(Defense):
    name = "magnitude"
    Params = RatioParams

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modules = dict(model.named_modules())
        out = []
        for lay in layout.layers:
            w = modules[lay.name].weight.detach()
            mag = w.abs() if lay.kind == "bn" else w.norm(dim=1)
            out.append(-(mag / mag.mean().clamp_min(1e-12)))
        return torch.cat(out)

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, torch.ones_like(scores, dtype=torch.bool))[: round(self.params.ratio * len(scores))]


class Random(Magnitude):
    name = "random"

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.rand(layout.num_units, generator=torch.Generator().manual_seed(self.seed))
