"""Trigger inversion after Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural
Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

For every candidate target class k, a mask m_k (one value per pixel) and a pattern p_k are optimised
on clean images so that (1 - m_k) * x + m_k * p_k is classified as k, with an L1 penalty on m_k
whose weight is raised while the inverted trigger works and lowered while it does not. A class that
a small mask suffices to reach is the suspected target: the anomaly index is the MAD-based outlier
score of the classes' mask norms (NC flags an index above 2). Per unit, the signal is the oracle's
own quantity with the inverted trigger in place of the real one: the unit's mean activation on
triggered images minus its mean on clean ones, in units of its clean standard deviation
(agents.expert.activation_gap uses the same formula with the true trigger).

Departures from the paper:
- All classes are optimised at once, as one batch (K x B images a step): one pass over the model per
  step instead of K, the main cost saving.
- At most 150 steps on 64 images, 16 per class a step (benchmarks/results/inversion_cost.md), with
  early stopping (every class has reached `success` and no class's best mask norm
  shrank by 1% in `patience` steps) instead of NC's epochs over the data.
- The penalty weight is adjusted every `adjust_every` steps from the window's mean success (x1.5 up,
  /1.5^1.5 down, as NC's factors), without NC's separate up/down patience counters.
- The images are `images` defense images drawn with the seed; NC used its whole clean set.
- A class whose mask never reaches `success` keeps its last mask norm (NC leaves such classes out).
- On a CPU the optimisation runs the model's convolutions in the channels-last layout (CPU_LAYOUT), about
  30% faster a step; its sums run in another order than the default layout's (see CPU_LAYOUT).
- The gap is computed for the most anomalous class whether or not it is flagged: the environment's
  policy decides how far to trust it, and `nc` applies NC's flag.
Warping triggers (WaNet) are not masks: this inversion is not expected to find them.

invert_untargeted [ours] runs the same optimisation for one trigger that sends the images to any class
but their own (the loss -log(1 - p(own label))), in any of the forms below: an all-to-all backdoor's
trigger, which no per-class target shows (`verdict`'s `untargeted`).

A trigger takes one of three forms (FORMS): NC's `mask` (one value per pixel), a `blend` (one opacity over
the whole image, a free pattern: (1 - a) * x + a * p, as Blended's trigger) and [ours] an `additive` one
(one amplitude over the whole image, a free value per pixel: clip(x + a * d) with d in [-1, 1], as SIG's
sinusoid); the size of a blend or additive trigger is its opacity or amplitude times the pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onp_env.config import bounded
from onp_env.graph.features import activation_gap
from onp_env.graph.units import UnitLayout
from onp_env.models.layers import lay_out, put_back
from onp_env.signals.base import Memo, Signal, SignalResult, VerdictParams, anomaly_index
from onp_env.signals.shipped import READ_ONLY


@dataclass
class InversionParams(VerdictParams):
    images: int = bounded(64, ge=1, le=100_000)
    """Defense images the triggers are optimised on (drawn with the seed). 64 images, 16 a step and 150
    steps rank the oracle's units as well as 256, 64 and 300 at a sixth of the time
    (benchmarks/results/inversion_cost.md)."""
    batch_size: int = bounded(16, ge=1, le=4096)
    """Images per class and step: a step runs classes x batch_size images through the model."""
    steps: int = bounded(150, ge=1, le=100_000)
    """At most this many optimisation steps (see patience)."""
    patience: int = bounded(60, ge=1, le=100_000)
    """Stop once every class's trigger works and no best mask norm shrank by 1% in this many steps."""
    lr: float = bounded(0.1, gt=0, le=10)
    init_cost: float = bounded(1e-3, ge=0, le=10)
    """Weight of the mask's L1 norm once a class's trigger first works (NC's init_cost)."""
    success: float = bounded(0.99, gt=0, le=1)
    """Share of images sent to the class for a mask to count (NC's attack-success threshold)."""
    adjust_every: int = bounded(10, ge=1, le=10_000)
    """Steps between adjustments of the penalty weight."""


