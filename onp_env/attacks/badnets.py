"""BadNets (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", 2017): a small fixed patch stamped on the image, label flipped to the target.

Departures: the patch is one of three synthetic patterns (white, checkerboard, seeded random
binary) rather than the paper's hand-drawn shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onp_env.attacks.base import Attack, patch_origin
from onp_env.config import SEED_LIMIT, bounded
from onp_env.errors import OnpError

PATTERNS = ("checker", "white", "random")


def patch_pattern(kind: str, channels: int, size: int, seed: int) -> torch.Tensor:
    if kind == "white":
        p = torch.ones(size, size)
    elif kind == "checker":
        i = torch.arange(size)
        p = ((i[:, None] + i[None, :]) % 2 == 0).float()
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        p = (torch.rand(size, size, generator=g) > 0.5).float()
    else:
        raise OnpError(f"unknown patch pattern '{kind}': choose one of {', '.join(PATTERNS)}")
    return p.expand(channels, size, size).clone()


class Patch(Attack):
    """Shared by attacks whose trigger is a patch pasted over the image. `locate` checks that the
    patch fits the image and must come before the pattern is built: a crafted patch_size would
    otherwise allocate its (C, size, size) pattern first."""

    _pattern: torch.Tensor

    def locate(self, size: int, position: str | list[int]) -> None:
        self._rc = patch_origin(position, size, self.image_shape)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self._rc
        s = self._pattern.shape[-1]
        out = x.clone()
        out[:, :, r : r + s, c : c + s] = self._pattern.to(x.dtype)
        return out

    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.stamp(x)


@dataclass
class BadNetsParams:
    patch_size: int = bounded(3, ge=1)
    """Side of the square patch, in pixels."""
    position: str | list[int] = "bottom-right"
    """Named corner/center or explicit [row, col] of the patch's top-left pixel."""
    pattern: str = "checker"
    """checker, white or random (binary, drawn with pattern_seed)."""
    pattern_seed: int = bounded(0, ge=0, lt=SEED_LIMIT)


class BadNets(Patch):
    name = "badnets"
    Params = BadNetsParams

    def validate(self) -> None:
        p = self.params
        if p.pattern not in PATTERNS:
            raise OnpError(f"unknown patch pattern '{p.pattern}': choose one of {', '.join(PATTERNS)}")
        self.locate(p.patch_size, p.position)  # before the pattern is built: patch_size must fit the image
        self._pattern = patch_pattern(p.pattern, self.image_shape[0], p.patch_size, p.pattern_seed)
