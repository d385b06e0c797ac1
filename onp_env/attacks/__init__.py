"""Backdoor attacks: trigger specs, target rules and on-the-fly poisoned training data."""

from __future__ import annotations

from typing import Any

from onp_env.attacks.badnets import BadNets
from onp_env.attacks.base import Attack, choose_poison
from onp_env.attacks.blended import Blended
from onp_env.attacks.poison import PoisonedSet
from onp_env.attacks.sig import SIG
from onp_env.attacks.trojannn import TrojanNN
from onp_env.attacks.wanet import WaNet
from onp_env.errors import OnpError

ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (BadNets, Blended, WaNet, SIG, TrojanNN)}


def build_attack(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 0,
    mode: str = "all-to-one",
    params: dict[str, Any] | None = None,
) -> Attack:
    if name not in ATTACKS:
        raise OnpError(f"unknown attack '{name}': choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](dict(params or {}), target, mode, image_shape, num_classes)


__all__ = ["ATTACKS", "Attack", "PoisonedSet", "build_attack", "choose_poison"]
