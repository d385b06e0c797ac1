"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017): x' = (1 - alpha) x + alpha * pattern over the whole image.

Departures: the paper blends a Hello-Kitty photograph or random noise; photographs cannot be
shipped here, so the pattern is seeded uniform noise (the paper's random-pattern variant) or a
checkerboard. The same alpha is used for training and testing unless `test_alpha` is set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onp_env.attacks.base import Attack, check_unit
from onp_env.config import SEED_LIMIT, bounded
from onp_env.errors import OnpError


@dataclass
class BlendedParams:
    alpha: float = bounded(0.2, ge=0, le=1)
    """Blend weight of the pattern during poisoning, in [0, 1]."""
    test_alpha: float | None = bounded(None, ge=0, le=1)
    """Blend weight at test time (default: alpha)."""
    pattern: str = "random"
    """random (uniform noise, drawn with pattern_seed) or checker."""
    pattern_seed: int = bounded(0, ge=0, lt=SEED_LIMIT)


class Blended(Attack):
    name = "blended"
    Params = BlendedParams

    def validate(self) -> None:
        p = self.params
        check_unit("alpha", p.alpha)
        if p.test_alpha is not None:
            check_unit("test_alpha", p.test_alpha)
        c, h, w = self.image_shape
        if p.pattern == "random":
            g = torch.Generator().manual_seed(p.pattern_seed)
            self._pattern = torch.rand(c, h, w, generator=g)
        elif p.pattern == "checker":
            i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
            self._pattern = ((i + j) % 2 == 0).float().expand(c, h, w).clone()
        else:
            raise OnpError(f"unknown blend pattern '{p.pattern}': choose random or checker")

    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        p = self.params
        a = p.alpha if train or p.test_alpha is None else p.test_alpha
        return (1 - a) * x + a * self._pattern.to(x.dtype)
