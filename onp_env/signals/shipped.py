"""Class references that ship with onp-env: each class's typical trigger size under a verdict signal
(class_reference over shadow models of one dataset and architecture), so that a user of such a model
can judge its classes (Signal.suspicion) without training shadow models first.

One JSON file per reference in onp_env/signals/references/, written by benchmarks/class_reference.py
(the shadow models' `fashion-mnist`) or benchmarks/detect_calibration.py (`fashion-mnist-clean`). A
reference holds, per signal, the sizes and the settings they were measured with: a signal whose
settings would size triggers differently, or a model of another kind, is refused before any work.
It may also hold `onp detect`'s rule for it (DetectRule), chosen on calibration models, and the sizes of
an untargeted trigger on its models (UntargetedSizes), by which `verdict` judges one across models."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onp_env.errors import OnpError
from onp_env.models import MAX_CLASSES

REFERENCES = Path(__file__).resolve().parent / "references"
FORMAT = "onp-class-reference"
FORMAT_VERSION = 2
READ_ONLY = ("reference", "reference_from", "reference_transfer", "gate")
"""Signal settings that change only how a verdict is read, not the trigger sizes a reference holds."""
SCORES = ("index", "ratio")
"""How a class's size is judged against the reference: NC's anomaly index (onp_env.signals.base.
anomaly_index) or the log ratio (base.log_ratio)."""


@dataclass(frozen=True)
class DetectRule:
    """How `onp detect` reads a model against this reference: each signal's per-class `score`, the
    signal whose top class scores higher decides, and the model is flagged above `threshold`."""

    score: str
    signals: tuple[str, ...]
    threshold: float
    backdoored: int
    """How many backdoored calibration models the threshold and score were chosen on..."""
    clean: int
    """... and how many clean ones (the threshold: the highest clean score, no false alarm there)."""
    auc: float
    """The rule's detection ROC-AUC on them."""


BLEND_SIGNAL = "inversion_blend"
"""The name under which a reference's `signals` hold each class's size of its trigger inverted as a whole-image
blend (onp_env.signals.trigger_inversion's `blend` form, the inversion's settings): `verdict`'s `blend_verdict`."""
UNTARGETED_FORMS = ("mask", "blend")
"""The untargeted inversion's forms (of onp_env.signals.trigger_inversion.FORMS) a shipped reference records
and `verdict` reads."""


ClassSpread = tuple[list[float], list[float]]
"""Per class, the median and the spread (1.4826 MAD) of its log-ratio score (onp_env.signals.base.log_ratio) over the
reference's models whose backdoor does not target it: how a class's score varies from model to model."""


@dataclass(frozen=True)
class UntargetedSizes:
    """An untargeted trigger's size on the reference's models, per form: the median of the log sizes
    and their spread (1.4826 MAD), measured with `settings` of the inversion at `version`."""

    version: int
    settings: dict[str, Any]
    forms: dict[str, tuple[float, float]]
    """form -> (median log size, spread)."""

    def check(self, name: str, version: int, settings: dict[str, Any]) -> None:
        """Refuse an inversion with other settings than these sizes were measured with (as ShippedReference.sizes)."""
        _same_settings(name, "the untargeted inversion", self.version, self.settings, version, settings)

    def index(self, form: str, size: float) -> float:
        """NC's anomaly index of `size` across the reference's models: how many spreads its log lies
        below their median."""
        median, spread = self.forms[form]
        return (median - math.log(max(size, 1e-6))) / spread  # a mask that rounds to 0 is as small as they come


