"""The defense set: a stratified, seeded slice of the training split that the attack never
poisons and the model never trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onp_env.errors import OnpError


@dataclass(frozen=True)
class Split:
    train_idx: torch.Tensor
    """Indices into the dataset's training split used to train the model (poisoned or not)."""
    defense_idx: torch.Tensor
    """Indices into the training split held out for defenses (clean, never trained on)."""


def defense_split(labels: torch.Tensor, fraction: float, seed: int) -> Split:
    """Take round(fraction * n_c) images of every class c, chosen with `seed`."""
    if not 0.0 < fraction < 1.0:
        raise OnpError(f"defense fraction must be in (0, 1), got {fraction}: use e.g. 0.05")
    g = torch.Generator().manual_seed(seed)
    defense = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = round(fraction * len(idx))
        if k == 0:
            raise OnpError(
                f"defense fraction {fraction} leaves class {c} with no defense image "
                f"({len(idx)} training images): use at least {1 / len(idx):.4f}"
            )
        if k == len(idx):
            raise OnpError(f"defense fraction {fraction} leaves class {c} with no training image: use less")
        defense.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    defense_idx = torch.sort(torch.cat(defense)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[defense_idx] = False
    return Split(train_idx=torch.nonzero(keep).flatten(), defense_idx=defense_idx)
