"""Node feature sets beyond the static graph features (onp_env.graph.features.FEATURES).

- `dynamic`: the clean activation mean and std of every unit *in the current pruned model*, read
  from the evaluator's cached forward pass on the defense batch after every step, and z-scored with
  the layer's statistics of the unpruned model, so that the policy sees how each unit's response
  moves as the network is cut (a pruned unit reads as the layer's silent extreme).
- signals, computed once per model when the environment prepares it: the unit scores of a registered
  defense (onp_env.registry), run on the model and its clean defense set only, with short settings
  (SIGNAL_DEFAULTS, overridable through EnvConfig.signal_params), z-scored per layer:
  `mnp` (MNP's masks learnt after clean suppression: magnitude against clean saliency),
  `anp` (a short ANP run: masks under adversarial neuron perturbation),
  `rnp` (RNP's recovery masks on the unlearned twin).
- signals of onp_env.signals, computed the same way through their own interface:
  `inversion` (Neural Cleanse's trigger inversion for every class at once; per unit, the activation
  gap of the most anomalous class's inverted trigger: the oracle's quantity, trigger synthesized);
  `latent_gap` (per class, the smallest shift of the classifier's input features that sends every
  clean image to the class; per unit of the last hidden layer, the most anomalous class's signed
  shift: a trigger-activated change estimated without any input-space trigger model, so it also
  covers warping triggers).
  They cost seconds per model (see benchmarks), and none of them sees the trigger or the test split.
- `inverted_asr` (with `inversion`): one global read after every step, the share of the defense
  images of other classes that the inversion's trigger for its suspected class still sends there in
  the current pruned model: Neural Cleanse's own stopping quantity, a trigger-free stand-in for the
  ASR (benchmarks/results/inverted_asr.md measures how well it tracks the real one).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from onp_env.config import from_dict
from onp_env.errors import OnpError
from onp_env.graph.features import Z_CLIP, zscore
from onp_env.graph.units import UnitLayout
from onp_env.registry import defense_class
from onp_env.signals import SIGNALS
from onp_env.signals.base import Memo, VerdictParams, class_reference
from onp_env.signals.shipped import READ_ONLY

DYNAMIC = ("act_mean_now", "act_std_now")
SIGNAL_DEFAULTS: dict[str, dict[str, Any]] = {
    # MNP's own 20 mask epochs: 3x the time, no better ranking (benchmarks/results/signal_cost.md)
    "mnp": {"mask_epochs": 5},
    # no augmentation on any images: colour models' signal columns stay those that trained agents saw
    "anp": {"iterations": 200, "augment": "none"},
    "rnp": {"augment": "none"},
}
FEATURE_SETS = ("dynamic", "inverted_asr", *SIGNAL_DEFAULTS, *SIGNALS)
STEPWISE = ("dynamic", "inverted_asr")
"""Feature sets read from the current pruned model after every step (the others: once per model)."""
VERDICT_SETS = frozenset(name for name, signal in SIGNALS.items() if "anomaly" in signal.observed)
"""Signal sets that name a suspected class with an anomaly index (their verdict: `{set}_anomaly`)."""
PROBE = ("inverted_asr_now",)
"""The global of `inverted_asr`, after the signals' own."""
SIGNAL_SCALES = ("z", "log-z")
"""How a signal's unit scores become an observation column (EnvConfig.signal_scale): `z`, z-scored per
layer; `log-z`, a signed log(1 + |score|) first. An activation gap is measured in units of the unit's
clean standard deviation, so a near-silent backdoor unit scores 1e3-1e5 where the rest of its layer
scores about 1: z-scored as it is, the largest unit sits at the clip and the others of its layer
within a few hundredths of one value (benchmarks/results/feature_separability.md, spread). The
logarithm keeps their order and spreads them again."""
SIGNAL_SPANS = ("layer", "model")
"""Over which units a signal is z-scored (EnvConfig.signal_spans), one observation column per span:
`layer` (a unit against the rest of its layer), `model` (against every unit of the model: a layer's
top unit whose score is small beside another layer's, as a conv channel's inverted-trigger gap of
0.3 std beside a classifier unit's 1e4, reads low there and high in its layer's column)."""


