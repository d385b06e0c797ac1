"""The config of `onp train-agent`, in the project's one config schema (onp_env.config): YAML with
`--set key=value` overrides, strict about unknown keys and types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agents.gnn import GNN_TYPES, LIMITS, PolicyConfig
from onp_env.config import AttackConfig, LabConfig, from_dict
from onp_env.devices import resolve_device
from onp_env.env.config import EnvConfig
from onp_env.env.signals import check_feature_sets
from onp_env.errors import OnpError


@dataclass
class ZooConfig:
    """Shadow models: every attack of `attacks` x every seed of `seeds`, built on `base` through the
    lab's artifact cache (trained once, found again on later runs)."""

    base: LabConfig = field(default_factory=LabConfig)
    """Dataset, model, training and default attack settings shared by every shadow model."""
    attacks: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "badnets"}])
    """Attack configs (each as `attack` in configs/attack/*.yaml); they replace base.attack."""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """Model seeds; held-out evaluation models must use other seeds."""


@dataclass
class PPOConfig:
    total_steps: int = 20_000
    """Environment steps of PPO (all vector envs together)."""
    n_steps: int = 256
    """Steps per env between updates."""
    batch_size: int = 64
    n_epochs: int = 4
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass
class ImitationConfig:
    """Warm start by behaviour cloning of the oracle expert (agents.expert), before PPO."""

    episodes: int = 0
    """Expert episodes per shadow model (0: no warm start). The first follows the expert exactly,
    later ones take a random valid unit with probability `noise` at each step, so the student also
    sees states off the expert's path."""
    noise: float = 0.2
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    stop_asr: float = 0.05
    """The expert stops once ASR on the triggered defense images is at most this."""
    candidates: int = 16
    """The expert's greedy step tries the top units of its activation-gap ranking only."""


@dataclass
class AgentConfig:
    name: str = "agent"
    seed: int = 0
    """Seeds PPO, the policy's initialisation and the environments (not the shadow models: zoo.seeds)."""
    zoo: ZooConfig = field(default_factory=ZooConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    """Environment settings; the zoo fills `artifacts`, training always uses the oracle score."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    n_envs: int = 1
    """Parallel environments."""
    vec_env: str = "dummy"
    """dummy (one process) or subproc (one process per env)."""
    checkpoint_every: int = 2048
    """Environment steps between resumable checkpoints."""
    threads: int = 1
    """torch threads of the training process (small graphs run fastest on one)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (a GPU when torch sees one) for the policy; env.device places the
    environments' models."""

    def attack_configs(self) -> list[AttackConfig]:
        return [from_dict(AttackConfig, a, f"zoo.attacks[{i}]") for i, a in enumerate(self.zoo.attacks)]


def check_policy(cfg: PolicyConfig) -> None:
    if cfg.gnn not in GNN_TYPES:
        raise OnpError(f"unknown gnn '{cfg.gnn}': choose one of {', '.join(GNN_TYPES)}")
    for key, (lo, hi) in LIMITS.items():
        v = getattr(cfg, key)
        if not lo <= v <= hi:
            raise OnpError(f"policy.{key} = {v} is out of range: use {lo}..{hi}")
    if cfg.gnn == "gat" and cfg.hidden % cfg.heads:
        raise OnpError(f"policy.hidden {cfg.hidden} is not divisible by policy.heads {cfg.heads}: change either")


def validate(cfg: AgentConfig) -> None:
    """Every check that needs no model: run before anything expensive starts."""
    check_policy(cfg.policy)
    check_feature_sets(cfg.env.features, cfg.env.signal_params)
    cfg.attack_configs()
    if not cfg.zoo.seeds or not cfg.zoo.attacks:
        raise OnpError("zoo.attacks and zoo.seeds must not be empty: the agent needs shadow models")
    if cfg.vec_env not in ("dummy", "subproc"):
        raise OnpError(f"vec_env '{cfg.vec_env}' unknown: choose dummy or subproc")
    resolve_device(cfg.device)
    resolve_device(cfg.env.device)
    checks = {
        "n_envs": cfg.n_envs, "threads": cfg.threads, "checkpoint_every": cfg.checkpoint_every,
        "ppo.n_steps": cfg.ppo.n_steps, "ppo.batch_size": cfg.ppo.batch_size, "ppo.n_epochs": cfg.ppo.n_epochs,
    }  # fmt: skip
    for key, v in checks.items():
        if v < 1:
            raise OnpError(f"{key} must be at least 1, got {v}")
    if cfg.ppo.total_steps < 0 or cfg.imitation.episodes < 0:
        raise OnpError("ppo.total_steps and imitation.episodes must not be negative")
    if not 0 <= cfg.imitation.noise <= 1:
        raise OnpError("imitation.noise must be in [0, 1]")
    if cfg.imitation.episodes and cfg.env.action_mode != "neuron":
        raise OnpError("imitation needs env.action_mode=neuron (the expert prunes one unit per step)")


def load_agent_config(path: str | None, overrides: list[str]) -> AgentConfig:
    from onp_env.config import load_config

    cfg = load_config(AgentConfig, path, overrides)
    validate(cfg)
    return cfg