@dataclass
class Inverted:
    """Per row (a class, or invert_untargeted's one trigger): the best working mask and pattern, and its
    L1 norm."""

    masks: torch.Tensor
    """(K, 1, H, W) in [0, 1]."""
    patterns: torch.Tensor
    """(K, C, H, W) in [0, 1]."""
    norms: torch.Tensor
    """(K,) L1 norm of each class's mask (pixels)."""
    reached: torch.Tensor
    """(K,) whether the class's trigger reached `success`."""
    steps: int
    form: str = "mask"
    """One of FORMS: how a mask and pattern are stamped (stamp)."""

    def apply(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return stamp(self.form, x, self.masks[k].to(x.device), self.patterns[k].to(x.device))

    def anomaly(self, reference: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) NC's anomaly index of the mask norms (base.anomaly_index)."""
        return anomaly_index(self.norms, reference)


FORMS = ("mask", "blend", "additive")
CPU_LAYOUT = torch.channels_last
"""The memory layout of the model's 4-d weights while a trigger is optimised on a CPU, put back as found afterwards:
PyTorch's CPU kernel for max-pooling with indices is several times faster in channels-last than in the default
layout (a step of the small CNN's inversion 28 against 43 ms on one thread; PreAct-ResNet-18 and the VGG 12-20%
faster: benchmarks/results/layout_speed.md). Convolutions then sum in another order, and over 150 steps a blend
trigger's size moves by a few percent, a mask's by under 1%. The agent's pipeline on the 30 shadow models, over the
defense's seeds 0-2, both ways: 92.0% DER / 2.5% ASR / 1.12 points lost against 92.1 / 2.5 / 1.09 with 5% defense
data, 91.7 / 2.5 / 1.62 against 91.9 / 2.3 / 1.62 with 1% (benchmarks/results/onp_repair_layout-whole_*.md)."""


def stamp(form: str, x: torch.Tensor, m: torch.Tensor, p: torch.Tensor, through: bool = False) -> torch.Tensor:
    """Images `x` with a trigger of `form` (masks `m` in [0, 1], patterns `p` in [0, 1]; leading dimensions
    broadcast): `additive` reads the pattern as a sign, 2p - 1, and the mask as its amplitude. `through`: the
    additive clip passes gradients as if it were not there (straight through), so that a pixel at 0, most of a
    Fashion-MNIST image's background, whose sign starts negative can still turn positive."""
    if form != "additive":
        return (1 - m) * x + m * p
    moved = x + m * (2 * p - 1)
    return moved + (moved.clamp(0, 1) - moved).detach() if through else moved.clamp(0, 1)


def invert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, p: InversionParams, seed: int,
           device: torch.device, form: str = "mask") -> Inverted:  # fmt: skip
    """Neural Cleanse's optimisation for every class at once (see the module docstring), in `form` (FORMS:
    the signal's is `mask`)."""
    return _optimise(model, x, y, list(range(classes)), p, seed, device, form)


def invert_toward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, p: InversionParams, seed: int,
                  device: torch.device, form: str = "mask") -> Inverted:  # fmt: skip
    """Neural Cleanse's optimisation for the one class `target` in `form` (FORMS), as an Inverted of one row."""
    return _optimise(model, x, y, [target], p, seed, device, form)


def invert_untargeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: InversionParams, seed: int,
                      device: torch.device, form: str) -> Inverted:  # fmt: skip
    """One trigger that sends `success` of the images to any class but their own [ours]: the smallest
    such trigger of `form` (FORMS) as an Inverted of one row. An all-to-all backdoor sends every class
    elsewhere with one trigger, which no per-class target shows: each class is reached only from its one
    source."""
    return _optimise(model, x, y, None, p, seed, device, form)