def check_feature_sets(names: list[str], params: dict[str, Any]) -> None:
    unknown = [n for n in names if n not in FEATURE_SETS]
    if unknown:
        raise OnpError(f"unknown feature set(s) {', '.join(unknown)}: choose from {', '.join(FEATURE_SETS)}")
    if len(set(names)) != len(names):
        raise OnpError(f"feature sets listed twice in {names}: list each once")
    stray = sorted(set(params) - set(names))
    if stray:
        raise OnpError(f"signal_params for {', '.join(stray)}, which is not in features: add it or drop its params")
    if "inverted_asr" in names and "inversion" not in names:
        raise OnpError("feature set inverted_asr reads the inversion's trigger: add inversion to features")
    if "inverted_asr" in params:
        raise OnpError("inverted_asr takes no signal_params: it uses those of inversion")
    for name in (n for n in names if n in SIGNALS):
        SIGNALS[name](**params.get(name, {}))  # types and ranges, before any model is prepared


def feature_names(base: tuple[str, ...], sets: list[str], spans: Sequence[str] = ("layer",)) -> tuple[str, ...]:
    """Column names of the observation's node features: static, then signals (each span's columns in
    turn: `signal_{set}` per layer, `signal_{set}_model` over the model), then dynamic."""
    suffix = {"layer": "", "model": "_model"}
    signals = tuple(f"signal_{s}{suffix[span]}" for span in spans for s in sets if s not in STEPWISE)
    return base + signals + (DYNAMIC if "dynamic" in sets else ())


def check_signal_view(scale: str, spans: Sequence[str]) -> None:
    if scale not in SIGNAL_SCALES:
        raise OnpError(f"unknown signal_scale '{scale}': choose one of {', '.join(SIGNAL_SCALES)}")
    if not spans or len(set(spans)) != len(spans) or not set(spans) <= set(SIGNAL_SPANS):
        raise OnpError(f"signal_spans {list(spans)} must list each of {', '.join(SIGNAL_SPANS)} at most once, "
                       "and at least one")  # fmt: skip


def global_names(base: tuple[str, ...], sets: list[str]) -> tuple[str, ...]:
    """Names of the observation's globals: the environment's own, then those the signal sets'
    signals declare (onp_env.signals.base.Signal.observed), then inverted_asr's."""
    signals = tuple(f"{s}_{suffix}" for s in sets if s in SIGNALS for suffix in SIGNALS[s].observed)
    return base + signals + (PROBE if "inverted_asr" in sets else ())


def column_verdicts(features: Sequence[str], globals_: Sequence[str]) -> list[int]:
    """For each signal column of `features` (feature_names' `signal_*`), the index in `globals_` of its
    signal's anomaly index (`{set}_anomaly`), or -1 for a signal without a verdict."""
    out = []
    for name in (c for c in features if c.startswith("signal_")):
        full = name[len("signal_") :]
        base = full if full in FEATURE_SETS else full.removesuffix("_model")  # feature_names' two spans
        out.append(globals_.index(f"{base}_anomaly") if f"{base}_anomaly" in globals_ else -1)
    return out


