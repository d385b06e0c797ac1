"""`onp detect`: is this model backdoored, and toward which class? Neural Cleanse's answer (Wang et
al., IEEE S&P 2019): invert a trigger for every class from clean defense images
(onp_env.signals.trigger_inversion); a class reached by an outlying small mask (anomaly index above
the threshold, 2 in the paper) is the suspected target. Trigger-free: the manifest's attack and the
test split are never read. Warping triggers (WaNet) are not masks, and this detector is not expected
to find them (benchmarks/results/detection.md measures it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from onp_env.artifacts import Artifact, load_artifact
from onp_env.defend import defense_subset
from onp_env.errors import OnpError
from onp_env.signals.base import class_reference
from onp_env.signals.trigger_inversion import Inverted, TriggerInversion


def _invert(signal: TriggerInversion, art: Artifact, fraction: float | None, seed: int, root: str | None) -> Inverted:
    x, y = defense_subset(art, fraction, seed, root)
    return signal.invert(art.model.to(signal.device), x.to(signal.device), y.to(signal.device))


def detect_artifact(path: str | Path | Artifact, params: dict[str, Any] | None = None, threshold: float = 2.0,
                    seed: int = 0, defense_fraction: float | None = None, device: str = "cpu",
                    data_root: str | None = None, reference: list[str] | None = None,
                    reference_from: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The verdict and its evidence as plain data (what `onp detect --json` prints). `reference`:
    artifact folders of other models of the same data and architecture (clean or backdoored, with
    their attacks known: your own shadow models); each class's norm is then compared with its norm on
    them (Inverted.anomaly), which keeps natural shortcut classes from being flagged. `reference_from`:
    the name of such a reference that ships with onp-env (onp_env.signals.shipped)."""
    if not 0 <= threshold <= 1000:
        raise OnpError(f"--threshold must be in [0, 1000], got {threshold:g}")
    if reference and reference_from:
        raise OnpError("--reference and --reference-from are two references: pass one of them")
    params = {**(params or {}), **({"reference_from": reference_from} if reference_from else {})}
    signal = TriggerInversion(seed=seed, device=device, **params)  # parameters checked before any work
    art = path if isinstance(path, Artifact) else load_artifact(path)
    refs = [load_artifact(r) for r in reference or []]
    for r in refs:
        same = r.manifest["dataset"]["name"] == art.manifest["dataset"]["name"]
        if not same or r.manifest["model"] != art.manifest["model"]:
            raise OnpError(f"reference {r.path} has another dataset or architecture than {art.path}: pass "
                           "models of the same data and model")  # fmt: skip
    start = time.perf_counter()
    inv = _invert(signal, art, defense_fraction, seed, data_root)
    if refs:
        invs = [_invert(signal, r, defense_fraction, seed, data_root) for r in refs]
        targets = [r.attack.target if r.attack is not None else None for r in refs]
        signal.params.reference = class_reference([i.norms for i in invs], targets).tolist()
    index = signal.suspicion(inv.norms)
    k = int(torch.argmax(index))
    names = art.manifest["dataset"]["class_names"]
    return {
        "verdict": "backdoored" if float(index[k]) > threshold else "clean",
        "suspect": k, "suspect_name": names[k], "anomaly_index": float(index[k]), "threshold": threshold,
        "classes": [{"class": c, "name": names[c], "mask_l1": float(inv.norms[c]), "anomaly_index": float(index[c]),
                     "trigger_found": bool(inv.reached[c])} for c in range(len(index))],
        "reference_models": signal.shipped.models if signal.shipped else len(refs),
        "reference_from": signal.shipped.name if signal.shipped else None, "steps": inv.steps,
        "seconds": round(time.perf_counter() - start, 2), "artifact": str(art.path),
    }  # fmt: skip


def format_detection(d: dict[str, Any]) -> list[str]:
    verdict = (f"backdoored: suspected target class {d['suspect']} ({d['suspect_name']}), anomaly index "
               f"{d['anomaly_index']:.2f} > {d['threshold']:g}" if d["verdict"] == "backdoored" else
               f"no backdoor found: the most anomalous class, {d['suspect']} ({d['suspect_name']}), has index "
               f"{d['anomaly_index']:.2f} <= {d['threshold']:g}")  # fmt: skip
    width = max(len(c["name"]) for c in d["classes"])
    lines = [verdict, "", "evidence: the smallest mask that sends the defense images to each class (Neural Cleanse)",
             f"  {'class':<{width + 4}}  mask L1 (pixels)  anomaly index"]  # fmt: skip
    for c in sorted(d["classes"], key=lambda c: c["mask_l1"]):
        mark = "  <- suspected" if c["class"] == d["suspect"] else ""
        found = "" if c["trigger_found"] else " (no working trigger found)"
        lines.append(f"  {c['class']:>2} {c['name']:<{width}}  {c['mask_l1']:>16.1f}  {c['anomaly_index']:>13.2f}"
                     f"{mark}{found}")  # fmt: skip
    shipped = f" (the shipped reference {d['reference_from']})" if d.get("reference_from") else ""
    against = (f"each class against its norm on {d['reference_models']} reference models{shipped}"
               if d["reference_models"] else "each class against the model's other classes")  # fmt: skip
    lines += ["", f"inverted on clean defense images in {d['steps']} steps, {d['seconds']:.1f} s; {against}; "
              "neither the manifest's attack nor test data was used"]  # fmt: skip
    return lines
