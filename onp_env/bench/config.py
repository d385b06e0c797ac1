"""The benchmark grid, in the project's one config schema: datasets x models x attacks x seeds give
the backdoored models (trained through the lab's cache), and each is defended by every defense at
every defense-data fraction. Defenses are registered names (onp_env.registry) with parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onp_env.attacks import build_attack
from onp_env.config import (
    NAME,
    NAME_RULE,
    AttackConfig,
    DataConfig,
    LabConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    bounded,
    check_labels,
    from_dict,
    read_yaml,
)
from onp_env.data import load_dataset
from onp_env.defend import RUN_KEYS, check_run
from onp_env.devices import resolve_device
from onp_env.errors import OnpError
from onp_env.models import build_model
from onp_env.presets import preset_of
from onp_env.registry import defense_class
from onp_env.training import AUGMENTS

MAX_CELLS = 100_000


@dataclass
class DefenseSpec:
    name: str
    """A registered defense (onp defend --method NAME)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Its parameters and run keys (semantics, device: onp_env.defend.RunParams); a learned one may
    take what its `prepare` understands (onp: agent_config)."""
    label: str | None = None
    """Its name in the tables (default: name); two specs of one defense need distinct labels."""
    preset: str | None = None
    """Named parameters the defense lists (onp defend --preset), which `params` then change; resolved per cell,
    where the defense set's size is known."""

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class BenchConfig:
    name: str = "bench"
    datasets: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "digits"}])
    """DataConfig entries; each model's defense set is the largest fraction, smaller ones are subsets."""
    models: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "small_cnn"}])
    """ModelConfig entries."""
    attacks: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "badnets"}])
    """AttackConfig entries."""
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: list[int] = field(default_factory=lambda: [101])
    """Model seeds (keep them apart from the seeds of a learned defense's shadow models)."""
    fractions: list[float] = field(default_factory=lambda: [0.05])
    """Defense data as shares of the training split."""
    defenses: list[dict[str, Any]] = field(default_factory=list)
    """DefenseSpec entries: {name, params, label, preset}."""
    workers: int = bounded(1, ge=1, le=256)
    """Worker processes (workers x threads should not exceed the machine's cores)."""
    threads: int = bounded(1, ge=1, le=256)
    """torch threads per worker."""

    def data(self) -> list[DataConfig]:
        return [from_dict(DataConfig, d, f"bench.datasets[{i}]") for i, d in enumerate(self.datasets)]

    def defense_specs(self) -> list[DefenseSpec]:
        return [from_dict(DefenseSpec, d, f"bench.defenses[{i}]") for i, d in enumerate(self.defenses)]

    def labs(self) -> list[LabConfig]:
        """One LabConfig per backdoored model of the grid."""
        out = []
        for data in self.data():
            data = dataclasses.replace(data, defense_fraction=max(self.fractions))
            for i, m in enumerate(self.models):
                model = from_dict(ModelConfig, m, f"bench.models[{i}]")
                for j, a in enumerate(self.attacks):
                    attack = from_dict(AttackConfig, a, f"bench.attacks[{j}]")
                    for seed in self.seeds:
                        name = f"{self.name}-{data.name}-{model.name}-{attack.key}-s{seed}"
                        out.append(LabConfig(name, seed, data, model, attack, self.train))
        return out


def attack_key(attack: dict[str, Any]) -> str:
    """An attack setting's name in a recorded config (AttackConfig.key)."""
    return str(attack.get("label") or attack["name"])


def model_key(lab: LabConfig) -> str:
    assert lab.attack is not None
    return f"{lab.data.name}/{lab.model.name}/{lab.attack.key}/s{lab.seed}"


def _check_labs(cfg: BenchConfig) -> None:
    """Every model of the grid is buildable: attack against the data, architecture (on the meta
    device: nothing allocated), device and augmentation, before any of them trains."""
    for what, entries in (("datasets", cfg.datasets), ("models", cfg.models)):
        names = [e.get("name") for e in entries]
        if len(set(names)) != len(names):
            raise OnpError(f"bench.{what} lists a name twice ({names}): a grid holds one setting per name; "
                           "split it into two configs")  # fmt: skip
    keys = [from_dict(AttackConfig, a, f"bench.attacks[{i}]").key for i, a in enumerate(cfg.attacks)]
    if len(set(keys)) != len(keys):
        raise OnpError(f"bench.attacks repeat a name ({keys}): give each setting of one attack its own label")
    check_labels(keys, "bench.attacks")
    infos = {d.name: load_dataset(d.name, d.root).info for d in cfg.data()}
    resolve_device(cfg.train.device)
    if cfg.train.augment not in AUGMENTS:
        raise OnpError(f"unknown augment '{cfg.train.augment}': choose one of {', '.join(AUGMENTS)}")
    for lab in cfg.labs():
        info, a = infos[lab.data.name], lab.attack
        assert a is not None
        build_attack(a.name, info.shape, info.num_classes, a.target, a.mode, a.params)
        with torch.device("meta"):
            build_model(lab.model.name, info.shape, info.num_classes, info.mean, info.std, **lab.model.kwargs)


def check(cfg: BenchConfig) -> None:
    """Everything that can be checked before the first model trains."""
    for what in ("datasets", "models", "attacks", "seeds", "fractions", "defenses"):
        if not getattr(cfg, what):
            raise OnpError(f"bench.{what} is empty: list at least one")
    if not NAME.fullmatch(cfg.name):
        raise OnpError(f"bench.name {cfg.name!r} becomes a folder name: {NAME_RULE}")
    shown = [f"{f:g}" for f in cfg.fractions]
    if any(not 0 < f < 1 for f in cfg.fractions) or len(set(shown)) != len(shown):
        raise OnpError(f"bench.fractions {cfg.fractions} must be distinct shares in (0, 1), e.g. [0.01, 0.05]")
    if any(not 0 <= s < 2**63 for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise OnpError(f"bench.seeds {cfg.seeds} must be distinct integers in 0..2**63-1")
    specs = cfg.defense_specs()
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise OnpError(f"bench.defenses repeat a label ({keys}): give each spec a distinct label")
    for spec in specs:
        if not NAME.fullmatch(spec.key):
            raise OnpError(f"defense label {spec.key!r} becomes a folder name: {NAME_RULE}")
        grid_keys = sorted(set(spec.params) & {"defense_fraction", "seed"})
        if grid_keys:
            raise OnpError(f"defense {spec.key}: {', '.join(grid_keys)} come from the grid (fractions, seeds)")
        run = {k: spec.params[k] for k in RUN_KEYS if k in spec.params}
        check_run(run, spec.key)
        params = {k: v for k, v in spec.params.items() if k not in RUN_KEYS}
        cls = defense_class(spec.name)
        # a preset's as it reads with few images and with many, the spec's params on top
        for variant in [params] if spec.preset is None else preset_of(cls, spec.preset).both(params):
            if hasattr(cls, "prepare"):  # a learned defense: its preparation's inputs (e.g. the agent config)
                cls.prepare(variant, None)
            else:
                cls(**variant)
    cells = len(cfg.labs()) * len(cfg.fractions) * len(specs)
    if cells > MAX_CELLS:
        raise OnpError(f"the grid has {cells} cells (at most {MAX_CELLS}): split it into several configs")
    _check_labs(cfg)


def load_bench_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    cfg = from_dict(BenchConfig, data, str(path))
    check(cfg)
    return cfg
