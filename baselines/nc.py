"""Neural Cleanse's mitigation by pruning (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural
Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

NC reverse-engineers a trigger for every class (onp_env.signals.trigger_inversion), flags the
model as backdoored when the smallest mask is an outlier (anomaly index above 2), and then prunes
the neurons of a late layer in decreasing order of how much the reversed trigger activates them,
until the reversed trigger no longer works or clean accuracy falls by a set margin. A model that is
not flagged is left as it is.

Departures: the inversion's own (batching, early stopping; see its docstring). "A late layer" is
the last unit layer (the hidden Linear layer of the small CNN, the last BatchNorm of a ResNet). The
stopping rule's numbers are this project's: stop once the reversed trigger sends at most `stop_asr`
of the defense images of other classes to its class, before defense-set accuracy falls more than
`max_acc_drop`, and never beyond `max_ratio` of the layer; NC states the rule, not the numbers.
With `reference` (each class's typical mask norm on the defender's own models of the same data,
onp_env.signals.base.class_reference), the anomaly index is taken against it [ours], so that a
class every model reaches cheaply is not flagged; `reference_from` reads such a reference that ships
with onp-env (onp_env.signals.shipped: `fashion-mnist`, for the small CNN). NC's other mitigation
(unlearning: fine-tuning on reversed-trigger images with their true labels) is not implemented."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from baselines.common import Defense, top_units
from onp_env.config import bounded
from onp_env.env.evaluator import Evaluator, without_inplace
from onp_env.graph.units import UnitLayout, find_units
from onp_env.masking import Masks
from onp_env.signals.trigger_inversion import InversionParams, TriggerInversion, trigger_gap


@dataclass
class NCParams(InversionParams):
    flag_index: float = bounded(2.0, ge=0, le=1000)
    """Prune only when the suspected class's anomaly index exceeds this (NC's threshold: 2)."""
    stop_asr: float = bounded(0.05, ge=0, le=1)
    """Stop once the reversed trigger sends at most this share of other classes' images to its class."""
    max_acc_drop: float = bounded(0.05, ge=0, le=1)
    """Never prune a unit that takes defense-set accuracy further than this below the unpruned model's."""
    max_ratio: float = bounded(0.5, gt=0, le=1)
    """At most this share of the layer."""
    progress: bool = False
    """A progress bar of the pruning sweep on stderr."""


class NC(Defense):
    name = "nc"
    Params = NCParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inversion = {k: v for k, v in vars(self.params).items() if k in InversionParams.__dataclass_fields__}
        # built here so that a reference it cannot use is refused before any work
        self.signal = TriggerInversion(seed=self.seed, device=str(self.device), **inversion)

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.inverted = self.signal.invert(model, x, y)
        index = self.signal.suspicion(self.inverted.norms)  # against params.reference where one is given
        if self.params.reference_from:
            self.extra["reference_from"] = self.params.reference_from
        self.suspect = int(torch.argmax(index))
        self.extra.update(suspect=self.suspect, anomaly_index=float(index[self.suspect]),
                          flagged=bool(index[self.suspect] > self.params.flag_index),
                          mask_norms=self.inverted.norms.tolist())  # fmt: skip
        gap = trigger_gap(model, layout, x, y, self.inverted, self.suspect)
        lay = layout.layers[-1]
        out = torch.full((layout.num_units,), float("-inf"))
        out[lay.offset : lay.offset + lay.size] = gap[lay.offset : lay.offset + lay.size]
        self.layers = [lay.name]
        self.extra["layer"] = lay.name
        return out

    def select(self, scores, model, layout, x, y) -> list[int]:
        if not self.extra["flagged"]:
            return []
        order = top_units(scores, torch.isfinite(scores))
        limit = int(self.params.max_ratio * len(order))
        layers = self.layers
        work = without_inplace(copy.deepcopy(model)).eval()
        _, gm = find_units(work, x[:2])
        chosen: list[int] = []
        with Masks(work, layout) as masks, torch.no_grad():
            clean = Evaluator(gm, x, layers)
            base = (clean.logits().argmax(1) == y).float().mean().item()
            gone = self.backdoor_gone(gm, work, layout, x, y)
            self.extra["stopped"] = "max_ratio"  # why the sweep ended, for a reader of the report
            with tqdm(order[:limit], desc=f"{self.name}: pruning", disable=not self.params.progress,
                      leave=False) as sweep:  # fmt: skip
                for u in sweep:
                    masks.prune([u])
                    acc = (clean.logits(layers).argmax(1) == y).float().mean().item()
                    if base - acc > self.params.max_acc_drop:
                        self.extra["stopped"] = "max_acc_drop"
                        break
                    chosen.append(u)
                    if gone(chosen):
                        self.extra["stopped"] = "backdoor gone"
                        break
        return chosen

    def backdoor_gone(self, gm: fx.GraphModule, work: nn.Module, layout: UnitLayout, x: torch.Tensor,
                      y: torch.Tensor) -> Callable[[list[int]], bool]:  # fmt: skip
        """NC's stopping test, read after each cut (given the units cut so far) on the pruned `work` (`gm`
        is its traced graph): the reversed trigger sends at most `stop_asr` of the other classes' images
        to its class."""
        triggered = self.inverted.apply(self.suspect, x[y != self.suspect])
        trig = Evaluator(gm, triggered, self.layers)
        trig.logits()
        return lambda _cut: (
            (trig.logits(self.layers).argmax(1) == self.suspect).float().mean().item() <= self.params.stop_asr
        )
