"""Poisoned training data produced on the fly, batch by batch, from index sets: the dataset is
never copied, on disk or in memory."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from onp_env.attacks.base import Attack


class PoisonedSet:
    """Images `x`, labels `y`; positions `poison` carry the trigger (and the target label unless
    the attack is clean-label), positions `cross` carry the attack's cross transform."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        attack: Attack | None = None,
        poison: torch.Tensor | None = None,
        cross: torch.Tensor | None = None,
    ):
        self.x, self.y, self.attack = x, y, attack
        self.is_poison = torch.zeros(len(y), dtype=torch.bool)
        self.is_cross = torch.zeros(len(y), dtype=torch.bool)
        if poison is not None:
            self.is_poison[poison] = True
        if cross is not None:
            self.is_cross[cross] = True

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.x[idx], self.y[idx]  # advanced indexing copies: safe to write in place
        if self.attack is None:
            return x, y
        p, c = self.is_poison[idx], self.is_cross[idx]
        if p.any():
            x[p] = self.attack.apply(x[p], train=True)
            if not self.attack.clean_label:
                y[p] = self.attack.targets(y[p])
        if c.any():
            x[c] = self.attack.apply_cross(x[c], generator)
        return x, y

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator)
        for i in range(0, len(order), batch_size):
            yield self.batch(order[i : i + batch_size], generator)
