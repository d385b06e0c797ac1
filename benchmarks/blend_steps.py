"""Does `verdict`'s blend verdict need the inversion's 150 steps, or does it name the same targets with fewer?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/blend_steps.py [--workers 2] [--report-only]

With 5% defense data the agent's pipeline (onp_vs_baselines's `shipped agent verdict repair sweep agent limit lr 3
epochs`) takes about 0.103 of one ANP run on the same model (deploy_cost_agent_repairs_at_5.md), above the issue's
tenth; two ten-class inversions are 11 s of its 17-20 s (deploy_profile.py): the mask inversion, which the agent's
signal reads too, and `blend_verdict`'s inversion of every class as a whole-image blend, which only `verdict` reads.
The blend inversion ran its 150 steps on 94 of 102 model-fractions of per_class_forms.jsonl: its early stop (no best
size shrinking by 1% in 60 steps) almost never comes first, so a cap on its steps is a saving of its own.

This inverts every class as a blend (onp_env.signals.trigger_inversion.invert, the shipped settings but `steps`, seed
0) with each of STEPS on the models of untargeted_inversion.py: the 30 sampled shadow models, the 9 clean held-out
models and the 12 configuration-shift models, per defense fraction (5%: the whole defense set; 1%: its stratified
fifth, seed 0). Each step cap's sizes are judged as per_class_forms.py judges a form's: NC's anomaly index against each
class's median size at that cap over the shadow models at 5% (own target and own model left out). The attack is read
only to label and score rows. One JSON line per model (resumable); writes blend_steps.md.

The rule, fixed before the run (RULE): the fewest steps that, at both fractions, name the target of at least as many
shadow all-to-one models as 150 steps less one, and flag no more clean models than 150 steps. The shift models are
reported, not read by the rule.

Measured (2026-12-05, blend_steps.md): the rule keeps 150 steps. 100 steps (3.7 s against 5.5 s) name as many shadow
targets but flag 4 of 9 clean models at 5% against 2; 75 and 50 name fewer at 5% (23 and 24 of 26 against 25) and flag
more clean models. The verdicts move from cap to cap on the shift models too (5%: 10, 8, 8, 6 of 10 targets named).
No cap on the blend inversion was added to `verdict`."""

from __future__ import annotations

import time
from typing import Any

from per_class_forms import tables, verdict
from rows import exit_2_on_bad_input
from signal_models import HERE, per_model_main
from untargeted_inversion import FRACTIONS, LINE
from untargeted_inversion import models as all_models

RESULTS = HERE / "results" / "blend_steps.jsonl"
STEPS = (150, 100, 75, 50)
RULE = ("fewest steps that, at both fractions, name the target of at least as many shadow all-to-one models as 150 "
        "steps less one and flag no more clean models than 150 steps")  # fmt: skip


VARIANTS = {f"blend@{steps}": ("blend", {"steps": steps}) for steps in STEPS}
"""Cell name -> (form, the inversion's settings that differ from the shipped ones)."""


def form(steps: int) -> str:
    return f"blend@{steps}"


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
    return measure_variants(name, role, path, VARIANTS)


def tally(rows: list[dict[str, Any]], cell: str, fraction: str) -> tuple[int, int]:
    """(shadow all-to-one models whose target the cell's verdict names, clean models it flags)."""
    named = sum(verdict(rows, r, cell, fraction)[0] == r["target"] for r in rows
                if r["role"] == "shadow" and r["mode"] == "all-to-one")  # fmt: skip
    flagged = sum(verdict(rows, r, cell, fraction)[1] > LINE for r in rows if r["role"] == "clean")
    return named, flagged


def chosen(rows: list[dict[str, Any]]) -> int:
    """RULE's step cap."""
    base = {f: tally(rows, form(STEPS[0]), f) for f in ("0.05", "0.01")}
    fits = [s for s in STEPS if all(tally(rows, form(s), f)[0] >= base[f][0] - 1
                                    and tally(rows, form(s), f)[1] <= base[f][1] for f in base)]  # fmt: skip
    return min(fits)


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["# The blend verdict's inversion with fewer steps", "",
             f"Generated by `python benchmarks/blend_steps.py`: {len(rows)} Fashion-MNIST small CNNs, every class "
             "inverted as a whole-image blend (the shipped settings, seed 0) with at most "
             f"{', '.join(map(str, STEPS))} steps. Index: NC's anomaly index of log(size / reference), the "
             "reference each class's median at the same cap over the shadow models at 5% (own target and own model "
             f"left out). Flagged: index above {LINE:g}; target named: the suspect is the attack's target (all-to-one "
             "models, flagged or not); detection ROC-AUC: the top index, clean models against that group. Seconds: "
             "one inversion of ten classes, one thread (median).", "",
             f"Rule (fixed before the run): the {RULE}: **{chosen(rows)} steps**.", ""]  # fmt: skip
    return "\n".join(lines + tables(rows, list(VARIANTS))) + "\n"


def main() -> None:
    per_model_main(__doc__, RESULTS, all_models(), measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
