"""ANP, Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021), following the authors' released procedure (docs/methods.md).

Every unit k gets a mask m_k in [0, 1] (init 1) and perturbations d_k (on its weight) and x_k (on
its bias). Perturbed forward: weight * (m + d), bias * (1 + x); clean forward: weight * m. Per
iteration, on a batch of 128 defense images drawn with replacement: draw d, x ~ U[-eps, eps];
take `anp_steps` signed ascent steps of size eps / anp_steps on the perturbed loss (no projection);
then one SGD step (lr 0.2, momentum 0.9) on alpha * CE(clean) + (1 - alpha) * CE(perturbed) for the
masks, clamped to [0, 1]. BatchNorm uses batch statistics (train mode) throughout. Units whose mask
ends at or below the threshold (0.2) are pruned in the *original* weights. Defaults: eps 0.4, alpha
0.2, 2000 iterations. Every batch goes through `augment`: the released code's random crop (padding 4
on 32x32) + horizontal flip by default on colour images, none on grayscale ones (see the parameter).

Implementation: the clean and perturbed halves of the mask loss are back-propagated separately (the
gradient of each mask is the same two-term sum); `parallel=True` runs the clean half on a second core
while the perturbation is found, with bit-identical masks (tested; speed in
benchmarks/results/anp_speed.md).

Departures from the released code:
- hidden Linear neurons are treated like BatchNorm channels (weight row for gamma, bias for beta),
  since on small CNNs the backdoor sits partly there;
- the pruned model uses this project's mask semantics, `zero` by default (the unit outputs 0); the
  released code zeroes only gamma, so the channel outputs its beta: semantics="gamma";
- no augmentation on grayscale data by default (`augment: auto`), where the released code always
  crops and flips."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from baselines.common import Defense, top_units
from baselines.masked_training import unit_hooks
from onp_env.config import bounded
from onp_env.devices import device_of
from onp_env.graph.units import UnitLayout
from onp_env.training import augment_defense_batch, check_defense_augment, defense_augment


@dataclass
class ANPParams:
    eps: float = bounded(0.4, ge=0)
    """Perturbation budget: d and x are drawn from [-eps, eps] (0: no perturbation)."""
    alpha: float = bounded(0.2, ge=0, le=1)
    """Weight of the clean loss; 1 - alpha weighs the perturbed one."""
    anp_steps: int = bounded(1, ge=1)
    iterations: int = bounded(2000, ge=1)
    batch_size: int = bounded(128, ge=1)
    lr: float = bounded(0.2, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    threshold: float = bounded(0.2, ge=0, le=1)
    """Units whose mask (in [0, 1]) ends at or below this are pruned."""
    augment: str = "auto"
    """Augmentation of every defense batch: none, crop, crop-flip, or auto (crop-flip on colour
    images as released, none on grayscale ones: flipping digits is wrong)."""
    progress: bool = False
    """A progress bar of the iterations on stderr."""
    parallel: bool = False
    """Run the clean half of each mask step in a second thread (same numbers, bit for bit; faster
    with two cores, which `onp bench` reserves for the cell; see benchmarks/results/anp_speed.md)."""

    def __post_init__(self) -> None:
        check_defense_augment(self.augment)


class ANP(Defense):
    name = "anp"
    Params = ANPParams

    @classmethod
    def cell_cpus(cls, params: dict[str, Any], threads: int) -> int:
        """`parallel` runs the clean half in a second thread with as many torch threads."""
        return 2 * threads if params.get("parallel") is True else threads

    def optimise_masks(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        for q in model.parameters():
            q.requires_grad_(False)
        clean_model = copy.deepcopy(model)  # its own BatchNorm buffers: the clean pass may run in another thread
        model.train()
        clean_model.train()
        device = device_of(model)
        mask = torch.ones(layout.num_units, requires_grad=True, device=device)
        noise_w = torch.zeros(layout.num_units, requires_grad=True, device=device)
        noise_b = torch.zeros(layout.num_units, requires_grad=True, device=device)

        def clean(core: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...], units: slice) -> torch.Tensor:
            return mask[units].view(shape) * core + bias

        def perturbed(core: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...], units: slice) -> torch.Tensor:
            m = mask[units].view(shape) + noise_w[units].view(shape)
            return m * core + bias * (1 + noise_b[units].view(shape))

        def clean_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            (p.alpha * F.cross_entropy(clean_model(xb), yb)).backward()

        net = model if p.eps > 0 else clean_model
        mask_opt = torch.optim.SGD([mask], lr=p.lr, momentum=p.momentum)
        g = torch.Generator().manual_seed(self.seed)
        self.extra["augment"] = kind = defense_augment(p.augment, x)
        pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        with pool, unit_hooks(clean_model, layout, clean), unit_hooks(model, layout, perturbed):
            for _ in tqdm(range(p.iterations), desc="anp", disable=not p.progress, leave=False):
                idx = torch.randint(len(x), (p.batch_size,), generator=g)
                xb, yb = augment_defense_batch(x[idx], kind, g), y[idx]
                mask_opt.zero_grad()
                # The clean term does not depend on the perturbation: with parallel=True it runs on the
                # other core while the perturbation is found. Each mask gradient is then the sum of one
                # clean and one perturbed contribution, and that sum does not depend on the order.
                pending = pool.submit(clean_step, xb, yb) if p.parallel else None
                if pending is None:
                    clean_step(xb, yb)
                if p.eps > 0:
                    with torch.no_grad():  # drawn on the CPU: the same perturbations on every device
                        noise_w.copy_(torch.empty(layout.num_units).uniform_(-p.eps, p.eps, generator=g))
                        noise_b.copy_(torch.empty(layout.num_units).uniform_(-p.eps, p.eps, generator=g))
                    for _ in range(p.anp_steps):
                        grads = torch.autograd.grad(F.cross_entropy(net(xb), yb), [noise_w, noise_b])
                        self.ascend((noise_w, noise_b), grads)
                    ((1 - p.alpha) * F.cross_entropy(net(xb), yb)).backward()
                if pending is not None:
                    pending.result()
                mask_opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
        model.eval()
        return mask.detach()

    def ascend(self, noise: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...]) -> None:
        """One signed ascent step of size eps / anp_steps on the perturbations, no projection."""
        with torch.no_grad():
            for n, g in zip(noise, grads, strict=True):
                n += self.params.eps / self.params.anp_steps * g.sign()

    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - self.optimise_masks(model, layout, x, y)

    def select(self, scores, model, layout, x, y) -> list[int]:
        return top_units(scores, (1 - scores) <= self.params.threshold)
