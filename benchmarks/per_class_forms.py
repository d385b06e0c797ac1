"""Does Neural Cleanse's per-class inversion name a whole-image backdoor's target when its trigger is a
whole-image blend or an additive perturbation instead of a mask?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/per_class_forms.py [--workers 2] [--report-only]

`verdict`'s per-class inversion sizes a mask and pattern per class (trigger_inversion's `mask` form). On
the configuration-shift set both strong-SIG models (a sinusoid added over the whole image, at twice the
training amplitude at test time) stay at 46-73% ASR: the mask verdict names a wrong class or none
(inversion_seeds.md). A sinusoid is what the `additive` form adds, and a blended pattern what the `blend`
form stamps. This inverts every class in those two forms (onp_env.signals.trigger_inversion.invert with
`form`; the shipped settings, seed 0) on the models of untargeted_inversion.py: the 30 sampled shadow
models, the 9 clean held-out models and the 12 configuration-shift models, per defense fraction (5%: the
whole defense set; 1%: its stratified fifth, seed 0). The mask form's sizes are inversion_seeds.jsonl's
seed 0, the same inversion.

Each form's sizes are judged as `verdict` judges the mask's: NC's anomaly index of log(size / reference),
the reference being each class's median size over the shadow models at 5% (a model's own target class
left out, as onp_env.signals.base.class_reference; a shadow model left out of its own reference). The
attack is read only to label and score rows. One JSON line per model (resumable); writes
per_class_forms.md."""

from __future__ import annotations

import statistics
import time
from typing import Any

from inversion_seeds import GROUPS, model_cells, verdict_cell
from inversion_seeds import RESULTS as SEEDS_RESULTS
from rows import exit_2_on_bad_input
from signal_models import HERE, per_model_main
from untargeted_inversion import FRACTIONS, LINE
from untargeted_inversion import models as all_models

RESULTS = HERE / "results" / "per_class_forms.jsonl"
FORMS = ("blend", "additive")
"""Forms inverted here; the `mask` form's sizes come from inversion_seeds.jsonl (seed 0)."""