@dataclass(frozen=True)
class ShippedReference:
    name: str
    data: str
    architecture: str
    """Class name of the models (e.g. SmallCNN)."""
    parameters: int
    """Their number of parameters (the class name does not fix widths)."""
    input_shape: tuple[int, ...]
    classes: int
    signals: dict[str, dict[str, Any]]
    """signal name -> {"version": int, "settings": {...}, "sizes": [one per class]}."""
    models: int
    """How many models it summarises."""
    detect: DetectRule | None = None
    """`onp detect`'s calibrated rule for this reference; None: NC's anomaly index, flagged above 2."""
    untargeted: UntargetedSizes | None = None
    """An untargeted trigger's sizes on the models; None: not measured for this reference."""

    def sizes(self, signal: str, version: int, settings: dict[str, Any]) -> list[float]:
        """The per-class sizes of `signal`, refused where they were measured with another version or
        other settings than the caller's (which would size triggers differently)."""
        entry = self.signals.get(signal)
        if entry is None:
            raise OnpError(f"the shipped class reference {self.name!r} has no sizes for signal {signal!r} (it has "
                           f"{', '.join(sorted(self.signals))}): leave reference_from empty for it")  # fmt: skip
        _same_settings(self.name, signal, entry["version"], entry["settings"], version, settings)
        return list(entry["sizes"])

    def spread(self, signal: str, version: int, settings: dict[str, Any]) -> ClassSpread | None:
        """The per-class spread of `signal`'s scores (ClassSpread), refused as `sizes` are; None where not measured."""
        self.sizes(signal, version, settings)
        entry = self.signals[signal].get("spread")
        return None if entry is None else (list(entry["median"]), list(entry["spread"]))

    def check_model(self, model: nn.Module, x: torch.Tensor, transfer: bool = False) -> None:
        """Refuse a model of another kind than the reference's shadow models; with `transfer` (a signal's
        reference_transfer), only one of other inputs or another class count."""
        with torch.no_grad():
            found = (type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(x.shape[1:]),
                     int(model(x[:1]).shape[1]))  # fmt: skip
        if transfer and found[2:] != (self.input_shape, self.classes):
            raise OnpError(f"the shipped class reference {self.name!r} describes models with {list(self.input_shape)} "
                           f"inputs and {self.classes} classes, not {list(found[2])} and {found[3]}: "
                           "reference_transfer carries a reference to other architectures of the same data only: "
                           "leave reference_from empty")  # fmt: skip
        if not transfer and found != (self.architecture, self.parameters, self.input_shape, self.classes):
            raise OnpError(f"the shipped class reference {self.name!r} describes {self.architecture} models of "
                           f"{self.parameters} parameters with {list(self.input_shape)} inputs and {self.classes} "
                           f"classes, not {found[0]} of {found[1]} with {list(found[2])} and {found[3]}: leave "
                           "reference_from empty, or pass a reference measured on models like yours")  # fmt: skip


def _same_settings(name: str, what: str, was_version: int, was: dict[str, Any], version: int,
                   settings: dict[str, Any]) -> None:  # fmt: skip
    if was_version != version:
        raise OnpError(f"the shipped class reference {name!r} was measured with {what} version {was_version}, this "
                       f"is version {version}: regenerate it (benchmarks/class_reference.py) or leave reference_from "
                       "empty")  # fmt: skip
    mine = {k: v for k, v in settings.items() if k not in READ_ONLY}
    differ = sorted(k for k in set(mine) | set(was) if mine.get(k) != was.get(k))
    if differ:
        shown = ", ".join(f"{k}={was.get(k)!r}" for k in differ)
        raise OnpError(f"the shipped class reference {name!r} was measured with {what} {shown}: drop those settings, "
                       "or pass a reference measured with yours")  # fmt: skip


def shipped_names() -> list[str]:
    return sorted(p.stem for p in REFERENCES.glob("*.json"))


def shipped_reference(name: str) -> ShippedReference:
    """The shipped class reference `name`, its structure checked; OnpError naming the ones there are."""
    names = shipped_names()
    if name not in names:
        raise OnpError(f"no shipped class reference {name!r}: choose one of {', '.join(names)}, or leave "
                       "reference_from empty and pass a reference of your own")  # fmt: skip
    return _parse(name, json.loads((REFERENCES / f"{name}.json").read_text()))


