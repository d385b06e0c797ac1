"""What every attack shares: validated parameters, target labels, patch placement, and the choice of
which training images to poison."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from onp_env.config import from_dict, short_repr
from onp_env.errors import OnpError

MODES = ("all-to-one", "all-to-all")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


class Attack(ABC):
    """A trigger, fully described by `params` (a dataclass), plus its target rule.

    `apply(x)` maps clean images in [0, 1] (N, C, H, W) to triggered ones; the label attached to a
    poisoned training image is `targets(y)` except for clean-label attacks, which keep it.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    clean_label: ClassVar[bool] = False
    needs_reference_model: ClassVar[bool] = False

    def __init__(
        self,
        params: dict[str, Any],
        target: int,
        mode: str,
        image_shape: tuple[int, int, int],
        num_classes: int,
    ):
        # typed and range-checked against the Params dataclass (onp_env.config.bounded)
        self.params: Any = from_dict(self.Params, params, f"attack '{self.name}' parameters")
        if mode not in MODES:
            raise OnpError(f"unknown target mode '{mode}': choose one of {', '.join(MODES)}")
        if not (isinstance(target, int) and 0 <= target < num_classes):
            raise OnpError(f"target label {target} out of range for {num_classes} classes: use 0..{num_classes - 1}")
        self.target, self.mode = target, mode
        c, h, w = image_shape
        self.image_shape: tuple[int, int, int] = (int(c), int(h), int(w))
        self.num_classes = num_classes
        self.validate()

    @abstractmethod
    def validate(self) -> None:
        """Check the parameters against the image shape (raise OnpError) and precompute the trigger."""

    @abstractmethod
    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Triggered copy of `x`. `train=True` for poisoned training images (some attacks use a
        weaker trigger at training time than at test time)."""

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "all-to-all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Training images that may be poisoned: for dirty-label attacks those whose label would
        change, for clean-label attacks those already of the target class."""
        if self.clean_label:
            return y == self.target
        return self.targets(y) != y

    def prepare(self, model: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
        """Build the trigger from a trained clean `model` (attacks with needs_reference_model);
        returns a JSON-serialisable report for the manifest."""
        raise NotImplementedError(f"attack '{self.name}' needs no reference model")

    def cross_count(self, n_poison: int) -> int:
        """Extra training images carrying a non-trigger transform with their true label."""
        return 0

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this attack, JSON-serialisable."""
        return {
            "name": self.name,
            "target": self.target,
            "mode": self.mode,
            "params": dataclasses.asdict(self.params),
        }


def choose_poison(attack: Attack, y: torch.Tensor, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into `y`) of the poisoned images and of the attack's cross images."""
    if not 0.0 < rate < 1.0:
        raise OnpError(f"poisoning rate must be in (0, 1), got {rate}: use e.g. 0.1")
    n = round(rate * len(y))
    pool = torch.nonzero(attack.candidates(y)).flatten()
    if n == 0:
        raise OnpError(f"poisoning rate {rate} poisons no image of {len(y)}: raise it")
    if n > len(pool):
        kind = "target-class" if attack.clean_label else "eligible"
        raise OnpError(
            f"poisoning rate {rate} asks for {n} poisoned images but only {len(pool)} {kind} "
            f"images exist: use at most {len(pool) / len(y):.3f}"
        )
    g = torch.Generator().manual_seed(seed)
    poison = pool[torch.randperm(len(pool), generator=g)[:n]]
    n_cross = attack.cross_count(n)
    cross = torch.empty(0, dtype=torch.long)
    if n_cross:
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[poison] = False
        others = torch.nonzero(rest).flatten()
        cross = others[torch.randperm(len(others), generator=g)[: min(n_cross, len(others))]]
    return torch.sort(poison).values, torch.sort(cross).values


def patch_origin(
    position: str | list[int] | tuple[int, int], size: int, shape: tuple[int, int, int]
) -> tuple[int, int]:
    """Top-left corner of a size x size patch at a named position or explicit [row, col]."""
    _, h, w = shape
    if size < 1:
        raise OnpError(f"patch size must be >= 1, got {size}")
    named = {
        "bottom-right": (h - size - 1, w - size - 1),
        "bottom-left": (h - size - 1, 1),
        "top-right": (1, w - size - 1),
        "top-left": (1, 1),
        "center": ((h - size) // 2, (w - size) // 2),
    }
    if isinstance(position, str):
        if position not in named:
            raise OnpError(f"unknown patch position '{position}': use one of {', '.join(POSITIONS)} or [row, col]")
        r, c = named[position]
        # Named positions keep a 1-pixel margin; drop it when the image is too small for one.
        if size + 2 > h:
            r = 0 if position != "center" else r
        if size + 2 > w:
            c = 0 if position != "center" else c
    else:
        if len(position) != 2:
            raise OnpError(
                f"patch position {short_repr(list(position))} must be [row, col] or one of {', '.join(POSITIONS)}"
            )
        r, c = (int(v) for v in position)
    if r < 0 or c < 0 or r + size > h or c + size > w:
        raise OnpError(
            f"a {size}x{size} patch at {position} does not fit a {h}x{w} image: "
            f"use a patch size <= {min(h, w)} or another position"
        )
    return r, c


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise OnpError(f"{name} must be in [0, 1], got {value}")
