"""NeuronPruningEnv: prune the units of a backdoored network, one at a time or one layer per step.

Registered as `onp_env/NeuronPruning-v0` when `onp_env` is imported. With no arguments the zoo is
the embedded digits BadNets model (trained on first use and cached).

Observation (a Dict of fixed-size padded arrays that Stable-Baselines3 can store):
  nodes (U, F) node features named by `env.feature_names`: the static FEATURES
  (onp_env.graph.features), then the configured feature sets (onp_env.env.signals: signals computed
  once per model, and the `dynamic` activation statistics of the current pruned model), valid (U,), pruned (U,),
  focus (U,) the units the current step acts on (layer mode; all valid units in neuron mode),
  edge_index (2, E), edge_attr (E, 4), counts [units, edges], and in signal mode nominees (S,): the
  unit each signal column would prune now (its highest unpruned unit; 0 for a column that nominates
  none, whose action the mask refuses), and verdicts (S,): the observed anomaly index of each
  column's signal (its `{set}_anomaly` global; 0 for a signal without a verdict),
  globals [step fraction, pruned fraction, defense accuracy, accuracy drop, budget left], then the
  signal sets' own (`env.global_names`; e.g. the inversion's anomaly index), then with `inverted_asr`
  the inverted trigger's success rate on the current pruned model.
Nothing in it is derived from the trigger or the test set, whatever the reward's score source.

Reward: alpha * (acc_t - acc_{t-1}) + beta * (score_{t-1} - score_t) - unit_cost * newly pruned,
minus invalid_penalty for an invalid action and drop_penalty when the accuracy limit ends the
episode; accuracy and score are measured on the defense set.

Episode end: terminated by STOP, the budget, the accuracy limit or (layer mode) the last layer;
truncated at the step limit (see `NeuronPruningEnv.step_limit`), which only a policy that keeps
taking invalid actions reaches. Errors: a malformed action or reset option raises OnpError; stepping
before reset() or after the episode ended raises gymnasium.error.ResetNeeded, as gymnasium's own
order-enforcing wrapper does."""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from onp_env.attacks import Attack
from onp_env.devices import resolve_device
from onp_env.env.config import EnvConfig
from onp_env.env.evaluator import Evaluator, without_inplace
from onp_env.env.scores import ANPScore, UnlearnScore, check_score
from onp_env.env.signals import (
    DYNAMIC,
    DynamicStats,
    column_verdicts,
    compute_signals,
    feature_names,
    global_names,
    inverted_probe,
)
from onp_env.errors import OnpError
from onp_env.graph.build import EDGE_TYPES, NeuronGraph, build_graph
from onp_env.graph.features import FEATURES, Z_CLIP
from onp_env.graph.units import find_units
from onp_env.masking import Masks
from onp_env.training import reestimate_norms

GLOBALS = ("step_fraction", "pruned_fraction", "accuracy", "accuracy_drop", "budget_left")
STEP_MARGIN = 16
"""Invalid actions allowed beyond the budget's units, so that a model of a handful of units still has room."""


