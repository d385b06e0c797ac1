"""CLP, Channel Lipschitzness-based Pruning (Zheng, Zhang, Wang, Zhang, Wang, "Data-Free Backdoor
Removal Based on Channel Lipschitzness", ECCV 2022).

Data-free: for every conv channel k followed by BatchNorm, an upper bound of the channel's
Lipschitz constant is the spectral norm of its kernel W_k (reshaped to in_channels x kh*kw) scaled
by gamma_k / sqrt(running_var_k + eps). Channels whose bound exceeds mean + u * std of their layer
are pruned; u = 3 by default.

Departures: hidden Linear neurons and BatchNorm channels fed by a residual sum (no single conv
producer) have no channel bound here; they score -inf and are never pruned. A model without a
single conv-BatchNorm pair is an error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import Defense, top_units
from onp_env.config import bounded
from onp_env.devices import device_of
from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout


@dataclass
class CLPParams:
    u: float = bounded(3.0, ge=0)
    """Threshold in standard deviations above the layer mean (below 0 it would prune most of every
    layer)."""


class CLP(Defense):
    name = "clp"
    Params = CLPParams

    def upper_bounds(self, model: nn.Module, layout: UnitLayout) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        bounds = {}
        for lay in layout.layers:
            conv = modules[lay.producer] if lay.producer else None
            if lay.kind != "bn" or not isinstance(conv, nn.Conv2d):
                continue
            bn = modules[lay.name]
            scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
            w = conv.weight.detach() * scale.view(-1, 1, 1, 1)
            bounds[lay.name] = torch.linalg.matrix_norm(w.flatten(2), ord=2)  # per channel: (cin, kh*kw)
        if not bounds:
            raise OnpError("clp needs Conv2d layers followed by BatchNorm: this model has none")
        return bounds

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bounds = self.upper_bounds(model, layout)
        out = torch.full((layout.num_units,), float("-inf"), device=device_of(model))
        for name, b in bounds.items():
            lay = layout.by_name[name]
            std = b.std(unbiased=False)
            out[lay.offset : lay.offset + lay.size] = (b - b.mean()) / std if std > 0 else torch.zeros_like(b)
        return out

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, scores > self.params.u)
