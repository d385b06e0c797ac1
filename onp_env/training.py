"""Supervised training of (possibly poisoned) models: SGD with momentum, cosine learning rate,
seeded batch order, optional shift/flip augmentation in plain torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from onp_env.attacks.poison import PoisonedSet
from onp_env.config import TrainConfig
from onp_env.devices import resolve_device
from onp_env.errors import OnpError

AUGMENTS = ("none", "crop", "crop-flip")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def augment(x: torch.Tensor, kind: str, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """A random crop of the zero-padded images (a shift of up to `pad` pixels) and, for crop-flip, a
    horizontal flip of half of them. `g` is a CPU generator: the same draws on every device."""
    if kind not in AUGMENTS:
        raise OnpError(f"unknown augment '{kind}': choose one of {', '.join(AUGMENTS)}")
    if kind == "none":
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = torch.arange(h, device=x.device)
    rows = (dy[:, None] + rows[None, :])[:, None, :, None].expand(-1, x.shape[1], -1, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = torch.arange(w, device=x.device)
    cols = (dx[:, None] + cols[None, :])[:, None, None, :].expand(-1, x.shape[1], h, -1)
    out = out.gather(3, cols)
    if kind == "crop-flip":
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


DEFENSE_AUGMENTS = ("auto", *AUGMENTS)
"""Augmentations of the defense set for the mask-learning defenses (ANP, RNP)."""


def check_defense_augment(kind: str) -> None:
    if kind not in DEFENSE_AUGMENTS:
        raise OnpError(f"unknown augment '{kind}': choose one of {', '.join(DEFENSE_AUGMENTS)}")


def defense_augment(kind: str, x: torch.Tensor) -> str:
    """The augmentation `kind` means for defense images `x`. `auto`: crop-flip for colour images
    (the released ANP and RNP code's CIFAR-10 setting), none for grayscale ones (flipping a digit
    changes what it shows, and the lab's default training config trains without augmentation)."""
    check_defense_augment(kind)
    if kind == "auto":
        return "crop-flip" if x.ndim == 4 and x.shape[1] == 3 else "none"
    if kind != "none" and x.ndim != 4:
        raise OnpError(f"augment '{kind}' needs images (batch, channels, height, width): set augment: none")
    return kind


def augment_defense_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """`augment` with the released code's padding scaled to the image: 4 pixels on 32x32 images
    (an eighth of the width, at least 1)."""
    return augment(x, kind, g, pad=max(1, x.shape[-1] // 8))


def train(
    model: nn.Module,
    data: PoisonedSet,
    cfg: TrainConfig,
    seed: int,
    desc: str = "train",
    progress: bool = True,
    after_step: Callable[[float], None] | None = None,
    before_epoch: Callable[[nn.Module, int], None] | None = None,
) -> float:
    """Train `model` in place on `cfg.device` (it is returned to the CPU); returns the seconds it
    took. `after_step(lr)` runs after every optimiser step (e.g. a defense's extra regularisation);
    `before_epoch(model, epoch)` before each epoch's first batch (it may rewrite `data`'s images; the
    model is put back in training mode after it)."""
    if cfg.augment not in AUGMENTS:
        raise OnpError(f"unknown augment '{cfg.augment}': choose one of {', '.join(AUGMENTS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise OnpError("train needs epochs >= 1, batch_size >= 1 and lr > 0")
    device = resolve_device(cfg.device)
    g = torch.Generator().manual_seed(seed)  # on the CPU: batch order and augmentation match across devices
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(data) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.perf_counter()
    model.train()
    with torch_threads(cfg.threads), tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for epoch in range(cfg.epochs):
            if before_epoch is not None:
                before_epoch(model, epoch)
                model.train()
            for x, y in data.batches(cfg.batch_size, g):
                loss = F.cross_entropy(model(augment(x, cfg.augment, g).to(device)), y.to(device))
                if not torch.isfinite(loss):
                    raise OnpError(f"training diverged (loss {loss.item()}): lower train.lr (now {cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(float(sched.get_last_lr()[0]))
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval().cpu()  # artifacts, metrics and defenses take it on the CPU
    return time.perf_counter() - start


def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64, only: str = "") -> nn.Module:
    """`model` with its BatchNorm layers' running statistics re-estimated on `x` (cumulative averages over its
    batches, with whatever forward hooks it holds, e.g. pruning masks): those whose names start with `only`, every
    one where it is empty. No weight changes; the model is left in eval mode. A cut upstream of a BatchNorm layer
    shifts what that layer sees; its stale statistics can then hide a behaviour (a backdoor, say) that any training
    on clean images, which re-estimates them, brings back."""
    norms = [m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n.startswith(only)]
    return reestimate_norms(model, norms, x, batch_size)


def reestimate_norms(model: nn.Module, norms: list[_BatchNorm], x: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """`model` with the running statistics of `norms` (BatchNorm layers of it) re-estimated on `x`, as
    reestimate_batchnorm does; the others keep theirs."""
    model.eval()
    if not norms:  # nothing to re-estimate (a cut below the last BatchNorm layer): no pass over `x`
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()
