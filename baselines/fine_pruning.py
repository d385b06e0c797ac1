"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

Channels of the last convolutional layer are ranked by their mean activation on clean data; the
most dormant are pruned in increasing number until clean accuracy would drop by more than a margin;
the pruned network is then fine-tuned on the clean data.

Departures: the clean data is the defense set (the paper uses a validation split); the margin
(5 points of defense-set accuracy) and the fine-tuning schedule (10 epochs of SGD, lr 0.01,
momentum 0.9, cosine) are this project's choices, since the summaries we follow do not fix them.
"Last convolutional layer" is the last BatchNorm layer fed directly by a conv; pruned channels stay
masked during fine-tuning. Both the pruned and the fine-tuned model are reported."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from baselines.common import Defense, finetune_pruned, top_units
from onp_env.config import TrainConfig, bounded
from onp_env.env.evaluator import Evaluator, without_inplace
from onp_env.errors import OnpError
from onp_env.graph.features import activation_stats
from onp_env.graph.units import UnitLayout, find_units
from onp_env.masking import Masks


@dataclass
class FinePruningParams:
    max_acc_drop: float = bounded(0.05, ge=0, le=1)
    """Stop before defense-set accuracy falls more than this below the unpruned model's."""
    finetune_epochs: int = bounded(10, ge=1, le=100_000)
    lr: float = bounded(0.01, gt=0)
    batch_size: int = bounded(64, ge=1, le=1_000_000)
    progress: bool = False
    """Progress bars of the pruning sweep and the fine-tuning on stderr."""


def last_conv_layer(model: nn.Module, layout: UnitLayout) -> str:
    modules = dict(model.named_modules())
    convs = [lay.name for lay in layout.layers if lay.producer and isinstance(modules[lay.producer], nn.Conv2d)]
    if not convs:
        raise OnpError("fine-pruning needs a Conv2d layer followed by BatchNorm: this model has none")
    return convs[-1]


class FinePruning(Defense):
    name = "fp"
    Params = FinePruningParams

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        name = last_conv_layer(model, layout)
        self.extra["layer"] = name
        lay = layout.by_name[name]
        out = torch.full((layout.num_units,), float("-inf"))
        out[lay.offset : lay.offset + lay.size] = -activation_stats(model, layout, x, y)[name]["act_mean"]
        return out

    def select(self, scores, model, layout, x, y) -> list[int]:
        order = top_units(scores, torch.isfinite(scores))
        work = without_inplace(copy.deepcopy(model)).eval()
        _, gm = find_units(work, x[:2])
        name = layout.locate(order[0])[0].name
        with Masks(work, layout) as masks:
            ev = Evaluator(gm, x, [name])
            base = (ev.logits().argmax(1) == y).float().mean().item()
            chosen: list[int] = []
            with tqdm(order[:-1], desc="fp: pruning", disable=not self.params.progress, leave=False) as sweep:
                for u in sweep:  # never the whole layer
                    masks.prune([u])
                    acc = (ev.logits([name]).argmax(1) == y).float().mean().item()
                    if base - acc > self.params.max_acc_drop:
                        break
                    chosen.append(u)
        return chosen

    def finetune(self, original, pruned_model, layout, pruned, x, y) -> nn.Module:
        p = self.params
        cfg = TrainConfig(epochs=p.finetune_epochs, batch_size=p.batch_size, lr=p.lr, threads=torch.get_num_threads(),
                          device=str(self.device))  # fmt: skip
        return finetune_pruned(pruned_model, layout, pruned, x, y, cfg, self.semantics, self.seed, "fp: fine-tuning",
                               p.progress)  # fmt: skip
