"""MNP, Magnitude-based Neuron Pruning (Li, Jiang, Yi, 2024). Only a summary of the paper was
available; each step below says whether it follows the paper or is this project's reading
(docs/methods.md).

Observation [paper]: a neuron's magnitude tracks its saliency on clean data; backdoor neurons break
this (large magnitude, small clean saliency).
1. Clean suppression, "expose" [formula from the paper's summary]: maximise L(x, y; w) - mu ||w||^2
   over the defense set, so clean neurons shrink while backdoor neurons keep their magnitude. It is
   gradient ascent with an L2 penalty, i.e. onp_env.env.scores.unlearn with weight decay 2 mu;
   [ours] its schedule and stopping rule are RNP's unlearning (stop at defense accuracy <= 0.2).
2. Weight penalty, "eliminate" [ours, in the spirit of the paper]: learn unit masks with a penalty
   lam * mean(m * magnitude_exposed), magnitude normalised per layer, driving large-magnitude
   neurons of the exposed model towards 0...
3. Clean preserving, "preserve" [ours]: ...while the masks must keep the clean cross-entropy of the
   *original* weights low; masks are learnt on the original model (SGD lr 0.2, momentum 0.9, 20
   epochs, clamped to [0, 1], as RNP's recovery).
4. Units whose mask ends below 0.2 are pruned [convention].
BatchNorm uses batch statistics while the masks are learnt, as in RNP's recovery; `mask_bn: eval`
uses the running ones [ours].
Detection [partial]: the mean over layers of the Spearman correlation between unit magnitude and
clean Taylor saliency is reported as `magnitude_saliency_correlation` (lower = more suspicious).
Magnitude: |gamma| of BatchNorm channels, L2 norm of the weight row of Linear neurons."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import Defense, top_units
from baselines.masked_training import check_mask_bn, train_masks
from onp_env.config import bounded
from onp_env.env.scores import unlearn
from onp_env.graph.features import activation_stats
from onp_env.graph.units import UnitLayout


@dataclass
class MNPParams:
    mu: float = bounded(5e-4, ge=0)
    """L2 penalty of the clean suppression."""
    suppress_lr: float = bounded(0.01, gt=0)
    suppress_epochs: int = bounded(20, ge=1)
    """Most epochs of clean suppression (it stops earlier at clean_threshold)."""
    clean_threshold: float = bounded(0.2, ge=0, le=1)
    """Suppression stops once the defense accuracy is at most this."""
    batch_size: int = bounded(128, ge=1)
    lam: float = bounded(1.0, ge=0)
    """Strength of the magnitude penalty on the masks."""
    mask_lr: float = bounded(0.2, gt=0)
    mask_epochs: int = bounded(20, ge=1)
    threshold: float = bounded(0.2, ge=0, le=1)
    """Units whose mask (in [0, 1]) ends below this are pruned."""
    progress: bool = False
    """Progress bars of suppression and mask learning on stderr."""
    mask_bn: str = "train"
    """BatchNorm while the masks are learnt: train (batch statistics, as released) or eval (running
    statistics, so that a BatchNorm downstream cannot renormalise a shrinking mask away)."""

    def __post_init__(self) -> None:
        check_mask_bn(self.mask_bn)


def unit_magnitudes(model: nn.Module, layout: UnitLayout) -> torch.Tensor:
    """|gamma| (BatchNorm) or weight-row L2 norm (Linear), divided by the layer's mean."""
    modules = dict(model.named_modules())
    out = []
    for lay in layout.layers:
        w = modules[lay.name].weight.detach()
        mag = w.abs() if lay.kind == "bn" else w.norm(dim=1)
        out.append(mag / mag.mean().clamp_min(1e-12))
    return torch.cat(out)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = torch.argsort(torch.argsort(a)).float(), torch.argsort(torch.argsort(b)).float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def magnitude_saliency_correlation(model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over unit layers of Spearman(magnitude, clean Taylor saliency)."""
    mags = unit_magnitudes(model, layout).cpu()  # beside the saliency, which activation_stats gives on the CPU
    stats = activation_stats(model, layout, x, y)
    per_layer = [
        _spearman(mags[lay.offset : lay.offset + lay.size], stats[lay.name]["saliency"])
        for lay in layout.layers
        if lay.size > 2
    ]
    return sum(per_layer) / max(len(per_layer), 1)


class MNP(Defense):
    name = "mnp"
    Params = MNPParams

    def suppress(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, dict]:
        """Clean suppression on a copy: maximise L - mu ||w||^2 (SGD weight decay 2 mu)."""
        p = self.params
        return unlearn(model, x, y, lr=p.suppress_lr, weight_decay=2 * p.mu, batch_size=p.batch_size,
                       max_epochs=p.suppress_epochs, clean_threshold=p.clean_threshold, seed=self.seed,
                       progress=p.progress, desc="mnp: suppressing")  # fmt: skip

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        self.extra["magnitude_saliency_correlation"] = magnitude_saliency_correlation(model, layout, x, y)
        exposed, self.extra["suppression"] = self.suppress(model, x, y)
        mag = unit_magnitudes(exposed, layout)

        def loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, labels) + p.lam * (mask * mag).mean()

        masks = train_masks(copy.deepcopy(model), layout, x, y, loss, p.mask_epochs, p.mask_lr, 0.9,
                            p.batch_size, self.seed, p.progress, "mnp: learning masks", bn=p.mask_bn)  # fmt: skip
        return 1 - masks

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, (1 - scores) < self.params.threshold)
