"""The one interface of a trigger-free signal: per-unit evidence computed once per model from the
model and its clean defense set only (never the trigger, never the test split).

A signal is a name, a version (bumped whenever its numbers can change), a bounded `Params`
dataclass and `compute(model, layout, x, y)`. Signals sit below the environment and the defenses:
the environment turns them into observation columns (onp_env.env.signals), and a defense built on
a signal is that signal plus a selection rule (baselines.nc)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from onp_env.config import bounded, from_dict
from onp_env.devices import resolve_device
from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout
from onp_env.models import MAX_CLASSES
from onp_env.signals.shipped import ClassSpread, ShippedReference, shipped_reference

MAD_CONSISTENCY = 1.4826
"""MAD x this estimates a normal distribution's standard deviation (NC's anomaly index)."""


def anomaly_index(norms: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) Neural Cleanse's anomaly index of per-class trigger sizes: how far below the median each
    class's size lies, in robust (MAD) deviations; NC flags an index above 2. With a `reference`
    (each class's typical size on other models: class_reference), the index is taken
    on log(norm / reference) instead, so that a class every model reaches cheaply (a natural shortcut,
    such as Fashion-MNIST's bag) is not an outlier."""
    values = norms if reference is None else (norms / reference).log()
    med = values.median()
    mad = (values - med).abs().median() * MAD_CONSISTENCY
    return (med - values) / mad.clamp_min(1e-12)


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """(median, MAD_CONSISTENCY x MAD) of `values`: where a typical one lies, and how far they spread."""
    med = statistics.median(values)
    return med, MAD_CONSISTENCY * statistics.median(abs(v - med) for v in values)


def log_spread(sizes: Sequence[float]) -> tuple[float, float]:
    """median_spread of the log sizes of one trigger on several models (a shipped reference's untargeted sizes,
    shipped.UntargetedSizes)."""
    return median_spread([math.log(s) for s in sizes])


