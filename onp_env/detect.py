"""`onp detect`: is this model backdoored, and toward which class? Neural Cleanse's answer (Wang et
al., IEEE S&P 2019): invert a trigger for every class from clean defense images
(onp_env.signals.trigger_inversion); a class reached by an outlying small mask (anomaly index above
the threshold, 2 in the paper) is the suspected target. Trigger-free: the manifest's attack and the
test split are never read.

Where this departs from the paper: each class's trigger can be judged against its size on other
models of the same kind (a class reference), so that a class every model reaches cheaply (a natural
shortcut, such as Fashion-MNIST's bag) is not flagged. A shipped reference may carry a rule
calibrated on clean and backdoored models (onp_env.signals.shipped.DetectRule; fashion-mnist-clean:
the log ratio of the inversion and of the latent shift, the larger deciding, with the line at the
highest clean calibration score, benchmarks/results/detect_calibration.md); by default (`auto`) the
first shipped reference with a rule that describes the model is used. Warping (WaNet) and
whole-image (SIG) triggers are not masks: the latent shift finds some of them, the inversion few."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from onp_env.artifacts import Artifact, load_artifact
from onp_env.defend import defense_subset
from onp_env.errors import OnpError
from onp_env.graph.units import find_units
from onp_env.signals import SIGNALS
from onp_env.signals.base import Signal, class_reference
from onp_env.signals.shipped import shipped_names, shipped_reference

AUTO = "auto"
NC_THRESHOLD = 2.0
SIZE_NAMES = {"inversion": "mask L1", "latent_gap": "latent shift"}
SCORE_NAMES = {"index": "anomaly index", "ratio": "log ratio"}


def matching_reference(model: torch.nn.Module, x: torch.Tensor, params: dict[str, Any]) -> str | None:
    """The first shipped reference with a detection rule whose models are of `model`'s kind and whose
    sizes were measured with `params`; None where there is none."""
    for name in shipped_names():
        ref = shipped_reference(name)
        if ref.detect is None:
            continue
        try:
            for s in ref.detect.signals:
                SIGNALS[s](reference_from=name, **(params if s == "inversion" else {}))  # settings it was measured with
            ref.check_model(model, x[:1])
        except OnpError:
            continue
        return name
    return None


def _signals(names: tuple[str, ...], params: dict[str, Any], seed: int, device: str, reference_from: str | None
             ) -> dict[str, Signal]:  # fmt: skip
    shipped = {"reference_from": reference_from} if reference_from else {}
    return {s: SIGNALS[s](seed=seed, device=device, **(params if s == "inversion" else {}), **shipped) for s in names}


def _norms(signals: dict[str, Signal], art: Artifact, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Each signal's SignalResult.details on clean images `x` (labels `y`) of the artifact."""
    model = art.model.to(next(iter(signals.values())).device)
    layout, _ = find_units(model, x[:2])
    return {s: sig.compute(model, layout, x, y).details for s, sig in signals.items()}