def signal_settings(sets: Sequence[str], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each once-per-model signal set's settings as this onp-env computes it under `params` (its defaults filled
    in; the class reference and what only reads it left out) and, for onp_env.signals' sets, its version: what
    an agent records of the signals it was trained on (agents.io), so that an onp-env whose defaults have moved
    since refuses it instead of feeding it other observations."""
    out: dict[str, dict[str, Any]] = {}
    for name in (s for s in sets if s not in STEPWISE):
        given = params.get(name, {})
        if name in SIGNALS:
            found: Any = from_dict(SIGNALS[name].Params, given, f"signal {name} parameters")
            settings = {k: v for k, v in dataclasses.asdict(found).items() if k not in READ_ONLY}
            out[name] = {"version": SIGNALS[name].version, **settings}
        else:
            cls = defense_class(name)
            out[name] = dataclasses.asdict(from_dict(cls.Params, {**SIGNAL_DEFAULTS[name], **given}, f"{name} params"))
    return out


def takes_reference(name: str) -> bool:
    return name in SIGNALS and issubclass(SIGNALS[name].Params, VerdictParams)


def reference_norms(artifact: str | Path, sets: Sequence[str], params: dict[str, Any], device: str = "cpu"
                    ) -> tuple[int | None, dict[str, list[float]]]:  # fmt: skip
    """One reference model's evidence for class_reference: its all-to-one target (None for a clean or
    all-to-all model) and, for each verdict signal in `sets` (with its `params`), the per-class trigger
    sizes it computes on the model's defense set."""
    from onp_env.artifacts import load_artifact
    from onp_env.graph.units import find_units

    art = load_artifact(artifact)
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    attack = art.attack
    target = attack.target if attack is not None and attack.mode == "all-to-one" else None
    sizes = {s: SIGNALS[s](device=device, **params.get(s, {})).compute(art.model, layout, x, y).details["norms"]
             for s in sets}  # fmt: skip
    return target, sizes


def with_reference(sets: list[str], params: dict[str, Any], artifacts: Sequence[str | Path], device: str = "cpu",
                   progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """`params` with the `reference` (Signal.suspicion) of every signal set that takes one computed on
    `artifacts`: the defender's own shadow models, whose attacks it knows (a model's target class is
    left out of that class's reference). A reference already set, or named (`reference_from`), is kept."""
    out = {name: dict(p) for name, p in params.items()}
    todo = [s for s in sets if takes_reference(s) and not out.get(s, {}).get("reference")
            and not out.get(s, {}).get("reference_from")]  # fmt: skip
    norms: dict[str, list[torch.Tensor]] = {s: [] for s in todo}
    targets: list[int | None] = []
    for path in tqdm(artifacts if todo else [], desc="signal reference", disable=not progress):
        target, sizes = reference_norms(path, todo, out, device)
        targets.append(target)
        for s in todo:
            norms[s].append(torch.tensor(sizes[s]))
    for s in todo:
        out.setdefault(s, {})["reference"] = [float(v) for v in class_reference(norms[s], targets)]
    return out


def layer_zscore(v: torch.Tensor, layout: UnitLayout, scale: str = "z", span: str = "layer") -> torch.Tensor:
    """(units,) `v` z-scored within each layer (span `layer`) or over all units (`model`), after a
    signed log(1 + |v|) where `scale` is log-z."""
    check_signal_view(scale, [span])
    v = v.float()
    if scale == "log-z":
        v = v.sign() * v.abs().log1p()
    if span == "model":
        return zscore(v)
    return torch.cat([zscore(v[lay.offset : lay.offset + lay.size]) for lay in layout.layers])


def signal_columns(sets: list[str], params: dict[str, Any], model: nn.Module, layout: UnitLayout,
                   x: torch.Tensor, y: torch.Tensor, seed: int = 0, device: str = "cpu",
                   scale: str = "z", spans: Sequence[str] = ("layer",)) -> torch.Tensor:  # fmt: skip
    """(units, columns) z-scored unit scores, on the CPU (compute_signals' columns)."""
    return compute_signals(sets, params, model, layout, x, y, seed, device, scale, spans)[0]


def compute_signals(sets: list[str], params: dict[str, Any], model: nn.Module, layout: UnitLayout,
                    x: torch.Tensor, y: torch.Tensor, seed: int = 0, device: str = "cpu", scale: str = "z",
                    spans: Sequence[str] = ("layer",)) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The signal sets' node columns (units, sets x spans, feature_names' order), z-scored per layer
    or over the model (layer_zscore with `scale`), and their globals (global_names order), each
    signal run on `device`; both on the CPU."""
    check_signal_view(scale, spans)
    raw, glob = [], []
    for name in (s for s in sets if s not in STEPWISE):
        units, read = _signal(name, params.get(name, {}), model, layout, x, y, seed, device)
        raw.append(units)
        glob += read
    cols = [layer_zscore(v, layout, scale, span) for span in spans for v in raw]
    columns = torch.stack(cols, 1) if cols else torch.zeros(layout.num_units, 0)
    return columns, torch.tensor(glob, dtype=torch.float32)


_RESULTS = Memo(512)
"""Signal results kept per process (a vector per unit each): `onp train-agent` builds the environment
twice on one zoo (the expert's and PPO's), and a benchmark worker trains several agents on it."""


def _signal(name: str, params: dict[str, Any], model: nn.Module, layout: UnitLayout, x: torch.Tensor,
            y: torch.Tensor, seed: int, device: str) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """One signal set's raw unit scores (on the CPU) and its observed globals, reused when this process
    computed them for the same weights, images and settings."""

    def compute() -> tuple[torch.Tensor, list[float]]:
        if name in SIGNALS:
            signal = SIGNALS[name](seed=seed, device=device, **params)
            result = signal.compute(on_device(model, signal.device), layout, x, y)
            read = [max(-1.0, min(1.0, result.globals[k] / scale)) for k, scale in signal.observed.values()]
            return result.units.nan_to_num(0.0, 0.0, 0.0).cpu(), read
        try:
            defense = defense_class(name)(seed=seed, device=device, **{**SIGNAL_DEFAULTS[name], **params})
        except TypeError as e:
            raise OnpError(f"bad signal_params for {name}: {e}") from e
        plan_layout, scores, _ = defense.plan(model, x, y)
        if [lay.name for lay in plan_layout.layers] != [lay.name for lay in layout.layers]:
            raise OnpError(f"signal {name} traced other unit layers than the environment: unsupported model")
        return scores.nan_to_num(0.0, 0.0, 0.0).cpu(), []

    return _RESULTS.get(compute, model, x, y, name=name, params=params, seed=seed, device=device)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model`, or a copy of it on `device` where its weights are elsewhere (a signal runs there; the
    caller's model stays where it is)."""
    first = next(model.parameters(), None)
    return model if first is None or first.device == device else copy.deepcopy(model).to(device)


