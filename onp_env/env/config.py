"""Settings of NeuronPruningEnv, in the project's one config schema (see onp_env.config).

Ranges are declared on the fields with `bounded`, so every loader (YAML, `--set`, saved agents) checks
them through from_dict; `EnvConfig.validate` adds the checks a range cannot express (allowed names,
finite numbers) and is what the environment runs, since Python users build EnvConfig(...) directly."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from onp_env.config import bounded, from_dict
from onp_env.devices import resolve_device
from onp_env.env.scores import SCORES
from onp_env.env.signals import STEPWISE, VERDICT_SETS, check_feature_sets, check_signal_view
from onp_env.errors import OnpError
from onp_env.masking import SEMANTICS

ACTION_MODES = ("neuron", "layer", "signal")
PRUNABLE = ("all", "last")
BN_STATS = ("kept", "reestimated")
FOLLOWS = ("any", "verdict")


@dataclass
class EnvConfig:
    artifacts: list[str] = field(default_factory=list)
    """Artifact directories forming the zoo; empty: the embedded digits BadNets model."""
    action_mode: str = "neuron"
    """neuron: Discrete(max_units + 1), prune one unit or STOP; layer: one MultiBinary step per layer;
    signal: Discrete(signal columns + 1), prune the highest unpruned unit of one signal column (the
    policy chooses which signal to follow, not which unit) or STOP. Needs a signal feature set."""
    follow: str = "any"
    """Signal mode: any, the policy chooses which column to follow; verdict, only the column of the signal
    whose suspected class has the largest anomaly index (its observed verdict; ties: the first) is open,
    so the policy decides only when to STOP (baselines.verdict's rule with a learnt stop)."""
    candidates: int = bounded(0, ge=0, le=64)
    """Neuron mode: 0, every unpruned unit is a valid action; k, only the k highest unpruned units of
    each signal column (the signals nominate, the policy chooses among them or STOPs; any other unit
    is an invalid action). Needs a signal feature set (onp_env.env.signals)."""
    prunable: str = "all"
    """Neuron mode: which units an action may prune. all: every layer's; last: only the last unit layer's
    (the hidden Linear of a small CNN, the last BatchNorm of a ResNet: where NC and verdict prune). Only the
    action mask narrows, not the observation, so an agent trained with `all` can be deployed with `last`."""
    group: bool = False
    """Prune the coupled channels of a residual group together."""
    semantics: str = "zero"
    """Mask semantics: zero (unit outputs 0) or gamma (only the BatchNorm weight is masked)."""
    bn_stats: str = "kept"
    """How each pruned model is read. kept: its BatchNorm layers normalise with the running statistics it was
    trained with; reestimated: after each cut, those downstream of a cut layer with statistics re-estimated on the
    env's defense images (onp_env.training.reestimate_norms; no weight changes), as any training on clean images
    would re-estimate them. On a PreAct ResNet a cut spread over its blocks can hide a backdoor behind the statistics
    it made stale, which re-estimating brings back (benchmarks/results/bn_revival.md); each step then costs a full
    pass over those images more."""
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
    unit_cost: float = bounded(0.001, ge=0)
    """Cost per pruned unit."""
    invalid_penalty: float = bounded(0.01, ge=0)
    """Penalty of an invalid action (padding, already pruned), which is otherwise a no-op."""
    budget: float = bounded(0.3, gt=0, le=1)
    """Episode ends once this fraction of the model's units is pruned."""
    max_acc_drop: float = bounded(0.2, gt=0, le=1)
    """Episode ends, with drop_penalty, once defense accuracy falls this far below its start."""
    drop_penalty: float = bounded(1.0, ge=0)
    max_units: int | None = bounded(None, ge=1)
    """Padding size of node arrays (default: the largest model of the zoo)."""
    max_edges: int | None = bounded(None, ge=1)
    """Padding size of edge arrays (default: the largest graph of the zoo)."""
    eval_images: int = bounded(512, ge=1)
    """Defense images used for rewards (a seeded subset when the defense set is larger)."""
    edge_k: int = bounded(8, ge=1)
    """Strongest incoming inter-layer edges kept per node."""
    tau: float = bounded(0.5, ge=-1, le=1)
    """Cosine-similarity threshold of intra-layer edges."""
    k_intra: int = bounded(4, ge=1)
    """Most intra-layer edges per node."""
    cache: bool = True
    """Recompute only downstream of the changed layer (False: full re-evaluation, same numbers)."""
    features: list[str] = field(default_factory=lambda: ["dynamic"])
    """Node feature sets beyond the static ones (onp_env.env.signals): dynamic (activation statistics
    of the current pruned model, every step), the trigger-free signals mnp, anp, rnp, inversion and
    latent_gap (computed once per model), and inverted_asr (with inversion: a global, the inverted
    trigger's success rate on the current pruned model, every step)."""
    signal_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings of each signal's defense, overriding onp_env.env.signals.SIGNAL_DEFAULTS, e.g.
    {anp: {iterations: 500}}."""
    signal_scale: str = "z"
    """How signal scores become observation columns (onp_env.env.signals.SIGNAL_SCALES): z (z-scored
    per layer) or log-z (a signed log first, which keeps apart the units of a heavy-tailed score such as
    the inversion's activation gap; z flattens all but its largest)."""
    signal_spans: list[str] = field(default_factory=lambda: ["layer"])
    """Over which units each signal is z-scored, one column per span (onp_env.env.signals.SIGNAL_SPANS):
    layer (a unit against its layer) and model (against every unit: where in the model the evidence
    is strongest)."""
    track_asr: bool = True
    """Report ASR on triggered defense images in info when the attack is known (never observed)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (a GPU when torch sees one): where the models are evaluated and the
    graph and signals computed; observations and infos are on the CPU (numpy) wherever that is."""

    @classmethod
    def load(cls, data: dict[str, Any], where: str = "env config") -> EnvConfig:
        """Build from a mapping and check every field; OnpError names the field and the fix."""
        data = dict(data)
        if isinstance(data.get("artifacts"), list):  # Path objects are fine in Python; the schema holds str
            data["artifacts"] = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in data["artifacts"]]
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):  # NaN would pass silently into rewards
                raise OnpError(f"{where}.{key} must be a finite number, got {value!r}")
        cfg = from_dict(cls, data, where)
        for key, allowed in (("action_mode", ACTION_MODES), ("follow", FOLLOWS), ("semantics", SEMANTICS),
                             ("score", SCORES), ("prunable", PRUNABLE), ("bn_stats", BN_STATS)):  # fmt: skip
            value = getattr(cfg, key)
            if value not in allowed:
                raise OnpError(f"unknown {key} '{value}' in {where}: choose one of {', '.join(allowed)}")
        check_feature_sets(cfg.features, cfg.signal_params)
        check_signal_view(cfg.signal_scale, cfg.signal_spans)
        no_signal = all(f in STEPWISE for f in cfg.features)  # nothing to nominate units from
        if cfg.action_mode == "signal" and no_signal:
            raise OnpError(f"{where}.action_mode signal needs a signal feature set to follow (e.g. features: "
                           "[mnp, inversion]): add one or use action_mode neuron")  # fmt: skip
        if cfg.follow == "verdict" and (cfg.action_mode != "signal" or not set(cfg.features) & VERDICT_SETS):
            raise OnpError(f"{where}.follow verdict needs action_mode signal and a signal with a verdict (features: "
                           f"{' or '.join(sorted(VERDICT_SETS))}): add them or set follow: any")  # fmt: skip
        if cfg.candidates and (cfg.action_mode != "neuron" or no_signal):
            raise OnpError(f"{where}.candidates needs action_mode neuron and a signal feature set (e.g. features: "
                           "[inversion]): add one or set candidates: 0")  # fmt: skip
        if cfg.prunable != "all" and cfg.action_mode != "neuron":
            raise OnpError(f"{where}.prunable {cfg.prunable} needs action_mode neuron (the other modes choose "
                           "among layers or signals): set prunable: all")  # fmt: skip
        if cfg.prunable != "all" and cfg.group:  # a residual group's coupled channels lie in earlier layers too
            raise OnpError(f"{where}.prunable {cfg.prunable} cannot hold with group: true, whose coupled channels span "
                           "earlier layers: set group: false or prunable: all")  # fmt: skip
        resolve_device(cfg.device)  # a GPU that is not there fails here, before any model is prepared
        return cfg

    def validate(self, where: str = "env config") -> EnvConfig:
        """The same checks as for a loaded config, for one built in Python; returns a normalised copy
        (ints of float fields become floats)."""
        return type(self).load(dataclasses.asdict(self), where)
