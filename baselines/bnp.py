"""BNP/AR, identifying and purifying bad neurons (Fan et al., 2022). Only a summary was available
(docs/methods.md: [partial]).

- Benign salience [paper]: first-order Taylor estimate of the clean-loss change if unit k is
  removed, E_x |sum over positions of a_k * dL/da_k| on the defense set; the units with the lowest
  benign salience are marked bad. [ours] How many: a fixed share of all units (`ratio`, 5%).
- Pruned model: the marked units removed (reported as the pruned model).
- Adaptive Regularization [ours: the exact form is not published]: fine-tune the *original* model on
  the defense set (SGD lr 0.01, momentum 0.9, cosine, 10 epochs) while, after every step, each
  parameter of a marked unit (BatchNorm gamma and beta, or the Linear weight row and bias) shrinks by
  lr * reg * p / (RMS(p) + 1e-8), RMS being a running root-mean-square of that parameter, so large
  and small parameters shrink at comparable relative rates. Reported as the fine-tuned model."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from baselines.common import Defense, top_units
from onp_env.attacks import PoisonedSet
from onp_env.config import TrainConfig, bounded
from onp_env.graph.features import activation_stats
from onp_env.graph.units import UnitLayout
from onp_env.training import train


@dataclass
class BNPParams:
    ratio: float = bounded(0.05, ge=0, le=1)
    """Share of all units marked bad."""
    epochs: int = bounded(10, ge=1, le=100_000)
    lr: float = bounded(0.01, gt=0)
    reg: float = bounded(0.05, ge=0)
    """Adaptive-regularisation strength."""
    rms_decay: float = bounded(0.9, ge=0, lt=1)
    """Decay of the running root-mean-square of each marked parameter."""
    batch_size: int = bounded(64, ge=1, le=1_000_000)
    progress: bool = False
    """A progress bar of the fine-tuning on stderr."""


class BNP(Defense):
    name = "bnp"
    Params = BNPParams

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stats = activation_stats(model, layout, x, y)
        return -torch.cat([stats[lay.name]["saliency"] for lay in layout.layers])

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, torch.ones_like(scores, dtype=torch.bool))[: round(self.params.ratio * len(scores))]

    def finetune(self, original, pruned_model, layout, pruned, x, y) -> nn.Module:
        p = self.params
        tuned = copy.deepcopy(original)
        modules = dict(tuned.named_modules())
        targets: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, row indices of marked units)
        for lay in layout.layers:
            mod = modules[lay.name]
            rows = torch.tensor([u - lay.offset for u in pruned if lay.offset <= u < lay.offset + lay.size],
                                dtype=torch.long, device=mod.weight.device)  # fmt: skip
            if len(rows):
                targets += [(mod.weight, rows)] + ([(mod.bias, rows)] if mod.bias is not None else [])
        mean_sq = [param.detach()[rows].pow(2).clone() for param, rows in targets]

        def shrink(lr: float) -> None:
            with torch.no_grad():
                for (param, rows), ms in zip(targets, mean_sq, strict=True):
                    ms.mul_(p.rms_decay).add_((1 - p.rms_decay) * param[rows].pow(2))
                    param[rows] -= lr * p.reg * param[rows] / (ms.sqrt() + 1e-8)

        cfg = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, threads=torch.get_num_threads(),
                          device=str(self.device))  # fmt: skip
        train(tuned, PoisonedSet(x, y), cfg, self.seed, desc="bnp: adaptive regularisation", progress=p.progress,
              after_step=shrink)  # fmt: skip
        return tuned