def inverted_probe(params: dict[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_eval: torch.Tensor,
                   y_eval: torch.Tensor, device: str = "cpu") -> tuple[int, torch.Tensor]:  # fmt: skip
    """(suspected class k, the eval images of other classes with k's inverted trigger applied): what
    `inverted_asr` runs through the pruned model after every step. The inversion is the one the
    `inversion` column was computed from (the same model, images and settings: reused, not redone)."""
    from onp_env.signals import TriggerInversion

    signal = TriggerInversion(seed=0, device=device, **params.get("inversion", {}))
    inv = signal.invert(on_device(model, signal.device), x.to(signal.device), y.to(signal.device))
    k = int(torch.argmax(signal.suspicion(inv.norms)))
    keep = y_eval != k
    keep = keep if keep.any() else torch.ones_like(keep)
    with torch.no_grad():
        return k, inv.apply(k, x_eval[keep])


class DynamicStats:
    """Per-unit clean activation mean/std of the current (masked) model, from unit-layer outputs of
    the evaluator's last pass, z-scored with the unpruned model's per-layer statistics."""

    def __init__(self, layout: UnitLayout):
        self.layout = layout
        self.values = torch.zeros(layout.num_units, len(DYNAMIC))
        self.norm: dict[str, torch.Tensor] = {}

    @staticmethod
    def _stats(out: torch.Tensor) -> torch.Tensor:
        a = out.relu().flatten(2) if out.ndim > 2 else out.relu().unsqueeze(-1)
        a = a.transpose(0, 1).flatten(1)  # (units, images x positions)
        return torch.stack([a.mean(1), a.std(1, unbiased=False)], 1)

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        for name, out in outputs.items():
            lay = self.layout.by_name[name]
            s = self._stats(out).cpu()  # the values become observations (numpy)
            if name not in self.norm:  # the first pass is the unpruned model
                self.norm[name] = torch.stack([s.mean(0), s.std(0, unbiased=False).clamp_min(1e-6)])
            mu, sd = self.norm[name]
            self.values[lay.offset : lay.offset + lay.size] = ((s - mu) / sd).clamp(-Z_CLIP, Z_CLIP)
