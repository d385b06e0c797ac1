"""The minimum latent shift per class, after Iwahana, Yamasaki, Ito, Miura and Shibahara, "Robust
Backdoor Removal by Reconstructing Trigger-Activated Changes in Latent Representation" (arXiv
2511.08944, 2025).

A trigger changes the classifier's input features (the last hidden layer's activations) by what the
paper calls the trigger-activated change (TAC). Without the trigger, the paper estimates it per class
k as the smallest perturbation delta_k of the clean features that makes the classifier output k for
every clean image: a convex quadratic programme,

    min ||delta||^2  subject to  (w_k - w_j) . (h_i + delta) + b_k - b_j >= margin
                                 for every clean image i not of class k and every class j != k,

with (w, b) the classifier's weights. The backdoor's target is the class that a statistically small
shift reaches (the anomaly index of the norms, as Neural Cleanse's); per unit, the signal is that
class's signed shift: how much the unit must rise to fake the trigger. It needs no input-space
trigger model, so it also reaches warping (WaNet) and other non-patch triggers, where mask inversion
fails.

Departures from the paper:
- Because one delta serves every image, the constraints of class j reduce to one, against the
  largest requirement over the images (or, with `coverage` < 1, that quantile of it): a QP with K-1
  constraints, solved exactly in its dual by coordinate descent rather than by a generic solver.
- Only the scoring is implemented: the paper then fine-tunes the model with the estimated shift; here
  the environment's policy (or a defense's selection rule) prunes instead.
- Where the classifier reads a flattened feature map (several inputs per unit), a unit's value is the
  sum of its inputs' shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onp_env.config import bounded
from onp_env.graph.units import Connection, UnitLayout
from onp_env.signals.base import Signal, SignalResult, VerdictParams


@dataclass
class LatentShiftParams(VerdictParams):
    images: int = bounded(512, ge=1, le=100_000)
    """Clean defense images (drawn with the seed) that the shift must send to each class."""
    coverage: float = bounded(1.0, gt=0, le=1)
    """Share of those images each constraint must hold for (1: all of them, the paper's QP; lower
    values ignore that many of the hardest images)."""
    margin: float = bounded(0.0, ge=0, le=1_000)
    """Logit margin by which class k must win."""
    sweeps: int = bounded(5_000, ge=1, le=1_000_000)
    """At most this many coordinate-descent sweeps over the dual variables."""


def classifier_inputs(model: nn.Module, layout: UnitLayout, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(images, features) what the classifier (layout.output) reads for clean images `x`."""
    head = dict(model.named_modules())[layout.output]
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().flatten(1)))
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        hook.remove()
    return torch.cat(seen)


def min_shifts(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: LatentShiftParams
               ) -> torch.Tensor:  # fmt: skip
    """(K, features) for every class k the smallest shift delta with which the linear classifier
    (weight, bias) outputs k for (a `coverage` share of) the features `h` of images not of class k."""
    h, weight, bias = h.double(), weight.double(), bias.double()
    k_classes = weight.shape[0]
    shifts = torch.zeros(k_classes, weight.shape[1], dtype=torch.float64)
    for k in range(k_classes):
        others = [j for j in range(k_classes) if j != k]
        rows = h[y != k] if (y != k).any() else h
        a = weight[k] - weight[others]  # (K-1, features)
        need = p.margin - (rows @ a.T + (bias[k] - bias[others]))  # (images, K-1)
        c = torch.quantile(need, p.coverage, dim=0) if p.coverage < 1 else need.max(0).values
        shifts[k] = _project(a, c, p.sweeps)
    return shifts.float()


def _project(a: torch.Tensor, c: torch.Tensor, sweeps: int) -> torch.Tensor:
    """argmin ||d||^2 subject to a @ d >= c, through its dual (max_{l >= 0} l.c - |a.T l|^2 / 2,
    d = a.T l) by exact coordinate ascent."""
    gram = a @ a.T
    diag = gram.diagonal().clamp_min(1e-12)
    lam = torch.zeros(len(c), dtype=a.dtype)
    for _ in range(sweeps):
        before = lam.clone()
        for j in range(len(c)):
            lam[j] = (lam[j] + (c[j] - gram[j] @ lam) / diag[j]).clamp_min(0)
        if (lam - before).abs().max() <= 1e-10 * (1 + lam.abs().max()):
            break
    return a.T @ lam


def classifier_connection(layout: UnitLayout) -> Connection:
    """The connection into the classifier (layout.output): the unit layers it reads, and how many of
    its input columns each of their units feeds."""
    return next(c for c in layout.connections if c.module == layout.output)


def unit_values(shift: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """(units,) a classifier-input vector folded onto the units that feed the classifier (summed over
    a unit's inputs); NaN for every other unit."""
    out = torch.full((layout.num_units,), float("nan"))
    head = classifier_connection(layout)
    for name in head.sources:
        lay = layout.by_name[name]
        out[lay.offset : lay.offset + lay.size] = shift.view(lay.size, head.fan).sum(1)
    return out


def input_columns(layout: UnitLayout, units: list[int]) -> torch.Tensor:
    """(features,) which of the classifier's inputs the flat unit indices `units` feed (unit_values'
    inverse): the inputs a pruned unit holds at 0, which a shift cannot move."""
    head = classifier_connection(layout)
    cut = torch.zeros(layout.num_units, dtype=torch.bool)
    cut[units] = True
    spans = [cut[layout.by_name[n].offset : layout.by_name[n].offset + layout.by_name[n].size] for n in head.sources]
    return torch.cat(spans).repeat_interleave(head.fan)


class LatentShift(Signal):
    name = "latent_gap"
    version = 1
    Params = LatentShiftParams
    observed = {"anomaly": ("anomaly_index", 10.0)}  # flagged above 2, i.e. 0.2 in the observation

    def pick(self, n: int) -> torch.Tensor:
        """Which of `n` defense images the shift must send to each class (`images` of them, by the seed)."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.params.images]

    def shifts(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K, features) each class's minimum shift of the classifier's input (min_shifts)."""
        head = dict(model.named_modules())[layout.output]
        self.check_reference(model, x[:1].to(self.device), head.weight.shape[0])
        pick = self.pick(len(x))
        h = classifier_inputs(model, layout, x[pick].to(self.device)).cpu()
        w = head.weight.detach().cpu()
        b = head.bias.detach().cpu() if head.bias is not None else torch.zeros(len(w))
        return min_shifts(h, y[pick].cpu(), w, b, self.params)

    def compute(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> SignalResult:
        shifts = self.shifts(model, layout, x, y)
        norms = shifts.norm(dim=1)
        index = self.suspicion(norms)
        k = int(torch.argmax(index))
        return SignalResult(
            self.gated(unit_values(shifts[k], layout), float(index[k])),
            {"anomaly_index": float(index[k]), "suspect": float(k)},
            {"norms": norms.tolist(), "anomaly": index.tolist()},
        )