def measure_variants(
    name: str, role: str, path: str, variants: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """A row: each of `variants` (cell -> form and settings) inverted for every class, seed 0, per fraction."""
    import dataclasses

    import torch

    from onp_env import load_artifact
    from onp_env.defend import defense_subset
    from onp_env.signals import SIGNALS
    from onp_env.signals.trigger_inversion import invert

    torch.set_num_threads(1)
    art = load_artifact(path)
    attack = art.manifest.get("attack") or {}
    shipped = SIGNALS["inversion"]().params
    row: dict[str, Any] = {"model": name, "role": role, "label": attack.get("label") or attack.get("name", "clean"),
                           "mode": attack.get("mode"), "target": attack.get("target"), "cells": {}}  # fmt: skip
    for cell, (shape, changed) in variants.items():
        params = dataclasses.replace(shipped, **changed)
        for fraction in FRACTIONS:
            x, y = defense_subset(art, fraction, 0)
            with torch.no_grad():
                classes = int(art.model(x[:1]).shape[1])
            start = time.perf_counter()
            inv = invert(art.model, x, y, classes, params, 0, torch.device("cpu"), shape)
            row["cells"].setdefault(cell, {})[str(fraction)] = {
                "norms": inv.norms.tolist(), "reached": inv.reached.tolist(), "steps": inv.steps,
                "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    return row


def measure(name: str, role: str, path: str) -> dict[str, Any]:
    return measure_variants(name, role, path, {form: (form, {}) for form in FORMS})


def with_mask(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with the mask form's seed-0 sizes of inversion_seeds.jsonl under cells["mask"] (where it has
    the model)."""
    import json

    seeds = {}
    if SEEDS_RESULTS.is_file():
        seeds = {r["model"]: r for r in map(json.loads, SEEDS_RESULTS.read_text().splitlines())}
    out = []
    for r in rows:
        s = seeds.get(r["model"])
        mask = {f: {"norms": s[f][0]} for f in ("0.05", "0.01")} if s else None
        out.append({**r, "cells": {**({"mask": mask} if mask else {}), **r["cells"]}})
    return out


def reference(rows: list[dict[str, Any]], form: str, leave: str | None) -> list[float]:
    """Each class's median size in `form` over the shadow models at 5%, their own target left out, and the
    model `leave` left out."""
    shadows = [r for r in rows if r["role"] == "shadow" and r["model"] != leave and form in r["cells"]]
    classes = len(shadows[0]["cells"][form]["0.05"]["norms"])
    return [statistics.median(r["cells"][form]["0.05"]["norms"][k] for r in shadows
                              if not (r["mode"] == "all-to-one" and r["target"] == k))
            for k in range(classes)]  # fmt: skip


def verdict(rows: list[dict[str, Any]], r: dict[str, Any], form: str, fraction: str) -> tuple[int, float]:
    """(suspect, anomaly index) of `r`'s sizes in `form` against the shadow reference."""
    import torch

    from onp_env.signals.base import anomaly_index

    norms = torch.tensor(r["cells"][form][fraction]["norms"])
    index = anomaly_index(norms, torch.tensor(reference(rows, form, r["model"])))
    k = int(torch.argmax(index))
    return k, float(index[k])


def legend(reference: str = "") -> str:
    """The reports' words for their columns; `reference` qualifies the reference's medians (" at the same cap")."""
    return (f"Index: NC's anomaly index of log(size / reference), the reference each class's median{reference} "
            "over the shadow models at 5% (own target and own model left out). Flagged: index above "
            f"{LINE:g}; target named: the suspect is the attack's target (all-to-one models, flagged or not); "
            "detection ROC-AUC: the top index, clean models against that group. Seconds: one inversion of ten "
            "classes, one thread (median).")  # fmt: skip


def tables(rows: list[dict[str, Any]], cells: list[str]) -> list[str]:
    """The report's tables of `cells` (each a form, or a form under other settings: blend_steps.py), from the
    groups' table on."""
    import torch
    from feature_separability import auc

    lines = ["| models | fraction | cell | flagged | target named | mean top index | detection AUC | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    clean = [r for r in rows if GROUPS["clean"](r)]
    for name, keep in GROUPS.items():
        group = [r for r in rows if keep(r)]
        for fraction in ("0.05", "0.01") if group else ():
            for cell in cells:
                vs = [verdict(rows, r, cell, fraction) for r in group]
                flagged = sum(i > LINE for _, i in vs)
                aimed = [k == r["target"] for r, (k, _) in zip(group, vs, strict=True) if r["mode"] == "all-to-one"]
                named = f"{sum(aimed)} of {len(aimed)}" if aimed and name != "clean" else "-"
                detect = "-"
                if name != "clean" and clean:
                    tops = torch.tensor([i for _, i in vs] + [verdict(rows, r, cell, fraction)[1] for r in clean])
                    detect = f"{auc(tops, torch.arange(len(tops)) < len(vs)):.2f}"
                secs = [r["cells"][cell][fraction].get("seconds") for r in group]
                sec = f"{statistics.median(secs):.1f}" if None not in secs else "-"
                lines.append(f"| {name} ({len(group)}) | {float(fraction):.0%} | {cell} | {flagged} of {len(vs)} | "
                             f"{named} | {statistics.mean(i for _, i in vs):.2f} | {detect} | {sec} |")  # fmt: skip
    lines += ["", "## Target named, per attack (all-to-one models, 5% / 1%)", "",
              "| models | attack | " + " | ".join(cells) + " |", "|---|---|" + "---:|" * len(cells)]  # fmt: skip
    for role in ("shadow", "shift"):
        group = [r for r in rows if r["role"] == role and r["mode"] == "all-to-one"]
        for label in sorted({r["label"] for r in group}):
            of = [r for r in group if r["label"] == label]
            shown = []
            for cell in cells:
                hits = [sum(verdict(rows, r, cell, f)[0] == r["target"] for r in of) for f in ("0.05", "0.01")]
                shown.append(f"{hits[0]} / {hits[1]} of {len(of)}")
            lines.append(f"| {role} | {label} | {' | '.join(shown)} |")
    lines += ["", "## Per model", "", "Suspect:index per cell; `*` marks the attack's target, bold a flag.", "",
              "| model | role | target | fraction | " + " | ".join(cells) + " |",
              "|---|---|---:|---|" + "---|" * len(cells)]  # fmt: skip
    for r in rows:
        for fraction in ("0.05", "0.01"):
            shown = [verdict_cell(r, verdict(rows, r, cell, fraction)) for cell in cells]
            lines.append(f"{model_cells(r, fraction)} {' | '.join(shown)} |")
    return lines


def report(rows: list[dict[str, Any]]) -> str:
    rows = with_mask(rows)
    forms = [f for f in ("mask", *FORMS) if all(f in r["cells"] for r in rows)]
    lines = ["# The per-class inversion in three trigger forms", "",
             f"Generated by `python benchmarks/per_class_forms.py`: {len(rows)} Fashion-MNIST small CNNs, every class "
             "inverted (the shipped settings, seed 0) as a mask and pattern (`mask`, inversion_seeds.jsonl's seed 0), "
             "one opacity over the whole image (`blend`) and one amplitude over the whole image with a value in "
             f"[-1, 1] per pixel (`additive`). {legend()}", ""]  # fmt: skip
    return "\n".join(lines + tables(rows, forms)) + "\n"


def main() -> None:
    per_model_main(__doc__, RESULTS, all_models(), measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
