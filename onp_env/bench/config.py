"""The benchmark grid, in the project's one config schema: datasets x models x attacks x seeds give
the backdoored models (trained through the lab's cache), and each is defended by every defense at
every defense-data fraction. Defenses are registered names (onp_env.registry) with parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onp_env.config import (
    AttackConfig,
    DataConfig,
    LabConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    bounded,
    from_dict,
    read_yaml,
)
from onp_env.errors import OnpError
from onp_env.registry import defense_class

MAX_CELLS = 100_000


@dataclass
class DefenseSpec:
    name: str
    """A registered defense (onp defend --method NAME)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Its parameters; a learned one may take what its `prepare` understands (onp: agent_config)."""
    label: str | None = None
    """Its name in the tables (default: name); two specs of one defense need distinct labels."""

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
    """DefenseSpec entries: {name, params, label}."""
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
                        name = f"{self.name}-{data.name}-{model.name}-{attack.name}-s{seed}"
                        out.append(LabConfig(name, seed, data, model, attack, self.train))
        return out


def model_key(lab: LabConfig) -> str:
    assert lab.attack is not None
    return f"{lab.data.name}/{lab.model.name}/{lab.attack.name}/s{lab.seed}"


def check(cfg: BenchConfig) -> None:
    """Everything that can be checked before the first model trains."""
    for what in ("datasets", "models", "attacks", "seeds", "fractions", "defenses"):
        if not getattr(cfg, what):
            raise OnpError(f"bench.{what} is empty: list at least one")
    if any(not 0 < f < 1 for f in cfg.fractions) or len(set(cfg.fractions)) != len(cfg.fractions):
        raise OnpError(f"bench.fractions {cfg.fractions} must be distinct shares in (0, 1), e.g. [0.01, 0.05]")
    if any(s < 0 for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise OnpError(f"bench.seeds {cfg.seeds} must be distinct non-negative integers")
    specs = cfg.defense_specs()
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise OnpError(f"bench.defenses repeat a label ({keys}): give each spec a distinct label")
    for spec in specs:
        cls = defense_class(spec.name)
        if hasattr(cls, "prepare"):  # a learned defense: its preparation's inputs (e.g. the agent config)
            cls.prepare(spec.params, None)
        else:
            cls(**spec.params)
    labs = cfg.labs()
    cells = len(labs) * len(cfg.fractions) * len(specs)
    if cells > MAX_CELLS:
        raise OnpError(f"the grid has {cells} cells (at most {MAX_CELLS}): split it into several configs")


def load_bench_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    cfg = from_dict(BenchConfig, data, str(path))
    check(cfg)
    return cfg
