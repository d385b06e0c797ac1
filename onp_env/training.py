"""Supervised training of (possibly poisoned) models: SGD with momentum, cosine learning rate,
seeded batch order, optional shift/flip augmentation in plain torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
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
    if kind == "none":
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(-1, x.shape[1], -1, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(-1, x.shape[1], h, -1)
    out = out.gather(3, cols)
    if kind == "crop-flip":
        flip = torch.rand(n, generator=g) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def train(
    model: nn.Module,
    data: PoisonedSet,
    cfg: TrainConfig,
    seed: int,
    desc: str = "train",
    progress: bool = True,
    after_step: Callable[[float], None] | None = None,
) -> float:
    """Train `model` in place on `cfg.device` (it is returned to the CPU); returns the seconds it
    took. `after_step(lr)` runs after every optimiser step (e.g. a defense's extra regularisation)."""
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
        for _ in range(cfg.epochs):
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
