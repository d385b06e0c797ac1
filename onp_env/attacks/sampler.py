"""A seeded sampler of attack settings, for shadow zoos that do not teach one trigger per attack.

Each draw is an AttackConfig with its own label (`{attack}-{index:03d}`): the target class, all-to-one
or all-to-all, the poison rate, and the trigger's settings (patch size, position and pattern; blend
weight and pattern; warp strength and grid; sinusoid amplitude and frequency), plus the seed of every
random pattern, so that no two draws share a trigger. The ranges are the sampler's config: a
configuration-shift test set holds settings outside them (other positions or patterns, stronger or
weaker triggers)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from onp_env.attacks.badnets import PATTERNS
from onp_env.attacks.base import POSITIONS
from onp_env.config import SEED_LIMIT, AttackConfig, bounded
from onp_env.errors import OnpError

ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")
CLEAN_LABEL = ("sig",)
"""Attacks that poison target-class images only: always all-to-one."""


@dataclass
class SamplerConfig:
    count: int = bounded(20, ge=1, le=10_000)
    """Attack settings drawn; draw i is of attack `attacks[i % len(attacks)]`."""
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    all_to_all: float = bounded(0.0, ge=0, le=1)
    """Share of the dirty-label draws that are all-to-all (label y -> y + 1)."""
    poison_rate: list[float] = bounded([0.05, 0.15], gt=0, lt=1)
    """[low, high]: drawn uniformly, as every range below."""
    clean_label_rate: list[float] = bounded([0.04, 0.09], gt=0, lt=1)
    """The poison rate of clean-label attacks (SIG), which poison target-class images only: a class
    holds a tenth of a balanced 10-class training split, so their rate stays below 0.1."""
    patch_size: list[int] = bounded([2, 4], ge=1, le=4096)
    """Side of BadNets' and TrojanNN's patch, in pixels."""
    positions: list[str] = field(default_factory=lambda: ["bottom-right", "bottom-left", "top-right", "top-left"])
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    """BadNets' patch patterns."""
    alpha: list[float] = bounded([0.1, 0.3], ge=0, le=1)
    """Blended's weight."""
    blend_patterns: list[str] = field(default_factory=lambda: ["random", "checker"])
    warp: list[float] = bounded([0.3, 0.75], gt=0, le=100)
    """WaNet's warping strength s."""
    sig_delta: list[float] = bounded([0.05, 0.1], gt=0, le=0.5)
    """SIG's training amplitude (its test amplitude is twice that, as in the paper)."""
    sig_frequency: list[float] = bounded([4.0, 8.0], gt=0, le=1000)


def check_sampler(cfg: SamplerConfig, where: str) -> None:
    """What the field ranges cannot express: known names, [low, high] pairs."""
    for name, values, allowed in (("attacks", cfg.attacks, ATTACKS), ("positions", cfg.positions, POSITIONS),
                                  ("patterns", cfg.patterns, PATTERNS),
                                  ("blend_patterns", cfg.blend_patterns, ("random", "checker"))):  # fmt: skip
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise OnpError(f"{where}.{name} must list some of {', '.join(allowed)}, got {values}")
    for name in ("poison_rate", "clean_label_rate", "patch_size", "alpha", "warp", "sig_delta", "sig_frequency"):
        pair = getattr(cfg, name)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise OnpError(f"{where}.{name} must be [low, high] with low <= high, got {pair}")


def sample_attacks(cfg: SamplerConfig, num_classes: int) -> list[AttackConfig]:
    """`cfg.count` attack settings, the same for the same config (and class count) on any machine."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.count):
        name = cfg.attacks[i % len(cfg.attacks)]
        mode = "all-to-one"
        if name not in CLEAN_LABEL and rng.random() < cfg.all_to_all:
            mode = "all-to-all"
        target = rng.randrange(num_classes)
        rate = round(rng.uniform(*(cfg.clean_label_rate if name in CLEAN_LABEL else cfg.poison_rate)), 4)
        seed = rng.randrange(2**31)
        params: dict[str, object]
        if name == "badnets":
            params = {"patch_size": rng.randint(*cfg.patch_size), "position": rng.choice(cfg.positions),
                      "pattern": rng.choice(cfg.patterns), "pattern_seed": seed}  # fmt: skip
        elif name == "trojannn":
            params = {"patch_size": rng.randint(*cfg.patch_size), "position": rng.choice(cfg.positions),
                      "neurons": 1, "steps": 300, "seed": seed}  # fmt: skip
        elif name == "blended":
            params = {"alpha": round(rng.uniform(*cfg.alpha), 3), "pattern": rng.choice(cfg.blend_patterns),
                      "pattern_seed": seed}  # fmt: skip
        elif name == "wanet":
            params = {
                "k": 4,
                "s": round(rng.uniform(*cfg.warp), 3),
                "noise": True,
                "cross_ratio": 2.0,
                "grid_seed": seed,
            }
        else:  # sig
            delta = round(rng.uniform(*cfg.sig_delta), 4)
            params = {"delta": delta, "test_delta": 2 * delta, "frequency": round(rng.uniform(*cfg.sig_frequency), 2)}
        out.append(AttackConfig(name, target, mode, rate, params, label=f"{name}-{i:03d}"))
    return out
