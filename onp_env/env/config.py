"""Settings of NeuronPruningEnv, in the project's one config schema (see onp_env.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EnvConfig:
    artifacts: list[str] = field(default_factory=list)
    """Artifact directories forming the zoo; empty: the embedded digits BadNets model."""
    action_mode: str = "neuron"
    """neuron: Discrete(max_units + 1), prune one unit or STOP; layer: one MultiBinary step per layer."""
    group: bool = False
    """Prune the coupled channels of a residual group together."""
    semantics: str = "zero"
    """Mask semantics: zero (unit outputs 0) or gamma (only the BatchNorm weight is masked)."""
    score: str = "oracle"
    """Backdoor score: oracle (needs the trigger), unlearn or anp (trigger-free), or none (no backdoor
    term: for deploying a learned policy, whose reward nobody reads)."""
    score_kwargs: dict[str, Any] = field(default_factory=dict)
    """Settings of the score: for unlearn those of onp_env.env.scores.unlearn (lr, batch_size, max_epochs,
    clean_threshold, ...); for anp, eps."""
    alpha: float = 1.0
    """Weight of the change in clean defense accuracy."""
    beta: float = 1.0
    """Weight of the drop in backdoor score."""
    unit_cost: float = 0.001
    """Cost per pruned unit."""
    invalid_penalty: float = 0.01
    """Penalty of an invalid action (padding, already pruned), which is otherwise a no-op."""
    budget: float = 0.3
    """Episode ends once this fraction of the model's units is pruned."""
    max_acc_drop: float = 0.2
    """Episode ends, with drop_penalty, once defense accuracy falls this far below its start."""
    drop_penalty: float = 1.0
    max_units: int | None = None
    """Padding size of node arrays (default: the largest model of the zoo)."""
    max_edges: int | None = None
    """Padding size of edge arrays (default: the largest graph of the zoo)."""
    eval_images: int = 512
    """Defense images used for rewards (a seeded subset when the defense set is larger)."""
    edge_k: int = 8
    """Strongest incoming inter-layer edges kept per node."""
    tau: float = 0.5
    """Cosine-similarity threshold of intra-layer edges."""
    k_intra: int = 4
    """Most intra-layer edges per node."""
    cache: bool = True
    """Recompute only downstream of the changed layer (False: full re-evaluation, same numbers)."""
    features: list[str] = field(default_factory=lambda: ["dynamic"])
    """Node feature sets beyond the static ones (onp_env.env.signals): dynamic (activation statistics
    of the current pruned model, every step) and the trigger-free signals mnp, anp, rnp (computed once
    per model)."""
    signal_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings of each signal's defense, overriding onp_env.env.signals.SIGNAL_DEFAULTS, e.g.
    {anp: {iterations: 500}}."""
    track_asr: bool = True
    """Report ASR on triggered defense images in info when the attack is known (never observed)."""
