"""Learnable unit masks: the optimisation shared by the mask-learning defenses (RNP's recovery,
MNP's elimination). A mask m in [0, 1] per unit scales the unit's weight part (BatchNorm gamma,
Linear weight row) and keeps its bias: y' = m * (y - bias) + bias, as the released RNP code does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from onp_env.devices import device_of
from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout
from onp_env.masking import split_output
from onp_env.training import augment_defense_batch, defense_augment

Transform = Callable[[torch.Tensor, torch.Tensor, tuple[int, ...], slice], torch.Tensor]


MASK_BN = ("train", "eval")


def check_mask_bn(bn: str) -> None:
    if bn not in MASK_BN:
        raise OnpError(f"unknown mask_bn '{bn}': choose one of {', '.join(MASK_BN)}")


@contextmanager
def unit_hooks(model: nn.Module, layout: UnitLayout, transform: Transform) -> Iterator[None]:
    """While active, every unit layer's output becomes transform(weight part, bias, broadcast shape,
    slice of the layer's units in flat order)."""
    modules = dict(model.named_modules())
    hooks = []
    for lay in layout.layers:
        units = slice(lay.offset, lay.offset + lay.size)

        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, units: slice = units) -> torch.Tensor:
            core, bias, shape = split_output(mod, out)
            return transform(core, bias, shape, units)

        hooks.append(modules[lay.name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def learnable_masks(model: nn.Module, layout: UnitLayout) -> Iterator[torch.Tensor]:
    """Hooks a flat (units,) mask tensor with requires_grad into `model` for the duration."""
    mask = torch.ones(layout.num_units, requires_grad=True, device=device_of(model))
    with unit_hooks(model, layout, lambda core, bias, shape, units: mask[units].view(shape) * core + bias):
        yield mask


def train_masks(
    model: nn.Module,
    layout: UnitLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
    desc: str = "masks",
    augment: str = "none",
    bn: str = "train",
) -> torch.Tensor:
    """Minimise loss_fn(logits, labels, mask) over the masks only (weights frozen), SGD with
    momentum, masks clamped to [0, 1] after every step. Returns the final masks. `progress`: a bar of
    the steps on stderr; `augment` (none, crop, crop-flip or auto): every batch augmented
    (onp_env.training.augment_defense_batch); `bn` (MASK_BN): BatchNorm with batch statistics
    (`train`, as in the released mask-learning code) or the running ones (`eval`)."""
    check_mask_bn(bn)
    augment = defense_augment(augment, x)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(bn == "train")
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    with bar, learnable_masks(model, layout) as mask:
        opt = torch.optim.SGD([mask], lr=lr, momentum=momentum)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                loss = loss_fn(model(augment_defense_batch(x[idx], augment, g)), y[idx], mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
                bar.update()
        model.eval()
        return mask.detach().clone()