def _optimise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, goals: list[int] | None, p: InversionParams,
              seed: int, device: torch.device, form: str) -> Inverted:  # fmt: skip
    """The optimisation of masks and patterns at once: row i toward class goals[i], or (goals None) one row
    away from each image's own label; outside the `mask` form, each mask is one value over the image."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {FORMS}")
    untargeted, whole = goals is None, form != "mask"
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x), generator=g)[: p.images]
    xs, ys = x[pick].to(device), y[pick].to(device)
    k, (c, h, w) = 1 if goals is None else len(goals), xs.shape[1:]
    pixels = h * w if whole else 1
    mask_raw = (0.1 * torch.randn(k, 1, *((1, 1) if whole else (h, w)), generator=g)).to(device).requires_grad_()
    pattern_raw = (0.1 * torch.randn(k, c, h, w, generator=g)).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=p.lr, betas=(0.5, 0.9))
    batch = min(p.batch_size, len(xs))
    targets = torch.tensor(goals or [0], device=device).repeat_interleave(batch)
    cost = torch.zeros(k, device=device)
    cost_set = torch.zeros(k, dtype=torch.bool, device=device)
    best = torch.full((k,), float("inf"), device=device)
    best_masks, best_patterns = torch.ones(k, 1, h, w, device=device), torch.zeros(k, c, h, w, device=device)
    window = torch.zeros(k, device=device)
    since, last_total = 0, float("inf")
    frozen = [q.requires_grad for q in model.parameters()]
    for q in model.parameters():
        q.requires_grad_(False)
    model.eval()
    moved = lay_out(model, CPU_LAYOUT) if device.type == "cpu" else []
    try:
        for step in range(1, p.steps + 1):
            i = torch.randperm(len(xs), generator=g)[:batch].to(device)
            xb = xs[i]
            m = ((torch.tanh(mask_raw) + 1) / 2).expand(k, 1, h, w)
            pat = (torch.tanh(pattern_raw) + 1) / 2
            if form == "additive":
                adv = stamp(form, xb[None], m[:, None], pat[:, None], through=True)
            else:  # spelled as before the additive form: the order in which autograd sums m's gradients
                # moves the last bits, and steps later a near tie in a verdict (measured: 2 of 24 cells)
                adv = (1 - m[:, None]) * xb[None] + (m * pat)[:, None]
            logits = model(adv.flatten(0, 1))
            if untargeted:  # -log(1 - p(own label)), and a hit is any other class
                own = F.one_hot(ys[i].repeat(k), logits.shape[1]).bool()
                loss = logits.logsumexp(1) - logits.masked_fill(own, float("-inf")).logsumexp(1)
                hits = logits.argmax(1) != ys[i].repeat(k)
            else:
                loss = F.cross_entropy(logits, targets, reduction="none")
                hits = logits.argmax(1) == targets
            ce = loss.view(k, batch).mean(1)
            l1 = m[:, :, :1, :1].flatten(1).sum(1) * pixels if whole else m.flatten(1).sum(1)
            opt.zero_grad(set_to_none=True)
            (ce + cost * l1).sum().backward()
            opt.step()
            with torch.no_grad():
                hit = hits.view(k, batch).float().mean(1)
                window += hit
                better = (hit >= p.success) & (l1 < best)
                best = torch.where(better, l1, best)
                best_masks[better], best_patterns[better] = m[better], pat[better]
                if step % p.adjust_every == 0:
                    works = window / p.adjust_every >= p.success
                    first = works & ~cost_set
                    cost = torch.where(first, torch.full_like(cost, p.init_cost), cost)
                    cost_set |= first
                    cost = torch.where(cost_set & works & ~first, cost * 1.5, cost)
                    cost = torch.where(cost_set & ~works, cost / 1.5**1.5, cost)
                    window.zero_()
                total = float(best.sum())
                since = 0 if total < 0.99 * last_total else since + 1
                last_total = min(last_total, total)
                if torch.isfinite(best).all() and since >= p.patience:
                    break
    finally:
        put_back(moved)
        for q, req in zip(model.parameters(), frozen, strict=True):
            q.requires_grad_(req)
    with torch.no_grad():
        reached = torch.isfinite(best)
        last = ((torch.tanh(mask_raw) + 1) / 2).expand(k, 1, h, w), (torch.tanh(pattern_raw) + 1) / 2
        final = last[0][:, :, :1, :1].flatten(1).sum(1) * pixels if whole else last[0].flatten(1).sum(1)
        masks = torch.where(reached.view(-1, 1, 1, 1), best_masks, last[0])
        patterns = torch.where(reached.view(-1, 1, 1, 1), best_patterns, last[1])
        norms = torch.where(reached, best, final)
    return Inverted(masks.cpu(), patterns.cpu(), norms.cpu(), reached.cpu(), step, form)


def trigger_gap(model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor, inv: Inverted,
                k: int) -> torch.Tensor:  # fmt: skip
    """(units,) the activation gap of the inverted trigger of class `k`, on the images not of class k; reused
    when this process measured the same trigger on the same weights and images (the agent's signal and the
    repairing `verdict` both measure the suspect's: two passes over the defense set, each about 3% of a
    deployment with 5% defense data)."""

    def gap() -> torch.Tensor:
        keep = y != k
        xs, ys = (x[keep], y[keep]) if keep.any() else (x, y)
        with torch.no_grad():
            triggered = inv.apply(k, xs)
        return activation_gap(model, layout, xs, ys, triggered, ys)

    layers = [lay.name for lay in layout.layers]
    # k too: the images measured are those not of class k, whatever its trigger
    return _GAPS.get(gap, model, x, y, inv.masks[k], inv.patterns[k], form=inv.form, layers=layers, k=k).clone()


def untargeted_gap(model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor,
                   inv: Inverted) -> torch.Tensor:  # fmt: skip
    """(units,) the activation gap of an untargeted trigger (invert_untargeted's), on every image."""
    with torch.no_grad():
        triggered = inv.apply(0, x)
    return activation_gap(model, layout, x, y, triggered, y)


UNTARGETED_VERSION = 1
"""invert_untargeted's version, as a shipped reference's untargeted sizes record it."""
MEMO = 64
"""Inversions kept per process (a few hundred KB each for 10 classes of 28x28 masks and patterns)."""
_INVERTED = Memo(MEMO)
_GAPS = Memo(MEMO)


class TriggerInversion(Signal):
    name = "inversion"
    version = 1
    Params = InversionParams
    observed = {"anomaly": ("anomaly_index", 10.0)}  # NC flags above 2, i.e. 0.2 in the observation

    def invert(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Inverted:
        """The inversion of every class, reused when this process inverted the same weights on the same
        images with the same settings (`onp train-agent` computes the class reference on its shadow
        models, then the environment the signal itself: the reference and gate change only what is
        read from the inversion)."""
        with torch.no_grad():
            classes = int(model(x[:1].to(self.device)).shape[1])
        self.check_reference(model, x[:1].to(self.device), classes)
        settings = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in READ_ONLY}
        return _INVERTED.get(
            lambda: invert(model, x, y, classes, self.params, self.seed, self.device),
            model,
            x,
            y,
            settings=settings,
            seed=self.seed,
            device=str(self.device),
            version=self.version,
        )

    def compute(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> SignalResult:
        x, y = x.to(self.device), y.to(self.device)
        inv = self.invert(model, x, y)
        index = self.suspicion(inv.norms)
        k = int(torch.argmax(index))
        return SignalResult(
            self.gated(trigger_gap(model, layout, x, y, inv, k), float(index[k])),
            {"anomaly_index": float(index[k]), "suspect": float(k)},
            {
                "norms": inv.norms.tolist(),
                "reached": inv.reached.tolist(),
                "anomaly": index.tolist(),
                "steps": inv.steps,
            },
        )