def _parse(name: str, d: Any) -> ShippedReference:
    def bad(what: str) -> OnpError:
        return OnpError(f"shipped class reference {name!r} is malformed ({what}): reinstall onp-env")

    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise bad(f"not {FORMAT} version {FORMAT_VERSION}")
    classes, shape = d.get("classes"), d.get("input_shape")
    if not isinstance(classes, int) or not 2 <= classes <= MAX_CLASSES:
        raise bad("classes")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise bad("input_shape")
    signals = d.get("signals")
    if not isinstance(signals, dict) or not signals:
        raise bad("signals")
    for signal, entry in signals.items():
        sizes = entry.get("sizes") if isinstance(entry, dict) else None
        if not isinstance(sizes, list) or len(sizes) != classes:
            raise bad(f"{signal} sizes")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in sizes):
            raise bad(f"{signal} sizes")
        if not isinstance(entry.get("version"), int) or not isinstance(entry.get("settings"), dict):
            raise bad(f"{signal} version or settings")
        if "spread" in entry:
            _check_spread(entry["spread"], classes, bad(f"{signal} spread"))
    for key in ("data", "architecture"):
        if not isinstance(d.get(key), str):
            raise bad(key)
    if not isinstance(d.get("parameters"), int):
        raise bad("parameters")
    models = d.get("models")
    return ShippedReference(name=name, data=d["data"], architecture=d["architecture"], parameters=d["parameters"],
                            input_shape=tuple(shape), classes=classes, signals=signals,
                            models=len(models) if isinstance(models, list) else 0,
                            detect=_parse_rule(d["detect"], signals, bad) if "detect" in d else None,
                            untargeted=_parse_untargeted(d["untargeted"], bad) if "untargeted" in d else None,
                            )  # fmt: skip


def _check_spread(entry: Any, classes: int, bad: OnpError) -> None:
    if not isinstance(entry, dict) or set(entry) != {"median", "spread", "from"} or not isinstance(entry["from"], str):
        raise bad
    for key, low, high in (("median", -100, 100), ("spread", 1e-6, 100)):
        values = entry[key]
        if not isinstance(values, list) or len(values) != classes:
            raise bad
        if not all(type(v) in (int, float) and math.isfinite(v) and low <= v <= high for v in values):
            raise bad


def _parse_rule(rule: Any, signals: dict[str, Any], bad: Callable[[str], OnpError]) -> DetectRule:
    if not isinstance(rule, dict) or set(rule) != {"score", "signals", "threshold", "calibration"}:
        raise bad("detect")
    names, threshold, cal = rule["signals"], rule["threshold"], rule["calibration"]
    if rule["score"] not in SCORES:
        raise bad("detect.score")
    if not isinstance(names, list) or not names or len(set(names)) != len(names) or not set(names) <= set(signals):
        raise bad("detect.signals")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not 0 <= threshold <= 1000:
        raise bad("detect.threshold")
    counts_ok = isinstance(cal, dict) and all(
        isinstance(cal.get(k), int) and cal[k] > 0 for k in ("backdoored", "clean")
    )
    if not counts_ok or not isinstance(cal.get("auc"), (int, float)) or not 0 <= cal["auc"] <= 1:
        raise bad("detect.calibration")
    return DetectRule(score=rule["score"], signals=tuple(names), threshold=float(threshold),
                      backdoored=cal["backdoored"], clean=cal["clean"], auc=float(cal["auc"]))  # fmt: skip


def _parse_untargeted(entry: Any, bad: Callable[[str], OnpError]) -> UntargetedSizes:
    if not isinstance(entry, dict) or set(entry) != {"version", "settings", "forms"}:
        raise bad("untargeted")
    forms = entry["forms"]
    if type(entry["version"]) is not int or not isinstance(entry["settings"], dict):
        raise bad("untargeted version or settings")
    if not isinstance(forms, dict) or set(forms) != set(UNTARGETED_FORMS):
        raise bad("untargeted forms")
    parsed = {}
    for form, value in forms.items():
        ok = isinstance(value, dict) and set(value) == {"median_log", "spread"}
        if not ok or not all(type(v) in (int, float) and math.isfinite(v) for v in value.values()):
            raise bad(f"untargeted {form}")
        if not 0 < value["spread"] <= 100 or abs(value["median_log"]) > 100:
            raise bad(f"untargeted {form}")
        parsed[form] = (float(value["median_log"]), float(value["spread"]))
    return UntargetedSizes(version=entry["version"], settings=entry["settings"], forms=parsed)
