"""The suites' recipes: which models each split holds, how they are trained, and the frozen env settings.

A suite is versioned as a whole (`digits-v0`, gym id `onp_env/Digits-v0`). Its version is bumped
whenever a change can move a score: the zoo recipe (base lab config, sampler draws, seeds), the env's
features, reward, budget or padding, or the manifest's models. Old ids are never redefined, so that
numbers published against one stay comparable (docs/suite.md).

Splits draw their models from the attack sampler (onp_env/attacks/sampler.py) with seeds of their own:
`train` and `test` from the same ranges (model seeds and sampler seeds disjoint: a generalisation gap
across draws), `test-ood` from one attack type `train` never holds and from settings outside the
sampler's ranges (other positions, larger patches, stronger blends, higher poison rates, more
all-to-all)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onp_env.attacks.sampler import SamplerConfig, sample_attacks
from onp_env.config import LabConfig, from_dict
from onp_env.errors import OnpError

SPLITS = ("train", "test", "test-ood")


@dataclass(frozen=True)
class Draws:
    """Models of one sampler config: each draw trained once with each model seed."""

    sampler: dict[str, Any]
    seed: int


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    """Versioned name, `{family}-v{N}`: the prefix of every model name."""
    gym_id: str
    base: dict[str, Any]
    """The LabConfig every model starts from (its attack replaced by each draw)."""
    splits: dict[str, tuple[Draws, ...]]
    env: dict[str, Any]
    """EnvConfig settings frozen with the id: features and their settings (signals at their defaults,
    without a class reference), budget, reward weights and the padding sizes that keep observation
    shapes equal across splits (max_edges: the graph's bound, edge_k incoming
    edges plus 2 * k_intra symmetric intra-layer edges per unit)."""
    description: str
    held_out_attack: str
    """The attack type only test-ood holds."""
    tolerance: dict[str, float] = field(default_factory=lambda: {"acc": 0.03, "asr": 0.1})
    """How far a model built here may fall from the manifest's clean ACC and ASR (absolute): weights
    are not bit-identical across machines and torch builds."""

    def labs(self, split: str) -> list[tuple[str, LabConfig]]:
        """(stable model name, lab config) of every model of `split`, in a fixed order."""
        if split not in self.splits:
            raise OnpError(f"unknown split '{split}' of suite {self.name}: choose one of {', '.join(SPLITS)}")
        base = from_dict(LabConfig, self.base, f"suite {self.name} base")
        info_classes = 10  # every suite's data has 10 classes; sample_attacks draws targets below it
        out: list[tuple[str, LabConfig]] = []
        for draws in self.splits[split]:
            sampler = from_dict(SamplerConfig, draws.sampler, f"suite {self.name} {split} sampler")
            for attack in sample_attacks(sampler, info_classes):
                index = len(out)
                lab = dataclasses.replace(base, name=f"{self.name}-{split}-{index:03d}", seed=draws.seed, attack=attack)
                out.append((f"{self.name}/{split}/{index:03d}", lab))
        return out


# Digits (8x8 images): patches of 1-2 pixels, SIG at the amplitude and frequency an 8x8 image carries,
# WaNet's warp strength of configs/attack/wanet-digits.yaml. Each model trains in 1-4 s on one thread.
_DIGITS_BASE = {
    "data": {"name": "digits", "defense_fraction": 0.05},
    "model": {"name": "small_cnn"},
    "train": {"epochs": 30, "batch_size": 64, "lr": 0.05, "threads": 1},
}
_DIGITS_RANGES = {"patch_size": [1, 2], "sig_delta": [0.3, 0.4], "sig_frequency": [1.0, 2.0], "warp": [0.75, 1.25]}
_IN = ["badnets", "blended", "sig", "trojannn"]
_SHIFT = {  # every range outside the in-distribution one, or a value it never drew; per data set below
    "attacks": _IN, "all_to_all": 0.5, "poison_rate": [0.2, 0.25], "positions": ["center"], "alpha": [0.35, 0.45],
}  # fmt: skip
_DIGITS_SHIFT = {**_SHIFT, "patch_size": [3, 3], "sig_delta": [0.45, 0.5], "sig_frequency": [3.0, 3.0]}

DIGITS = SuiteSpec(
    name="digits-v0",
    gym_id="onp_env/Digits-v0",
    base=_DIGITS_BASE,
    splits={
        "train": (Draws({"count": 16, "seed": 1001, "attacks": _IN, "all_to_all": 0.1, **_DIGITS_RANGES}, 1),),
        "test": (Draws({"count": 8, "seed": 1002, "attacks": _IN, "all_to_all": 0.1, **_DIGITS_RANGES}, 2),),
        "test-ood": (
            Draws({"count": 4, "seed": 1003, "attacks": ["wanet"], **_DIGITS_RANGES}, 3),
            Draws({"count": 4, "seed": 1004, **_DIGITS_RANGES, **_DIGITS_SHIFT}, 3),
        ),
    },
    env={
        "features": ["dynamic"],
        "signal_params": {},
        "budget": 0.3,
        "max_acc_drop": 0.2,
        "eval_images": 512,
        "max_units": 176,
        "max_edges": 2816,
    },  # fmt: skip
    description="small CNNs on the embedded 8x8 digits: built in about a minute, for tests and quick iteration",
    held_out_attack="wanet",
)

# Fashion-MNIST: the recipe of the shipped agent's shadow zoo (configs/agent/fashion-mnist-sampled.yaml),
# with its signals; about 50 s per model on one thread.
_FM_IN = {"attacks": _IN, "all_to_all": 0.1}
_FM_SHIFT = {**_SHIFT, "patch_size": [5, 6], "sig_delta": [0.12, 0.15], "sig_frequency": [10.0, 12.0]}

FASHION_MNIST = SuiteSpec(
    name="fashion-mnist-v0",
    gym_id="onp_env/FashionMNIST-v0",
    base={
        "data": {"name": "fashion-mnist", "defense_fraction": 0.05},
        "model": {"name": "small_cnn"},
        "train": {"epochs": 4, "batch_size": 128, "lr": 0.05, "threads": 1},
    },
    splits={
        "train": (Draws({"count": 20, "seed": 2001, **_FM_IN}, 11),),
        "test": (Draws({"count": 10, "seed": 2002, **_FM_IN}, 12),),
        "test-ood": (
            Draws({"count": 5, "seed": 2003, "attacks": ["wanet"]}, 13),
            Draws({"count": 5, "seed": 2004, **_FM_SHIFT}, 13),
        ),
    },
    env={
        "features": ["dynamic", "mnp", "inversion", "latent_gap"],
        "signal_params": {},
        "budget": 0.2,
        "max_acc_drop": 0.1,
        "eval_images": 256,
        "max_units": 176,
        "max_edges": 2816,
    },  # fmt: skip
    description="small CNNs on Fashion-MNIST (apt-get install dataset-fashion-mnist), with the trigger-free "
    "signals the shipped agent sees (z-scored as they are, without its class reference); about 50 s per model to "
    "build",
    held_out_attack="wanet",
)

SUITES = {s.name: s for s in (DIGITS, FASHION_MNIST)}
BY_GYM_ID = {s.gym_id: s for s in SUITES.values()}


def get_suite(name: str) -> SuiteSpec:
    """A suite by its name (`digits-v0`) or gym id (`onp_env/Digits-v0`)."""
    spec = SUITES.get(name) or BY_GYM_ID.get(name)
    if spec is None:
        known = ", ".join(f"{s.name} ({s.gym_id})" for s in SUITES.values())
        raise OnpError(f"unknown suite '{name}': choose one of {known} (`onp suite list`)")
    return spec


def register() -> None:
    """Register every suite id with Gymnasium (on `import onp_env`); the env is imported on make."""
    import gymnasium

    for spec in SUITES.values():
        if spec.gym_id not in gymnasium.registry:
            gymnasium.register(id=spec.gym_id, entry_point="onp_env.suite.envs:SuiteEnv", kwargs={"suite": spec.name})
