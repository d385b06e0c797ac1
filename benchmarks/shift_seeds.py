"""How much the configuration-shift set's means move with the defense's seed alone.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/shift_seeds.py [--workers 2] [--report-only] \
        [--repair-layout default|channels-last]

`onp bench` runs each cell once, with the model's seed as the defense's, and the README's target table reads the
shift set's means from those cells: the agent's command at 1% leaves 5.1% mean ASR, 0.1 above the target. The seed
draws the defense images from the held-out split, the inversions' images and starts, and the repair's stamped images,
and on these twelve models it decides races between verdicts (which class the sweep and the repair follow). Here
each model of configs/bench/fashion-mnist-shift.yaml (the cache's build, the one the table's cells measured) is
defended by the table's two commands (METHODS: the agent's, with its repair's epochs per fraction, and the
recommended `verdict`) with the model's seed and with SEEDS, at 1% and 5%. Nothing is chosen here. One torch thread
per worker; the runs of one model share one process and its memoised inversions, so their seconds are not compared.
One JSON line per model in shift_seeds.jsonl (resumable), then shift_seeds.md. The rows of 2026-12-06 lack the
pruned model's ACC and ASR (`pruned_model`) and record no `follows` or `suspect` for `verdict` (null).
`--repair-layout` pins the repair's layout on the CPU (nc.REPAIR_LAYOUT): `default`, as shift_seeds.jsonl recorded it
(the default until 2026-12-06), or `channels-last`, as it ships since, in shift_seeds_repair_channels_last.jsonl."""

from __future__ import annotations

import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main

from baselines import nc
from onp_env.bench.config import load_bench_config
from onp_env.defend import defend_artifact

RESULTS = HERE / "results" / "shift_seeds.jsonl"
CONFIGS = HERE.parent / "configs" / "bench"
SEEDS = (1, 2)
"""Besides the model's own seed (the bench cell's)."""
FRACTIONS = (0.01, 0.05)


def _params(config: str) -> tuple[str, dict[str, Any]]:
    spec = load_bench_config(CONFIGS / config).defenses[0]
    return spec["name"], spec["params"]


METHODS = {
    "agent's command": {0.01: _params("fashion-mnist-shift-onp-repair-epochs-high.yaml"),
                        0.05: _params("fashion-mnist-shift-onp-repair-epochs.yaml")},
    "verdict": {f: _params("fashion-mnist-shift-distill.yaml") for f in FRACTIONS},
}  # fmt: skip
"""Per method and fraction, the registered defense and its parameters, as the bench configs the table cites hold."""


def models() -> list[tuple[str, str, Any]]:
    return [(lab.name, "shift", lab) for lab in load_bench_config(CONFIGS / "fashion-mnist-shift.yaml").labs()]