def detect_artifact(path: str | Path | Artifact, params: dict[str, Any] | None = None, threshold: float | None = None,
                    seed: int = 0, defense_fraction: float | None = None, device: str = "cpu",
                    data_root: str | None = None, reference: list[str] | None = None,
                    reference_from: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The verdict and its evidence as plain data (what `onp detect --json` prints). `params`: the
    inversion's settings. `reference`: artifact folders of other models of the same data and
    architecture (clean or backdoored, with their attacks known: your own shadow models); each class's
    norm is then compared with its norm on them. `reference_from`: the name of such a reference that
    ships with onp-env (onp_env.signals.shipped), `auto` (the first that describes the model and holds
    a detection rule), or None (the model judged alone, as in the paper). `threshold`: the flag line;
    None: the shipped rule's, else NC's 2."""
    if threshold is not None and not 0 <= threshold <= 1000:
        raise OnpError(f"--threshold must be in [0, 1000], got {threshold:g}")
    if reference and reference_from not in (None, AUTO):
        raise OnpError("--reference and --reference-from are two references: pass one of them")
    params = dict(params or {})
    for key in ("reference", "reference_from"):
        if key in params:
            raise OnpError(f"--set {key}=... is not an inversion setting here: pass --{key.replace('_', '-')}")
    _signals(("inversion",), params, seed, device, None)  # parameters checked before any work
    if reference_from not in (None, AUTO):
        shipped_reference(reference_from)
    art = path if isinstance(path, Artifact) else load_artifact(path)
    refs = [load_artifact(r) for r in reference or []]
    for r in refs:
        same = r.manifest["dataset"]["name"] == art.manifest["dataset"]["name"]
        if not same or r.manifest["model"] != art.manifest["model"]:
            raise OnpError(f"reference {r.path} has another dataset or architecture than {art.path}: pass "
                           "models of the same data and model")  # fmt: skip
    x, y = defense_subset(art, defense_fraction, seed, data_root)
    auto = reference_from == AUTO
    if auto:
        reference_from = None if refs else matching_reference(art.model, x, params)
    rule = shipped_reference(reference_from).detect if reference_from else None
    signals = _signals(rule.signals if rule else ("inversion",), params, seed, device, reference_from)
    start = time.perf_counter()
    found = _norms(signals, art, x, y)
    if refs:
        sizes = [torch.tensor(_norms(signals, r, *defense_subset(r, defense_fraction, seed, data_root))["inversion"]
                              ["norms"]) for r in refs]  # fmt: skip
        targets = [r.attack.target if r.attack is not None and r.attack.mode == "all-to-one" else None for r in refs]
        signals["inversion"].params.reference = class_reference(sizes, targets).tolist()
    kind = rule.score if rule else "index"
    scores = {s: sig.score(torch.tensor(found[s]["norms"]), kind) for s, sig in signals.items()}
    best = {s: int(torch.argmax(v)) for s, v in scores.items()}
    decided = max(scores, key=lambda s: float(scores[s][best[s]]))  # ties: the inversion, listed first
    k = best[decided]
    value = float(scores[decided][k])
    line = threshold if threshold is not None else rule.threshold if rule else NC_THRESHOLD
    names = art.manifest["dataset"]["class_names"]
    shipped = signals["inversion"].shipped
    return {
        "verdict": "backdoored" if value > line else "clean",
        "suspect": k, "suspect_name": names[k], "score": value, "score_kind": kind,
        "signal": decided, "threshold": line,
        "threshold_from": "--threshold" if threshold is not None else "calibrated" if rule else "Neural Cleanse",
        "calibration": None if rule is None else {"backdoored": rule.backdoored, "clean": rule.clean, "auc": rule.auc},
        "classes": [{"class": c, "name": names[c], "trigger_found": bool(found["inversion"]["reached"][c]),
                     "sizes": {s: found[s]["norms"][c] for s in signals},
                     "scores": {s: float(scores[s][c]) for s in signals}} for c in range(len(names))],
        "reference_models": shipped.models if shipped else len(refs),
        "reference_from": shipped.name if shipped else None, "reference_auto": auto and shipped is not None,
        "steps": found["inversion"]["steps"], "seconds": round(time.perf_counter() - start, 2),
        "artifact": str(art.path),
    }  # fmt: skip


def format_detection(d: dict[str, Any]) -> list[str]:
    kind = SCORE_NAMES[d["score_kind"]]
    by = f" ({SIZE_NAMES[d['signal']]})" if len(d["classes"][0]["scores"]) > 1 else ""
    score = f"{kind} {d['score']:.2f}"
    verdict = (f"backdoored: suspected target class {d['suspect']} ({d['suspect_name']}), {score} > "
               f"{d['threshold']:g}{by}" if d["verdict"] == "backdoored" else
               f"no backdoor found: the most suspicious class, {d['suspect']} ({d['suspect_name']}), has {score} "
               f"<= {d['threshold']:g}{by}")  # fmt: skip
    signals = list(d["classes"][0]["sizes"])
    width = max(len(c["name"]) for c in d["classes"])
    head = "".join(f"  {SIZE_NAMES[s]:>12}  {'score':>6}" for s in signals)
    lines = [verdict, "", f"evidence: each class's smallest trigger under each signal, and its {kind} "
             "(higher: more suspicious)", f"  {'class':<{width + 4}}{head}"]  # fmt: skip
    for c in sorted(d["classes"], key=lambda c: -c["scores"][d["signal"]]):
        cells = "".join(f"  {c['sizes'][s]:>12.2f}  {c['scores'][s]:>6.2f}" for s in signals)
        mark = "  <- suspected" if c["class"] == d["suspect"] else ""
        found = "" if c["trigger_found"] else " (no working mask found)"
        lines.append(f"  {c['class']:>2} {c['name']:<{width}}{cells}{mark}{found}")
    if d["reference_from"]:
        how = ", which describes this model; --reference-from none judges it alone" if d["reference_auto"] else ""
        against = f"each class against its size on {d['reference_models']} reference models (the shipped " \
                  f"reference {d['reference_from']}{how})"  # fmt: skip
    elif d["reference_models"]:
        against = f"each class against its size on {d['reference_models']} reference models"
    else:
        against = "each class against the model's other classes"
    if d["threshold_from"] == "calibrated":
        c = d["calibration"]
        line = (f"the line is the highest score of {c['clean']} clean calibration models (with {c['backdoored']} "
                f"backdoored ones, detection ROC-AUC {c['auc']:.2f})")  # fmt: skip
    else:
        line = "the line is Neural Cleanse's" if d["threshold_from"] == "Neural Cleanse" else "the line is yours"
    lines += ["", f"{against}; {line}", f"computed on clean defense images in {d['steps']} inversion steps, "
              f"{d['seconds']:.1f} s; neither the manifest's attack nor test data was used"]  # fmt: skip
    return lines
