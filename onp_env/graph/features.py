"""Node features of the unit graph, computed from the model and *clean* defense images only.

Raw per-unit statistics are z-scored within each layer (clipped to +-Z_CLIP) so that a policy sees
the same scale on every model; depth and width stay absolute (fractions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onp_env.devices import device_of
from onp_env.graph.units import UnitLayout

FEATURES = (
    "depth",  # layer position / (number of unit layers - 1)
    "width",  # layer size / largest layer size
    "is_bn",  # 1 for BatchNorm channels, 0 for hidden Linear neurons
    "gamma",  # BatchNorm weight (Linear: L2 norm of the neuron's weight row)
    "beta",  # BatchNorm bias (Linear: bias)
    "filter_l1",  # L1 norm of the producing filter / weight row (0 where a residual sum feeds the BN)
    "act_mean",  # mean post-ReLU activation on clean defense images
    "act_std",  # its standard deviation over images and positions
    "saliency",  # first-order Taylor saliency E|sum a * dL/da| of the clean loss
    "mag_sal_dev",  # rank(magnitude) - rank(saliency), over the layer size: high = big but unimportant
    "pruned",  # 1 once pruned (the only feature that changes during an episode)
)


Z_CLIP = 10.0


def zscore(v: torch.Tensor) -> torch.Tensor:
    std = v.std(unbiased=False)
    return ((v - v.mean()) / std).clamp(-Z_CLIP, Z_CLIP) if std > 1e-12 else torch.zeros_like(v)


def _rank(v: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(v)).float() / max(len(v) - 1, 1)


def activation_stats(
    model: nn.Module,
    layout: UnitLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    saliency: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per unit layer: post-ReLU activation mean/std and (unless `saliency` is False: no backward
    pass, zeros) Taylor saliency on clean (x, y), on the CPU (summed on the model's device)."""
    modules = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in layout.layers:

        def keep(m: nn.Module, i: object, o: torch.Tensor, name: str = layer.name) -> None:
            if o.requires_grad:
                o.retain_grad()
            outs[name] = o

        hooks.append(modules[layer.name].register_forward_hook(keep))
    device = device_of(model)
    sums = {lay.name: torch.zeros(lay.size, dtype=torch.float64, device=device) for lay in layout.layers}
    sq = {k: torch.zeros_like(v) for k, v in sums.items()}
    sal = {k: torch.zeros_like(v) for k, v in sums.items()}
    count = {k: 0 for k in sums}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            model.zero_grad(set_to_none=True)
            if saliency:
                F.cross_entropy(model(xb), yb, reduction="sum").backward()
            else:
                with torch.no_grad():
                    model(xb)
            for name, o in outs.items():
                a = o.detach().relu().flatten(2) if o.ndim > 2 else o.detach().relu().unsqueeze(-1)
                sums[name] += a.sum((0, 2)).double()
                sq[name] += (a**2).sum((0, 2)).double()
                count[name] += a.shape[0] * a.shape[2]
                g = o.grad if o.grad is not None else torch.zeros_like(o)
                taylor = (o.detach() * g).flatten(2).sum(2) if o.ndim > 2 else o.detach() * g
                sal[name] += taylor.abs().sum(0).double()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    stats = {}
    for name in sums:
        mean = sums[name] / count[name]
        std = (sq[name] / count[name] - mean**2).clamp_min(0).sqrt()
        stats[name] = {"act_mean": mean.float().cpu(), "act_std": std.float().cpu(),
                       "saliency": (sal[name] / len(x)).float().cpu()}  # fmt: skip
    return stats


def activation_gap(model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor, triggered: torch.Tensor,
                   triggered_y: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(units,) how much more each unit fires on `triggered` images than on clean `x`, in units of its
    clean standard deviation: the oracle's quantity with the true trigger, a signal's with an inverted one."""
    clean = activation_stats(model, layout, x, y, saliency=False)
    trig = activation_stats(model, layout, triggered, triggered_y, saliency=False)
    return torch.cat([(trig[lay.name]["act_mean"] - clean[lay.name]["act_mean"]) / (clean[lay.name]["act_std"] + 1e-6)
                      for lay in layout.layers])  # fmt: skip


def node_features(model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(num_units, len(FEATURES)) float32; the `pruned` column is all zeros."""
    modules = dict(model.named_modules())
    stats = activation_stats(model, layout, x, y)
    n_layers, widest = len(layout.layers), max(lay.size for lay in layout.layers)
    rows = []
    with torch.no_grad():
        for lay in layout.layers:
            mod = modules[lay.name]
            if lay.kind == "bn":
                gamma, beta = mod.weight.detach().float(), mod.bias.detach().float()
            else:
                gamma, beta = mod.weight.detach().norm(dim=1), mod.bias.detach().float()
            if lay.producer is not None:
                w = modules[lay.producer].weight.detach()
                l1 = w.abs().flatten(1).sum(1)
            else:
                l1 = torch.zeros(lay.size)
            gamma, beta, l1 = gamma.cpu(), beta.cpu(), l1.cpu()  # beside the activation statistics, on the CPU
            magnitude = l1 if lay.producer is not None else gamma.abs()
            s = stats[lay.name]
            cols = [
                torch.full((lay.size,), lay.depth / max(n_layers - 1, 1)),
                torch.full((lay.size,), lay.size / widest),
                torch.full((lay.size,), float(lay.kind == "bn")),
                zscore(gamma),
                zscore(beta),
                zscore(l1),
                zscore(s["act_mean"]),
                zscore(s["act_std"]),
                zscore(s["saliency"]),
                _rank(magnitude) - _rank(s["saliency"]),
                torch.zeros(lay.size),
            ]
            rows.append(torch.stack(cols, dim=1))
    feats = torch.cat(rows).float()
    if not torch.isfinite(feats).all():
        raise ValueError("non-finite node features: check the model weights and the defense data")
    return feats