def defended_cells(path: str, methods: dict[str, dict[float, tuple[Any, ...]]], own: int,
                   extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Each method at each fraction with the bench's or protocol's own seed `own` and SEEDS (`extra` added to every
    run's parameters): the cells of one model. A method's entry per fraction is (defense, parameters) or (defense,
    parameters, preset), the preset resolved for the defense set as `onp defend --preset` resolves it; a run where the
    agent's units were given back records them (`given_back`)."""
    cells = []
    for method, per_fraction in methods.items():
        for fraction, (defense, params, *preset) in per_fraction.items():
            for seed in (own, *SEEDS):
                with tempfile.TemporaryDirectory() as tmp:
                    run = {**params, **(extra or {}), "defense_fraction": fraction, "seed": seed}
                    _, r = defend_artifact(path, defense, run, Path(tmp) / "out", preset=next(iter(preset), None))
                d = r["details"]
                verdicts = d if "follows" in d else d.get("repair", {})  # verdict's own, or the agent's repair's
                cells.append({"method": method, "fraction": fraction, "seed": seed, "model_seed": seed == own,
                              "before": r["before"], "pruned_model": {k: r[k] for k in ("acc", "asr")},
                              "finetuned": r["finetuned"], "pruned": r["pruned"], "follows": verdicts.get("follows"),
                              "suspect": verdicts.get("suspect"),
                              **({"given_back": d["given_back"]} if "given_back" in d else {})})  # fmt: skip
    return cells


REPAIR_LAYOUTS = {"default": (torch.contiguous_format, RESULTS), "channels-last": (
    torch.channels_last, RESULTS.with_name("shift_seeds_repair_channels_last.jsonl"))}  # fmt: skip
"""--repair-layout: the repair's layout on the CPU, and the results file of its rows."""


def measure(name: str, role: str, path: str, layout: str = "default") -> dict[str, Any]:
    torch.set_num_threads(1)
    nc.REPAIR_LAYOUT = REPAIR_LAYOUTS[layout][0]
    cells = defended_cells(path, METHODS, int(name.rsplit("-s", 1)[1]))
    return {"model": name, "role": role, "host": platform.node(), "torch": torch.__version__,
            **({} if layout == "default" else {"repair_layout": layout}), "cells": cells}  # fmt: skip


def _lost(c: dict[str, Any]) -> float:
    return 100 * (c["before"]["acc"] - c["finetuned"]["acc"])


def finetuned_means(cells: list[dict[str, Any]]) -> tuple[float, float, float, int]:
    """Mean DER, ASR (%) and points lost after the repair, and the runs within the target."""
    der = statistics.mean(100 * c["finetuned"]["der"] for c in cells)
    asr = statistics.mean(100 * c["finetuned"]["asr"] for c in cells)
    within = sum(100 * c["finetuned"]["asr"] <= 5 and _lost(c) <= 2 for c in cells)
    return der, asr, statistics.mean(_lost(c) for c in cells), within


def seeds_report(rows: Rows, methods: dict[str, Any], head: list[str], own: str) -> str:
    """The means per method, fraction and seed (`own`: the label of the bench's or protocol's own seed), then each
    model's ASR left with each seed, under `head`."""
    cells = [c for r in rows for c in r["cells"]]
    lines = [*head, "", "| method | data | seed | DER | ASR | lost | within |", "|---|---:|---|---:|---:|---:|---:|"]
    fractions = sorted({c["fraction"] for c in cells})
    for method in methods:
        for fraction in fractions:
            mine = [c for c in cells if c["method"] == method and c["fraction"] == fraction]
            for label, pick in ((own, lambda c: c["model_seed"]),
                                *((str(s), lambda c, s=s: not c["model_seed"] and c["seed"] == s) for s in SEEDS),
                                ("all three", lambda c: True)):  # fmt: skip
                chosen = [c for c in mine if pick(c)]
                if chosen:
                    der, asr, lost, within = finetuned_means(chosen)
                    lines.append(f"| {method} | {fraction:.0%} | {label} | {der:.1f} | {asr:.1f} | {lost:.2f} | "
                                 f"{within} of {len(chosen)} |")  # fmt: skip
    lines += ["", f"Per model, ASR left after the repair with each seed ({own}, then {', '.join(map(str, SEEDS))}), %:",
              "", "| model | " + " | ".join(f"{m} {f:.0%}" for m in methods for f in fractions) + " |",
              "|---|" + "---|" * (len(methods) * len(fractions))]  # fmt: skip
    for r in rows:
        by: dict[tuple[str, float], list[str]] = {}
        for c in sorted(r["cells"], key=lambda c: not c["model_seed"]):
            by.setdefault((c["method"], c["fraction"]), []).append(f"{100 * c['finetuned']['asr']:.1f}")
        seeds = [" / ".join(by.get((m, f), [])) for m in methods for f in fractions]
        lines.append(f"| {r['model'].split('small_cnn-', 1)[-1]} | " + " | ".join(seeds) + " |")
    return "\n".join(lines) + "\n"


def report(rows: Rows) -> str:
    layout = rows[0].get("repair_layout", "default") if rows else "default"
    head = [
        "# The configuration-shift set with three defense seeds",
        "",
        f"Generated by `python benchmarks/shift_seeds.py{'' if layout == 'default' else ' --repair-layout ' + layout}` "
        f"from {REPAIR_LAYOUTS[layout][1].name}: {len(rows)} models of "
        "configs/bench/fashion-mnist-shift.yaml, each defended by the README target table's two commands with the "
        f"model's seed (the bench cell's: `model`) and seeds {', '.join(map(str, SEEDS))}. Mean DER / ASR left / "
        "points lost after the repair, and the models within the target (ASR <= 5%, <= 2 points lost). Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}.",
    ]
    return seeds_report(rows, METHODS, head, "model")


if __name__ == "__main__":
    option = ("--repair-layout", {"choices": list(REPAIR_LAYOUTS), "default": "default",
                                  "help": "the repair's layout on the CPU, and so the results file"},
              lambda layout: REPAIR_LAYOUTS[layout][1])  # fmt: skip
    exit_2_on_bad_input(lambda: per_model_main(__doc__, RESULTS, models(), measure, report, option=option))
