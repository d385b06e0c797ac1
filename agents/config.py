"""The config of `onp train-agent`, in the project's one config schema (onp_env.config): YAML with
`--set key=value` overrides, strict about unknown keys and types.

Numeric ranges are declared on the fields with `bounded`, so every loader (YAML, `--set`, saved
agents) checks them through from_dict; `validate` re-checks them for a config built in Python and
adds the checks a range cannot express (names, divisibility, non-empty zoo, devices)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from agents.gnn import GNN_TYPES, PolicyConfig
from onp_env.attacks.sampler import SamplerConfig, check_sampler, sample_attacks
from onp_env.config import SEED_LIMIT, AttackConfig, LabConfig, bounded, check_labels, from_dict
from onp_env.data import load_dataset
from onp_env.devices import resolve_device
from onp_env.env.config import EnvConfig
from onp_env.errors import OnpError


@dataclass
class ZooConfig:
    """Shadow models: every attack setting (those of `attacks`, then those `sample` draws) x every seed
    of `seeds`, built on `base` through the lab's artifact cache (trained once, found again on later
    runs)."""

    base: LabConfig = field(default_factory=LabConfig)
    """Dataset, model, training and default attack settings shared by every shadow model."""
    attacks: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "badnets"}])
    """Attack configs (each as `attack` in configs/attack/*.yaml); they replace base.attack."""
    seeds: list[int] = bounded([1, 2], ge=0, lt=SEED_LIMIT)
    """Model seeds (each becomes the LabConfig seed of its shadow models); held-out evaluation
    models must use other seeds."""
    sample: SamplerConfig | None = None
    """Attack settings drawn by the seeded sampler (onp_env.attacks.sampler), added to `attacks`:
    several settings of each attack, each with its own label, target and trigger."""
    exclude: list[str] = field(default_factory=list)
    """Attack names whose settings are left out (of `attacks` and of the draws, which stay the same
    draws): the leave-one-attack-out protocol holds one attack out of one zoo."""
    suite: str | None = None
    """A task suite (onp_env.suite, e.g. digits-v0): the shadow models are its `train` split, in place
    of base, attacks, sample and seeds; `env` must then hold the suite's frozen settings."""


@dataclass
class PPOConfig:
    total_steps: int = bounded(20_000, ge=0)
    """Environment steps of PPO (all vector envs together); 0: imitation only."""
    n_steps: int = bounded(256, ge=1)
    """Steps per env between updates."""
    batch_size: int = bounded(64, ge=1)
    """Minibatch size of the PPO updates."""
    n_epochs: int = bounded(4, ge=1)
    """Passes over each rollout."""
    lr: float = bounded(3e-4, gt=0)
    """Adam learning rate."""
    gamma: float = bounded(0.99, ge=0, le=1)
    """Discount factor."""
    gae_lambda: float = bounded(0.95, ge=0, le=1)
    """GAE bias/variance trade-off."""
    clip_range: float = bounded(0.2, gt=0)
    """PPO clipping of the probability ratio to [1 - clip_range, 1 + clip_range]."""
    ent_coef: float = bounded(0.01, ge=0)
    """Weight of the entropy bonus."""
    vf_coef: float = bounded(0.5, ge=0)
    """Weight of the value loss."""
    max_grad_norm: float = bounded(0.5, gt=0)
    """Gradient-norm clipping (0 would zero every gradient)."""


IMITATION_TARGETS = ("next", "remaining")


@dataclass
class ImitationConfig:
    """Warm start by behaviour cloning of the oracle expert (agents.expert), before PPO."""

    episodes: int = bounded(0, ge=0)
    """Expert episodes per shadow model (0: no warm start). The first follows the expert exactly,
    later ones take a random valid unit with probability `noise` at each step, so the student also
    sees states off the expert's path."""
    noise: float = bounded(0.2, ge=0, le=1)
    """Probability of a random valid unit instead of the expert's at each step (after the first episode)."""
    epochs: int = bounded(30, ge=1)
    """Behaviour-cloning epochs over the expert's samples."""
    lr: float = bounded(1e-3, gt=0)
    """Adam learning rate of behaviour cloning."""
    batch_size: int = bounded(64, ge=1)
    """Minibatch size of behaviour cloning."""
    stop_asr: float = bounded(0.05, ge=0, le=1)
    """The expert stops once ASR on the triggered defense images is at most this."""
    candidates: int = bounded(16, ge=1)
    """The expert's greedy step tries the top units of its activation-gap ranking only."""
    dagger_rounds: int = bounded(0, ge=0)
    """Rounds of DAgger after the first cloning (agents.expert.imitate): each runs `episodes` episodes
    per shadow model in which the student acts until a hand-over state drawn from its own path (its
    chosen STOP half of the time) and the expert from there, adds the expert's labels and clones
    again on all samples. Teaches the states the student reaches, which the expert's never visit."""
    target: str = "next"
    """What the student is taught at each step: next (the expert's action; cross-entropy) or remaining
    (any unit the expert prunes from this step to the end of the episode: minus the log of their total
    probability; the order in which the greedy expert cuts a backdoor spread over many units carries
    little information, and this target does not penalise another order). STOP steps teach STOP."""


@dataclass
class AgentConfig:
    name: str = "agent"
    seed: int = bounded(0, ge=0, lt=2**32)
    """Seeds PPO, the policy's initialisation and the environments (not the shadow models: zoo.seeds).
    Below 2**32: stable-baselines3 passes it to numpy.random.seed."""
    zoo: ZooConfig = field(default_factory=ZooConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    """Environment settings; the zoo fills `artifacts`, training always uses the oracle score."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    n_envs: int = bounded(1, ge=1)
    """Parallel environments."""
    vec_env: str = "dummy"
    """dummy (one process) or subproc (one process per env)."""
    signal_reference: bool = True
    """Compute each verdict signal's class reference (onp_env.signals.base.Signal.suspicion) on the
    shadow zoo before training, unless env.signal_params sets one; the deployed agent carries it."""
    checkpoint_every: int = bounded(2048, ge=1)
    """Environment steps between resumable checkpoints."""
    threads: int = bounded(1, ge=1)
    """torch threads of the training process (small graphs run fastest on one)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (a GPU when torch sees one) for the policy; env.device places the
    environments' models."""

    def attack_configs(self) -> list[AttackConfig]:
        if self.zoo.suite is not None:
            from onp_env.suite.spec import get_suite

            return [lab.attack for _, lab in get_suite(self.zoo.suite).labs("train") if lab.attack is not None]
        out = [from_dict(AttackConfig, a, f"zoo.attacks[{i}]") for i, a in enumerate(self.zoo.attacks)]
        if self.zoo.sample is not None:
            data = self.zoo.base.data
            out += sample_attacks(self.zoo.sample, load_dataset(data.name, data.root).info.num_classes)
        return [a for a in out if a.name not in self.zoo.exclude]


def check_policy(cfg: PolicyConfig) -> None:
    """What the field ranges of PolicyConfig (checked by from_dict) cannot express."""
    if cfg.gnn not in GNN_TYPES:
        raise OnpError(f"unknown gnn '{cfg.gnn}': choose one of {', '.join(GNN_TYPES)}")
    if cfg.gnn == "gat" and cfg.hidden % cfg.heads:
        raise OnpError(f"policy.hidden {cfg.hidden} is not divisible by policy.heads {cfg.heads}: change either")


def _check_suite(cfg: AgentConfig, where: str) -> None:
    """A suite's agent trains in the suite's env: its frozen settings, on its train split only."""
    from onp_env.env.signals import takes_reference
    from onp_env.suite.spec import get_suite

    spec = get_suite(cfg.zoo.suite or "")
    if cfg.zoo.sample is not None or cfg.zoo.exclude:
        raise OnpError(f"{where}: zoo.suite takes the suite's train split as it is: drop zoo.sample and zoo.exclude")
    env = dataclasses.asdict(cfg.env)
    if cfg.signal_reference and any(takes_reference(f) for f in cfg.env.features):
        raise OnpError(f"{where}: suite {spec.name} observes its signals without a class reference: set "
                       "signal_reference: false")  # fmt: skip
    frozen = dataclasses.asdict(EnvConfig.load(spec.env))  # every setting, the defaults included
    differ = [k for k, v in frozen.items() if k not in ("device", "artifacts") and env[k] != v]
    if differ:
        wanted = ", ".join(f"{k}: {frozen[k]}" for k in differ)
        raise OnpError(f"{where}: env differs from suite {spec.name}'s frozen settings; set {wanted}")


def validate(cfg: AgentConfig, where: str = "agent config") -> None:
    """Every check that needs no model: run before anything expensive starts."""
    from_dict(AgentConfig, dataclasses.asdict(cfg), where)  # types and ranges of a config built in Python
    check_policy(cfg.policy)
    cfg.env.validate(f"{where}.env")  # names (score, semantics, action mode, feature sets) and device
    if cfg.zoo.sample is not None:
        check_sampler(cfg.zoo.sample, f"{where}.zoo.sample")
    if cfg.zoo.suite is not None:
        _check_suite(cfg, where)
    keys = [a.key for a in cfg.attack_configs()]
    if not cfg.zoo.seeds or not keys:
        raise OnpError("zoo.seeds and zoo.attacks (or zoo.sample) must not be empty: the agent needs shadow models")
    if len(set(keys)) != len(keys):
        raise OnpError(f"zoo.attacks repeat a name ({keys}): give each setting of one attack its own label")
    check_labels(keys, f"{where}.zoo.attacks")
    if cfg.vec_env not in ("dummy", "subproc"):
        raise OnpError(f"vec_env '{cfg.vec_env}' unknown: choose dummy or subproc")
    resolve_device(cfg.device)
    if cfg.ppo.total_steps and cfg.ppo.n_steps * cfg.n_envs < 2:
        raise OnpError("ppo.n_steps x n_envs must be at least 2 (PPO's rollout buffer): raise ppo.n_steps")
    if cfg.ppo.total_steps and cfg.ppo.batch_size < 2:
        raise OnpError("ppo.batch_size must be at least 2 (PPO normalises advantages per minibatch): raise it")
    if cfg.imitation.target not in IMITATION_TARGETS:
        raise OnpError(
            f"unknown imitation.target '{cfg.imitation.target}': choose one of {', '.join(IMITATION_TARGETS)}"
        )
    if cfg.imitation.episodes and cfg.env.action_mode == "layer":
        raise OnpError("imitation needs env.action_mode neuron or signal (the expert prunes one unit per step)")


def load_agent_config(path: str | None, overrides: list[str]) -> AgentConfig:
    from onp_env.config import load_config

    cfg = load_config(AgentConfig, path, overrides)
    validate(cfg, str(path or "agent config"))
    return cfg
