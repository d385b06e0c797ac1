"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021): the
trigger is a fixed smooth warp of the image. A random k x k flow field, normalised by its mean
absolute value and upsampled (bicubic) to the image size, displaces the sampling grid by
s * field / size. In *noise mode* extra "cross" images get the warp plus per-image random noise
and keep their true label, which forces the network to learn the exact warp.

Departures: poisoned and cross images are fixed index sets drawn once with the seed (the paper
re-draws them in every batch); the field is drawn from `grid_seed`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onp_env.attacks.base import Attack
from onp_env.config import SEED_LIMIT, bounded
from onp_env.errors import OnpError


@dataclass
class WaNetParams:
    k: int = bounded(4, ge=2)
    """Side of the random control grid."""
    s: float = bounded(0.5, gt=0)
    """Warping strength."""
    grid_rescale: float = bounded(1.0, gt=0)
    noise: bool = True
    """Noise mode: add cross images (warp + random noise, true label)."""
    cross_ratio: float = bounded(2.0, ge=0)
    """Cross images per poisoned image in noise mode."""
    grid_seed: int = bounded(0, ge=0, lt=SEED_LIMIT)


class WaNet(Attack):
    name = "wanet"
    Params = WaNetParams

    def validate(self) -> None:
        p = self.params
        _, h, w = self.image_shape
        if not 2 <= p.k <= min(h, w):
            raise OnpError(f"wanet grid k must be in [2, {min(h, w)}] for a {h}x{w} image, got {p.k}")
        if p.s <= 0 or p.cross_ratio < 0:
            raise OnpError("wanet needs s > 0 and cross_ratio >= 0")
        g = torch.Generator().manual_seed(p.grid_seed)
        field = torch.rand(1, 2, p.k, p.k, generator=g) * 2 - 1
        field = field / field.abs().mean()
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)  # (1, H, W, 2) as (x, y) offsets
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)[None]
        scale = torch.tensor([w, h], dtype=torch.float32)
        self._grid = (identity + p.s * field / scale * p.grid_rescale).clamp(-1, 1)
        self._scale = scale

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x.dtype), align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self._warp(x, self._grid.expand(len(x), -1, -1, -1))

    def cross_count(self, n_poison: int) -> int:
        return round(self.params.cross_ratio * n_poison) if self.params.noise else 0

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _, h, w = self.image_shape
        noise = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / self._scale
        return self._warp(x, (self._grid + noise).clamp(-1, 1))