def log_ratio(norms: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(K,) how far each class's trigger is below the model's typical class, on a fixed scale: the
    median over classes of log(norm / reference) minus the class's own. A class scoring r takes a
    trigger e^r times smaller, relative to the model's other classes, than on the reference models.
    Unlike anomaly_index it does not divide by the model's own spread, which is small when every class
    sits near the reference and then turns a modest dip into a large index
    (benchmarks/results/detect_calibration.md)."""
    values = (norms / reference).log()
    return values.median() - values


def standardised(norms: torch.Tensor, reference: torch.Tensor, spread: ClassSpread) -> torch.Tensor:
    """(K,) each class's log_ratio in units of that class's own spread over the reference models, less its
    median there: a class whose trigger size varies more from model to model (a natural shortcut) needs a
    larger ratio to stand out as much as one that varies little."""
    median, scale = (torch.tensor(v, dtype=norms.dtype) for v in spread)
    return (log_ratio(norms, reference) - median) / scale


def class_scores(norms: torch.Tensor, reference: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(K,) each class's score of its trigger sizes, higher = more suspicious: `index` (anomaly_index)
    or `ratio` (log_ratio; without a reference, against 1 for every class)."""
    if kind == "index":
        return anomaly_index(norms, reference)
    return log_ratio(norms, reference if reference is not None else torch.ones_like(norms))


def class_reference(norms: list[torch.Tensor], targets: list[int | None]) -> torch.Tensor:
    """(K,) each class's median trigger size over reference models (clean or shadow models of the same
    data and architecture), leaving out the models whose backdoor targets that class; a class that
    every reference model targets gets the median of the other classes' references (no evidence)."""
    stacked = torch.stack(norms)
    ref = torch.full((stacked.shape[1],), float("nan"))
    for k in range(stacked.shape[1]):
        rows = [i for i, t in enumerate(targets) if t != k]
        if rows:
            ref[k] = stacked[rows, k].median()
    return torch.where(ref.isnan(), ref.nanmedian(), ref)


def fingerprint(model: nn.Module, *tensors: torch.Tensor, **settings: Any) -> str:
    """SHA-256 of a model's weights and buffers, some tensors and JSON-able settings: the key under which
    a signal may reuse an expensive result it computed for exactly these inputs in this process."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Memo:
    """Results kept in this process under the fingerprint of a model's weights, some tensors and
    settings; the oldest go first beyond `size`. A model with forward hooks (e.g. under Masks) is
    computed afresh: its hooks change its outputs and are not in the key."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: OrderedDict[str, Any] = OrderedDict()
        _MEMOS.add(self)

    def get(self, compute: Callable[[], Any], model: nn.Module, *tensors: torch.Tensor, **settings: Any) -> Any:
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return compute()
        key = fingerprint(model, *tensors, **settings)
        if key not in self.entries:
            self.entries[key] = compute()
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()

    @staticmethod
    def clear_all() -> None:
        """Empty every memo of this process: a run timed after another on the same model starts as a fresh
        `onp defend` would (benchmarks/deploy_cost.py)."""
        for memo in list(_MEMOS):
            memo.clear()


_MEMOS: weakref.WeakSet[Memo] = weakref.WeakSet()


@dataclass
class VerdictParams:
    """The settings every verdict signal (one that names a suspected class: the inversion, the latent
    shift) shares; its own Params extend them."""

    reference: list[float] = bounded([], gt=0, le=1e9)
    """Each class's typical trigger size on the defender's reference models (Signal.suspicion)."""
    gate: float = bounded(0.0, ge=0, le=1000)
    """Per-unit evidence only when the suspected class's anomaly index exceeds this (Signal.gated; 0:
    always, as in the papers)."""
    reference_from: str = ""
    """A class reference that ships with onp-env (onp_env.signals.shipped; `fashion-mnist`) in place of
    `reference`; empty: `reference` as given."""
    reference_transfer: bool = False
    """Read `reference_from` also on a model of another architecture that takes the same inputs and classes (a
    PreAct-ResNet-18 on Fashion-MNIST, say) [ours]. The anomaly index against a reference reads only each class's
    size relative to the others (scaling every reference size by one factor leaves it unchanged), so what carries
    over is which classes the data makes cheap to reach, not how large a trigger this architecture needs. Measured:
    benchmarks/results/resnet_reference_transfer.md."""


@dataclass
class SignalResult:
    units: torch.Tensor
    """(units,) evidence per unit, higher = more suspicious; NaN where the signal cannot judge."""
    globals: dict[str, float] = field(default_factory=dict)
    """Model-level evidence (e.g. an inversion's anomaly index)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What a reader may want to see (per-class norms, the steps taken): plain data."""


class Signal(ABC):
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type]
    observed: ClassVar[dict[str, tuple[str, float]]] = {}
    """Globals the environment observes: suffix of the observation's name (`{name}_{suffix}`) ->
    (key of SignalResult.globals, divisor); the quotient is clipped to [-1, 1]."""

    def __init__(self, seed: int = 0, device: str = "cpu", **params: Any):
        self.params: Any = from_dict(self.Params, params, f"signal {self.name} parameters")
        self.shipped: ShippedReference | None = None
        if isinstance(self.params, VerdictParams) and self.params.reference_from:
            if self.params.reference:
                raise OnpError(f"signal {self.name} parameters: reference_from replaces reference; set one of them")
            self.shipped = shipped_reference(self.params.reference_from)
        if isinstance(self.params, VerdictParams) and self.params.reference_transfer and not self.shipped:
            raise OnpError(f"signal {self.name} parameters: reference_transfer reads a shipped reference on another "
                           "architecture: set reference_from, or drop reference_transfer")  # fmt: skip
        if self.shipped is not None:
            self.params.reference = self.shipped.sizes(self.name, self.version, dataclasses.asdict(self.params))
        reference: list[float] = self.params.reference if isinstance(self.params, VerdictParams) else []
        if len(reference) > MAX_CLASSES:
            raise OnpError(f"signal {self.name} parameters.reference has {len(reference)} entries: at most one per "
                           f"class ({MAX_CLASSES})")  # fmt: skip
        self.seed: int = seed
        self.device: torch.device = resolve_device(device)

    def suspicion(self, norms: torch.Tensor) -> torch.Tensor:
        """(K,) the anomaly index of per-class trigger sizes. `params.reference`, where set, holds each
        class's typical size on the defender's reference models of the same data and architecture
        (class_reference over its shadow or clean models; `onp train-agent` fills it in from its shadow
        zoo): the index is then taken against it, so that a class every model reaches cheaply (a
        natural shortcut) is not suspected. Empty: each model judged on its own, as in the papers."""
        return self.score(norms, "index")

    def score(self, norms: torch.Tensor, kind: str) -> torch.Tensor:
        """(K,) class_scores of per-class trigger sizes of `kind` (`index`: suspicion; `ratio`: the log
        ratio of onp_env.signals.shipped.DetectRule), against `params.reference` where set."""
        reference = self.reference_for(len(norms))
        return class_scores(norms, torch.tensor(reference, dtype=norms.dtype) if reference else None, kind)

    def gated(self, units: torch.Tensor, index: float) -> torch.Tensor:
        """`units`, or NaN everywhere (no evidence) when the suspected class's anomaly index is at most
        `params.gate`: a verdict the signal itself does not believe carries no unit evidence."""
        gate = self.params.gate if isinstance(self.params, VerdictParams) else 0.0
        return torch.full_like(units, float("nan")) if gate > 0 and index <= gate else units

    def check_reference(self, model: nn.Module, x: torch.Tensor, classes: int) -> list[float]:
        """The reference, refused (before any work) where it was computed for another class count, or
        shipped for models of another kind than `model` (reading inputs like `x`)."""
        if self.shipped is not None:
            self.shipped.check_model(model, x, self.params.reference_transfer)
        return self.reference_for(classes)

    def class_spread(self) -> ClassSpread | None:
        """The shipped reference's per-class spread of this signal's scores (its settings checked), None without one."""
        if self.shipped is None:
            return None
        return self.shipped.spread(self.name, self.version, dataclasses.asdict(self.params))

    def reference_for(self, classes: int) -> list[float]:
        """The reference, refused where it was computed for another class count."""
        reference: list[float] = self.params.reference if isinstance(self.params, VerdictParams) else []
        if reference and len(reference) != classes:
            raise OnpError(f"signal {self.name}'s reference holds {len(reference)} classes, the model has "
                           f"{classes}: use a reference computed on models of this dataset, or none")  # fmt: skip
        return reference

    @abstractmethod
    def compute(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> SignalResult:
        """Evidence for `model` (left unchanged) from clean images `x` with labels `y`; on the CPU."""