@dataclass
class PruningTarget:
    """A model to prune with its clean defense data; `attack` only if known (oracle score, ASR)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    attack: Attack | None = None

    @classmethod
    def from_artifact(cls, path: str | Path) -> PruningTarget:
        from onp_env.artifacts import load_artifact

        art = load_artifact(path)
        x, y = art.defense_set()
        return cls(art.manifest["name"], art.model, x, y, art.attack)


def _check_target(t: PruningTarget) -> None:
    if len(t.x) == 0:
        raise OnpError(f"{t.name}: the defense set is empty: pass at least a few clean images per class")
    if len(t.x) != len(t.y):
        raise OnpError(f"{t.name}: {len(t.x)} defense images but {len(t.y)} labels")
    for name, p in t.model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise OnpError(f"{t.name}: NaN/inf values in {name}: the model is broken")
    try:
        with torch.no_grad():
            out = t.model.eval()(t.x[:2])
    except RuntimeError as e:
        raise OnpError(f"{t.name}: defense images of shape {tuple(t.x.shape[1:])} do not fit the model ({e})") from e
    if int(t.y.max()) >= out.shape[1] or int(t.y.min()) < 0:
        raise OnpError(
            f"{t.name}: defense labels span 0..{int(t.y.max())} but the model has {out.shape[1]} outputs: "
            "mismatched class counts"
        )


class Task:
    """One model prepared for pruning: its graph, masks, evaluators and backdoor score."""

    def __init__(self, target: PruningTarget, cfg: EnvConfig):
        _check_target(target)
        check_score(cfg.score, target.attack is not None)
        self.name, self.attack = target.name, target.attack
        self.source_model, self.defense = target.model, (target.x, target.y)  # for policies that plan on them
        device = resolve_device(cfg.device)
        self.model = without_inplace(copy.deepcopy(target.model)).to(device).eval()
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(target.x), generator=g)[: cfg.eval_images]
        x, y = target.x[pick].to(device), target.y[pick].to(device)
        self.layout, gm = find_units(self.model, x[:2])
        self.graph: NeuronGraph = build_graph(
            self.model, self.layout, target.x.to(device), target.y.to(device), cfg.edge_k, cfg.tau, cfg.k_intra
        )
        self.masks = Masks(self.model, self.layout, cfg.semantics)
        names = [lay.name for lay in self.layout.layers]
        self.y = y
        self.dynamic = DynamicStats(self.layout) if "dynamic" in cfg.features else None
        self.clean = Evaluator(gm, x, names, cfg.cache, watch=self.dynamic is not None)
        # with bn_stats reestimated: each unit layer's downstream BatchNorm layers (its own input does not change)
        # and every BatchNorm layer's statistics as trained, which each episode starts from
        self.norms_below: dict[str, list[_BatchNorm]] | None = None
        self.norm_start: dict[str, torch.Tensor] = {}
        if cfg.bn_stats == "reestimated":
            modules = dict(gm.named_modules())
            self.norms_below = {
                name: [m for n in run if n.op == "call_module" and n.target != name
                       and isinstance(m := modules[str(n.target)], _BatchNorm)]
                for name, run in self.clean.downstream.items()
            }  # fmt: skip
            self.norm_start = {f"{n}.{b}": t.clone() for n, m in self.model.named_modules() if isinstance(m, _BatchNorm)
                               for b, t in m.named_buffers(recurse=False)}  # fmt: skip
        self.signals, self.signal_globals = compute_signals(cfg.features, cfg.signal_params, target.model, self.layout,
                                                            target.x, target.y, device=cfg.device,
                                                            scale=cfg.signal_scale, spans=cfg.signal_spans)  # fmt: skip
        # each signal column's units from highest to lowest (EnvConfig.candidates and the signal action
        # mode nominate from them); a column of one value (a signal without evidence) nominates none
        nominate = cfg.candidates or cfg.action_mode == "signal"
        self.signal_order = torch.argsort(-self.signals, dim=0, stable=True).T.numpy() if nominate else None
        self.signal_live = (self.signals.amax(0) > self.signals.amin(0)).numpy() if nominate else None
        self.probe: Evaluator | None = None  # inverted_asr: the inverted trigger through the pruned model
        self.probe_class, self.probe_asr = -1, 0.0
        if "inverted_asr" in cfg.features:
            self.probe_class, probe_x = inverted_probe(cfg.signal_params, target.model, target.x, target.y, x, y,
                                                       cfg.device)  # fmt: skip
            self.probe = Evaluator(gm, probe_x.to(device), names, cfg.cache)
        self.triggered: Evaluator | None = None
        self.confidence = False
        if target.attack is not None and (cfg.track_asr or cfg.score == "oracle"):
            targets = target.attack.targets(y)
            keep = targets != y
            self.trigger_targets = targets[keep]
            triggered = target.attack.apply(x[keep].cpu()).to(device)  # attacks keep their triggers on the CPU
            self.triggered = Evaluator(gm, triggered, names, cfg.cache)
        self.trigger_free_score = self._score(cfg, x, y)
        self._start: tuple[tuple[float, float | None, float], list[Any]] | None = None
        self.partners: dict[int, list[int]] = {}
        for group in self.layout.groups:
            for c in range(self.layout.by_name[group[0]].size):
                units = [self.layout.by_name[name].offset + c for name in group]
                for u in units:
                    self.partners[u] = units

    def _score(self, cfg: EnvConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float] | None:
        """The trigger-free score, or None for oracle (the ASR itself, or the target confidence)."""
        kw = cfg.score_kwargs
        if cfg.score == "oracle":
            if set(kw) - {"kind"} or kw.get("kind", "asr") not in ("asr", "confidence"):
                raise OnpError(f"bad score_kwargs for oracle: {kw}; it takes kind: asr or confidence")
            self.confidence = kw.get("kind") == "confidence"
            return None
        if cfg.score == "unlearn":
            return UnlearnScore(self.model, self.masks, x, y, **kw)
        if cfg.score == "none":
            return lambda: 0.0
        if cfg.score == "anp":
            unknown = sorted(set(kw) - {"eps", "seed"})
            if unknown:
                raise OnpError(f"bad score_kwargs for anp: {', '.join(unknown)}; it takes eps and seed")
            return ANPScore(self.model, self.layout, self.masks, x, y, **kw)
        return None

    def measure(self, changed: list[str] | None) -> tuple[float, float | None, float]:
        """(accuracy, ASR or None, backdoor score) on the defense data after masks changed."""
        if self.norms_below is not None and changed:  # the evaluators run downstream of `changed` again
            norms = list({id(m): m for name in changed for m in self.norms_below[name]}.values())
            reestimate_norms(self.model, norms, self.clean.x)
        acc = (self.clean.logits(changed).argmax(1) == self.y).float().mean().item()
        if self.dynamic is not None:
            self.dynamic.update(self.clean.fresh)
        if self.probe is not None:
            self.probe_asr = (self.probe.logits(changed).argmax(1) == self.probe_class).float().mean().item()
        asr, confidence = None, 0.0
        if self.triggered is not None:
            logits = self.triggered.logits(changed)
            asr = (logits.argmax(1) == self.trigger_targets).float().mean().item()
            if self.confidence:
                confidence = logits.softmax(1).gather(1, self.trigger_targets[:, None]).mean().item()
        if self.trigger_free_score is not None:
            return acc, asr, self.trigger_free_score()
        assert asr is not None
        return acc, asr, confidence if self.confidence else asr

    def measure_start(self) -> tuple[float, float | None, float]:
        """measure(None) right after masks.reset(). Every episode starts from the same unpruned model,
        so its full pass runs on the first reset only; later resets restore the evaluators' caches and
        the dynamic statistics it left (the trigger-free score, which may be stateful, runs again)."""
        evaluators = [e for e in (self.clean, self.triggered, self.probe) if e is not None]
        if self.norm_start:
            self.model.load_state_dict(self.norm_start, strict=False)
        if self._start is None:
            result = self.measure(None)
            state = [(dict(e.values), e.last, dict(e.fresh)) for e in evaluators]
            dynamic = None if self.dynamic is None else self.dynamic.values.clone()
            self._start = (result, [state, dynamic, self.probe_asr])
            return result
        (acc, asr, score), (state, dynamic, self.probe_asr) = self._start
        for e, (values, last, fresh) in zip(evaluators, state, strict=True):  # cached tensors are never mutated
            e.values, e.last, e.fresh = dict(values), last, dict(fresh)
        if self.dynamic is not None:
            self.dynamic.values = dynamic.clone()
        if self.trigger_free_score is not None:
            score = self.trigger_free_score()
        return acc, asr, score


class NeuronPruningEnv(gym.Env):
    """See the module docstring. `config` (an EnvConfig or a dict) or keyword overrides set it up;
    `targets` replaces the artifact zoo with user models; `step_limit` replaces the derived step limit
    (it is no config field so that configs, and the runs resumed from them, keep their keys)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: EnvConfig | dict[str, Any] | None = None,
        targets: list[PruningTarget] | None = None,
        step_limit: int | None = None,
        **overrides: Any,
    ):
        super().__init__()
        base = dataclasses.asdict(config) if isinstance(config, EnvConfig) else dict(config or {})
        cfg = EnvConfig.load({**base, **overrides})
        whole = isinstance(step_limit, (int, np.integer)) and not isinstance(step_limit, bool)
        if step_limit is not None and not (whole and step_limit >= 1):
            raise OnpError(f"step_limit must be a whole number >= 1, or None to derive it, got {step_limit!r}")
        self._fixed_step_limit = None if step_limit is None else int(step_limit)
        self.cfg = cfg
        self.feature_names = feature_names(FEATURES, cfg.features, cfg.signal_spans)
        self.global_names = global_names(GLOBALS, cfg.features)
        if targets is None:
            from onp_env.zoo import default_artifact

            paths = cfg.artifacts or [str(default_artifact())]
            targets = [PruningTarget.from_artifact(p) for p in paths]
        if not targets:
            raise OnpError("the zoo is empty: pass artifacts or targets")
        self.tasks = [Task(t, cfg) for t in targets]
        self.names = [t.name for t in self.tasks]
        biggest = max(t.graph.num_nodes for t in self.tasks)
        self.max_units = cfg.max_units or biggest
        if self.max_units < biggest:
            raise OnpError(f"max_units {self.max_units} is smaller than a zoo model's {biggest} units: raise it")
        self.max_edges = cfg.max_edges or max(max(t.graph.edge_index.shape[1] for t in self.tasks), 1)
        if self.max_edges < max(t.graph.edge_index.shape[1] for t in self.tasks):
            raise OnpError(f"max_edges {self.max_edges} is smaller than a zoo graph's edges: raise it")
        self.max_layer = max(lay.size for t in self.tasks for lay in t.layout.layers)
        # step_fraction's horizon in the observation (trained policies read it: keep its definition)
        self.layer_horizon = max(len(t.layout.layers) for t in self.tasks) if cfg.action_mode == "layer" else None
        U, E, F = self.max_units, self.max_edges, len(self.feature_names)
        self.num_signals = self.tasks[0].signals.shape[1]
        unit = spaces.Box(0.0, 1.0, (U,), np.float32)
        self.observation_space = spaces.Dict({
            "nodes": spaces.Box(-Z_CLIP, Z_CLIP, (U, F), np.float32),
            "valid": unit, "pruned": unit, "focus": unit,
            "edge_index": spaces.Box(0, max(U - 1, 0), (2, E), np.int64),
            "edge_attr": spaces.Box(0.0, 1.0, (E, 1 + len(EDGE_TYPES)), np.float32),
            "counts": spaces.Box(0, max(U, E), (2,), np.int64),
            "globals": spaces.Box(-1.0, 1.0, (len(self.global_names),), np.float32),
        })  # fmt: skip
        if cfg.action_mode == "signal":
            self.observation_space["nominees"] = spaces.Box(0, max(U - 1, 0), (self.num_signals,), np.int64)
            self.observation_space["verdicts"] = spaces.Box(-1.0, 1.0, (self.num_signals,), np.float32)
            self._verdict_of = column_verdicts(self.feature_names, self.global_names)
        if cfg.action_mode == "neuron":
            self.action_space: spaces.Space = spaces.Discrete(U + 1)
        elif cfg.action_mode == "signal":
            self.action_space = spaces.Discrete(self.num_signals + 1)
        else:
            self.action_space = spaces.MultiBinary(self.max_layer)
        self.task, self.task_index = self.tasks[0], 0
        self._static = [self._pad(t) for t in self.tasks]
        self._reset_state()
        self._needs_reset = True  # reset() measures the starting accuracy that step() compares with

    # --- helpers -------------------------------------------------------------------------------
    def _pad(self, t: Task) -> dict[str, np.ndarray]:
        n, e = t.graph.num_nodes, t.graph.edge_index.shape[1]
        nodes = np.zeros((self.max_units, len(self.feature_names)), np.float32)
        nodes[:n, : len(FEATURES)] = t.graph.x.numpy()
        nodes[:n, len(FEATURES) : len(FEATURES) + t.signals.shape[1]] = t.signals.numpy()
        valid = np.zeros(self.max_units, np.float32)
        valid[:n] = 1
        edge_index = np.zeros((2, self.max_edges), np.int64)
        edge_index[:, :e] = t.graph.edge_index.numpy()
        edge_attr = np.zeros((self.max_edges, 1 + len(EDGE_TYPES)), np.float32)
        edge_attr[:e] = t.graph.edge_attr.numpy()
        return {"nodes": nodes, "valid": valid, "edge_index": edge_index, "edge_attr": edge_attr,
                "counts": np.array([n, e], np.int64)}  # fmt: skip

    def _reset_state(self) -> None:
        self.pruned = np.zeros(self.max_units, bool)
        self.steps = 0
        self.layer_step = 0
        self.step_limit = self._step_limit()

    def _step_limit(self) -> int:
        """Steps after which the episode is truncated. Neuron mode: 2 * ceil(budget * units) +
        STEP_MARGIN for the current model, i.e. the most valid steps an episode can take (each prunes
        at least one unit, and the budget ends it) plus as many invalid ones and a margin; a policy
        that follows the action mask never reaches it. Layer mode: the model's layer count, where the
        episode terminates anyway. The constructor's `step_limit` replaces both."""
        if self._fixed_step_limit is not None:
            return self._fixed_step_limit
        if self.cfg.action_mode == "layer":
            return len(self.task.layout.layers)
        return 2 * int(np.ceil(self.cfg.budget * self.num_units)) + STEP_MARGIN

    @property
    def num_units(self) -> int:
        return self.task.graph.num_nodes

    @property
    def stop_action(self) -> int:
        """The STOP action of neuron and signal mode (the last)."""
        return int(self.action_space.n) - 1  # type: ignore[attr-defined]

    def _focus(self) -> np.ndarray:
        focus = np.zeros(self.max_units, np.float32)
        if self.cfg.action_mode == "layer":
            if self.layer_step < len(self.task.layout.layers):
                lay = self.task.layout.layers[self.layer_step]
                focus[lay.offset : lay.offset + lay.size] = 1
        else:
            focus[: self.num_units] = 1
        return focus

    def _obs(self) -> dict[str, np.ndarray]:
        s = self._static[self.task_index]
        nodes = s["nodes"].copy()
        nodes[:, FEATURES.index("pruned")] = self.pruned
        if self.task.dynamic is not None:
            nodes[: self.num_units, -len(DYNAMIC) :] = self.task.dynamic.values.numpy()
        n_pruned = int(self.pruned.sum())
        horizon = self.layer_horizon or max(1, int(np.ceil(self.cfg.budget * self.num_units)))
        glob = np.array([
            min(self.steps / horizon, 1.0),
            n_pruned / self.num_units,
            self.acc,
            np.clip(self.acc0 - self.acc, -1, 1),
            max(0.0, 1 - n_pruned / (self.cfg.budget * self.num_units)),
            *self.task.signal_globals.tolist(),
            *([self.task.probe_asr] if self.task.probe is not None else []),
        ], np.float32)  # fmt: skip
        obs = {"nodes": nodes, "valid": s["valid"].copy(), "pruned": self.pruned.astype(np.float32),
               "focus": self._focus(), "edge_index": s["edge_index"].copy(), "edge_attr": s["edge_attr"].copy(),
               "counts": s["counts"].copy(), "globals": glob}  # fmt: skip
        if self.cfg.action_mode == "signal":
            obs["nominees"] = self.nominees().clip(0)
            obs["verdicts"] = self._verdicts(glob)
        return obs

    def _verdicts(self, glob: np.ndarray) -> np.ndarray:
        """(signal columns,) each column's observed verdict (its signal's anomaly global; 0 without one)."""
        return np.array([glob[i] if i >= 0 else 0.0 for i in self._verdict_of], np.float32)

    def action_masks(self) -> np.ndarray:
        """Valid actions, as sb3-contrib's MaskablePPO expects them."""
        if self.cfg.action_mode == "neuron":
            mask = np.zeros(self.max_units + 1, bool)
            mask[: self.num_units] = self._valid_units()
            mask[-1] = True
            return mask
        if self.cfg.action_mode == "signal":
            return np.append(self.open_columns(), True)
        # MultiBinary: a (choose 0, choose 1) pair per bit; bits outside the layer or already pruned must be 0.
        can_prune = np.zeros(self.max_layer, bool)
        if self.layer_step < len(self.task.layout.layers):
            lay = self.task.layout.layers[self.layer_step]
            can_prune[: lay.size] = ~self.pruned[lay.offset : lay.offset + lay.size]
        return np.stack([np.ones(self.max_layer, bool), can_prune], 1).flatten()

    def nominees(self) -> np.ndarray:
        """(signal columns,) signal mode: the highest unpruned unit of each column, -1 where the column
        has none or carries no ranking (all its units score alike)."""
        assert self.task.signal_order is not None and self.task.signal_live is not None
        free = ~self.pruned[: self.num_units]
        out = np.full(len(self.task.signal_order), -1, np.int64)
        for k, order in enumerate(self.task.signal_order):
            left = order[free[order]]
            if self.task.signal_live[k] and len(left):
                out[k] = left[0]
        return out

    def open_columns(self) -> np.ndarray:
        """(signal columns,) signal mode: the columns a step may follow now, those with a nominee; with
        follow=verdict, only the column whose signal has the largest verdict (the first of equals)."""
        out = self.nominees() >= 0
        if self.cfg.follow == "verdict":
            out &= np.arange(len(out)) == self._followed
        return out

    def unit_choices(self) -> np.ndarray:
        """(units,) the units one step may prune now: neuron mode's valid units, the nominees of signal
        mode's open columns."""
        if self.cfg.action_mode != "signal":
            return self._valid_units()
        out, nominees = np.zeros(self.num_units, bool), self.nominees()[self.open_columns()]
        out[nominees] = True
        return out

    def action_for(self, unit: int) -> int:
        """The action that prunes `unit` now (one of unit_choices): the unit itself in neuron mode, the
        first open column nominating it in signal mode."""
        if self.cfg.action_mode != "signal":
            return unit
        return int(np.flatnonzero((self.nominees() == unit) & self.open_columns())[0])

    def _valid_units(self) -> np.ndarray:
        """(units,) the unpruned units (of the last unit layer with prunable `last`), or with `candidates` k
        those among the k highest of them in each signal column."""
        free = ~self.pruned[: self.num_units]
        if self.cfg.prunable == "last":
            last = self.task.layout.layers[-1]
            free[: last.offset] = free[last.offset + last.size :] = False
        if not self.cfg.candidates:
            return free
        valid = np.zeros_like(free)
        assert self.task.signal_order is not None
        for order in self.task.signal_order:
            valid[order[free[order]][: self.cfg.candidates]] = True
        return valid

    def _info(self, **extra: Any) -> dict[str, Any]:
        info = {"model": self.task.name, "acc": self.acc, "backdoor_score": self.score,
                "pruned": int(self.pruned.sum()), "pruned_fraction": float(self.pruned.sum()) / self.num_units,
                "action_mask": self.action_masks(), "invalid_action": False}  # fmt: skip
        if self.asr is not None:
            info["asr"] = self.asr
        info.update(extra)
        return info

    # --- gymnasium API -------------------------------------------------------------------------
    def _model_index(self, options: dict[str, Any] | None) -> int | None:
        """The zoo index that reset's `model` option asks for (a name or an index), None for random."""
        options = options or {}
        if not isinstance(options, dict):
            raise OnpError(f"reset options must be a dict such as {{'model': 0}}, got {type(options).__name__}")
        unknown = sorted(map(str, set(options) - {"model"}))
        if unknown:
            raise OnpError(f"unknown reset option(s) {', '.join(unknown)}: the env takes only 'model'")
        choice = options.get("model")
        if choice is None:
            return None
        if isinstance(choice, str):
            if choice not in self.names:
                raise OnpError(f"unknown model '{choice}': the zoo has {', '.join(self.names)}")
            return self.names.index(choice)
        # bool is an int, and -1 would silently pick the last model: both are refused
        whole = isinstance(choice, (int, np.integer)) and not isinstance(choice, (bool, np.bool_))
        if whole and 0 <= choice < len(self.tasks):
            return int(choice)
        raise OnpError(
            f"reset option model={choice!r} is not a model of the zoo: pass a name ({', '.join(self.names)}) "
            f"or an index in 0..{len(self.tasks) - 1}"
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        index = self._model_index(options)  # checked first: a bad option leaves the env as it was
        super().reset(seed=seed)
        if index is None:
            index = int(self.np_random.integers(len(self.tasks)))
        self.task, self.task_index = self.tasks[index], index
        self.task.masks.reset()
        self._reset_state()
        self.acc, self.asr, self.score = self.task.measure_start()
        self.acc0 = self.acc
        self._needs_reset = False
        obs = self._obs()
        if self.cfg.follow == "verdict":  # the verdicts are the model's: one column for the whole episode
            self._followed = int(np.argmax(np.where(np.array(self._verdict_of) >= 0, obs["verdicts"], -np.inf)))
        return obs, self._info()

    def _units_for(self, units: list[int]) -> list[int]:
        if not self.cfg.group:
            return units
        out: list[int] = []
        for u in units:
            out.extend(self.task.partners.get(u, [u]))
        return sorted(set(out))

    def discrete_action(self, action: Any) -> int:
        """The index of a Discrete action (stop_action: STOP); anything else is an OnpError."""
        a = action.reshape(()) if isinstance(action, np.ndarray) and action.size == 1 else action  # from predict()
        boolean = isinstance(a, bool) or getattr(a, "dtype", None) in (np.bool_, torch.bool)
        try:  # anything integral (int, numpy or torch integer scalars); a float or a string is a caller's bug
            index = -1 if boolean else operator.index(a)
        except TypeError:
            index = -1
        if 0 <= index <= self.stop_action:
            return index
        raise OnpError(f"{self.cfg.action_mode}-mode action must be an integer in 0..{self.stop_action} "
                       f"({self.stop_action} is STOP), got {action!r}")  # fmt: skip

    def _layer_action(self, action: Any) -> np.ndarray:
        """The bits of a MultiBinary action, one per unit of the widest layer; anything else is an OnpError."""
        a = np.asarray(action)
        if a.shape != (self.max_layer,) or a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
            raise OnpError(
                f"layer-mode action must be {self.max_layer} bits of 0/1 (one per unit of the widest layer), "
                f"got shape {a.shape} of dtype {a.dtype}"
            )
        return a.astype(bool)

    def _finish(self, obs: dict[str, np.ndarray], reward: float, terminated: bool, info: dict[str, Any]):
        """The step's result, truncated at the step limit unless the episode ended on its own."""
        truncated = not terminated and self.steps >= self.step_limit
        self._needs_reset = terminated or truncated
        return obs, reward, terminated, truncated, info

    def step(self, action: Any):
        if self._needs_reset:
            raise ResetNeeded(
                "the episode has not started or is over (terminated or truncated): call env.reset() before step()"
            )
        if self.cfg.action_mode in ("neuron", "signal"):
            a = self.discrete_action(action)  # checked before counting: a bad action changes nothing
            self.steps += 1
            if a == self.stop_action:
                return self._finish(self._obs(), 0.0, True, self._info(stopped=True))
            if not self.action_masks()[a]:
                return self._finish(self._obs(), -self.cfg.invalid_penalty, False, self._info(invalid_action=True))
            chosen = [int(self.nominees()[a]) if self.cfg.action_mode == "signal" else a]
        else:
            bits = self._layer_action(action)
            self.steps += 1
            lay = self.task.layout.layers[self.layer_step]
            picked = np.nonzero(bits[: lay.size])[0] + lay.offset
            chosen = [int(u) for u in picked if not self.pruned[u]]
            self.layer_step += 1
        units = [u for u in self._units_for(chosen) if not self.pruned[u]]
        self.pruned[units] = True
        self.task.masks.prune(units)
        changed = sorted({self.task.layout.locate(u)[0].name for u in units})
        before_acc, before_score = self.acc, self.score
        if changed:
            self.acc, self.asr, self.score = self.task.measure(changed)
        reward = (self.cfg.alpha * (self.acc - before_acc) + self.cfg.beta * (before_score - self.score)
                  - self.cfg.unit_cost * len(units))  # fmt: skip
        n_pruned = int(self.pruned.sum())
        over_budget = n_pruned >= self.cfg.budget * self.num_units
        collapsed = self.acc0 - self.acc > self.cfg.max_acc_drop
        done_layers = self.cfg.action_mode == "layer" and self.layer_step >= len(self.task.layout.layers)
        if collapsed:
            reward -= self.cfg.drop_penalty
        terminated = over_budget or collapsed or done_layers
        info = self._info(units=units, over_budget=over_budget, accuracy_collapsed=collapsed)
        return self._finish(self._obs(), float(reward), terminated, info)

    def pruning_state(self) -> dict[str, Any]:
        """The current masks as plain data (save with json), for export or later deployment."""
        return self.task.masks.state()
