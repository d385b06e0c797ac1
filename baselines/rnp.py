"""RNP, Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron
Pruning for Backdoor Defense", ICML 2023), following the authors' released procedure
(docs/methods.md):

1. unlearn: gradient ascent on the clean loss of a copy of the model over the defense set (SGD lr
   0.01, momentum 0.9, weight decay 5e-4, steps at epochs 10 and 20, at most 21 epochs) until the
   defense accuracy is <= 0.2 (onp_env.env.scores.unlearn);
2. recover: freeze the unlearned weights and learn unit masks in [0, 1] (init 1, multiplying the
   BatchNorm weight) that minimise alpha * CE on the defense set; alpha 0.2, SGD lr 0.2, momentum
   0.9, 20 epochs, no L1 term;
3. prune the units whose mask is <= the threshold (0.2) in the *original* backdoored model.
Both stages see the defense set through `augment`: the released code's random crop (padding 4 on
32x32) + horizontal flip by default on colour images, none on grayscale ones (see the parameter).

Departures from the released code:
- the unlearning clips the gradient norm to 20. The released code calls its clip before
  backward(), so it never clips; run that way, the ascent diverges to NaN on the Fashion-MNIST CNN;
- the unlearning threshold is checked after every batch, not at epoch ends (on small models the
  epoch-end check overshoots into a degenerate model whose masks prune far too much);
- hidden Linear neurons get masks like BatchNorm channels (weight row masked, bias kept);
- the pruned model uses this project's mask semantics, `zero` by default (the unit outputs 0); the
  released code zeroes only the BatchNorm weight, so the channel outputs its beta: semantics="gamma";
- no augmentation on grayscale data by default (`augment: auto`), where the released code always
  crops and flips.
An option the released code lacks: `mask_bn: eval` learns the masks with BatchNorm on its running
statistics (the default, `train`, uses batch statistics as released)."""

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
from onp_env.graph.units import UnitLayout
from onp_env.training import check_defense_augment, defense_augment


@dataclass
class RNPParams:
    unlearn_lr: float = bounded(0.01, gt=0)
    unlearn_epochs: int = bounded(21, ge=1)
    """Most epochs of unlearning (it stops earlier at clean_threshold); 21 as released."""
    clean_threshold: float = bounded(0.2, ge=0, le=1)
    """Unlearning stops once the defense accuracy is at most this."""
    batch_size: int = bounded(128, ge=1)
    recover_lr: float = bounded(0.2, gt=0)
    recover_epochs: int = bounded(20, ge=1)
    alpha: float = bounded(0.2, gt=0)
    """Weight of the clean cross-entropy in the recovery loss (0 would leave every mask at 1)."""
    threshold: float = bounded(0.2, ge=0, le=1)
    """Units whose recovered mask (in [0, 1]) ends at or below this are pruned."""
    augment: str = "auto"
    """Augmentation of the defense batches in both stages: none, crop, crop-flip, or auto (crop-flip
    on colour images as released, none on grayscale ones: flipping digits is wrong)."""
    progress: bool = False
    """Progress bars of unlearning and recovery on stderr."""
    mask_bn: str = "train"
    """BatchNorm while the masks are learnt: train (batch statistics, as released) or eval (running
    statistics, so that a BatchNorm downstream cannot renormalise a shrinking mask away)."""

    def __post_init__(self) -> None:
        check_defense_augment(self.augment)
        check_mask_bn(self.mask_bn)


class RNP(Defense):
    name = "rnp"
    Params = RNPParams

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        self.extra["augment"] = kind = defense_augment(p.augment, x)
        twin, report = unlearn(model, x, y, lr=p.unlearn_lr, batch_size=p.batch_size, max_epochs=p.unlearn_epochs,
                               clean_threshold=p.clean_threshold, seed=self.seed, progress=p.progress,
                               desc="rnp: unlearning", augment=kind)  # fmt: skip
        self.extra["unlearning"] = report
        masks = train_masks(
            copy.deepcopy(twin), layout, x, y,
            lambda logits, labels, m: p.alpha * F.cross_entropy(logits, labels),
            p.recover_epochs, p.recover_lr, 0.9, p.batch_size, self.seed, p.progress, "rnp: recovering masks", kind,
            p.mask_bn,
        )  # fmt: skip
        return 1 - masks

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, (1 - scores) <= self.params.threshold)
