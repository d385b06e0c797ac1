"""What deploying a defense costs against ANP's 2000 iterations, side by side: by default the README's `verdict`.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/deploy_cost.py [--workers 2] [--report-only] \
        [--setting "shipped agent verdict repair"]

Issue 23 asks that deploying the defense, its signals included, take at most a tenth of ANP's time on
the same model. Earlier reports compared numbers from different runs (the sweep's seconds in
verdict_repair.md, which also counted the test set's evaluation, against ANP's on the bench's models).
Here both run as `onp defend` runs them (onp_env.defend.defend_artifact: its `seconds` time the defense
alone, repair included, not the measurements around it), on the same model and the same defense images,
one torch thread each, at 1% and 5% defense data: `verdict` with the README's settings
(onp_vs_baselines.RECOMMENDED), or the onp_vs_baselines.SETTINGS entry --setting names, and ANP at its
paper's settings (sequential: `parallel` would use a second core). Which of the two runs first alternates
from cell to cell, so that a load on the shared host that drifts does not favour one.

Models: the first five sampled shadow models (configs/agent/fashion-mnist-sampled.yaml), one per attack.
The recommended `verdict` judges against a reference that includes them, and the shipped agent trained on
them, so only the seconds are this script's result; the ASR and accuracy columns show what each defense left.
One JSON line per model in benchmarks/results/deploy_cost.jsonl (resumable), then deploy_cost.md; each row
names the setting it timed. Another --setting has its own files, named by results_of:
deploy_cost_shipped_agent_verdict_repair.md times the shipped agent with verdict's repair (`onp` cells).
deploy_cost_blend_verdict.md holds the same measure of the setting recommended
before `untargeted_outranks` and `blend_reuse` (2026-12-04), deploy_cost_outranks.md that of the recommended
setting before `outrank_ceiling` existed (the untargeted look on every model), deploy_cost_reuse.md that of the
setting recommended before `repair_distill` (2026-12-05). deploy_cost_shipped_agent_verdict_repair.md timed the agent
shipped until 2026-12-05 (with MNP's signal), deploy_cost_no_mnp_agent_verdict_repair.md the one that ships since,
deploy_cost_shipped_agent_verdict_repair_sweep.md that one with `repair_sweep` (and the Evaluator's reuse of a
Linear unit layer's output, added the same day), deploy_cost_shipped_agent_verdict_repair_sweep_agent_limit.md with the
sweep's accuracy limit measured from the agent's pruned model (`sweep_limit_from: agent`)."""

from __future__ import annotations

import platform
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from onp_vs_baselines import RECOMMENDED, SETTINGS
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main, sampled_and_held_out

from onp_env.defend import defend_artifact

RESULTS = HERE / "results" / "deploy_cost.jsonl"
FRACTIONS = (0.01, 0.05)
TENTH = 0.1


def models() -> list[tuple[str, str, Any]]:
    """The first shadow model of each attack, in the zoo's order."""
    seen: set[str] = set()
    out = []
    for name, role, lab in sampled_and_held_out():
        if role == "shadow" and lab.attack is not None and lab.attack.name not in seen:
            seen.add(lab.attack.name)
            out.append((name, role, lab))
    return out


def defend(path: str, method: str, params: dict[str, Any], fraction: float) -> dict[str, Any]:
    """One `onp defend` run, its output thrown away: seconds, and ASR and accuracy of the model it returns."""
    with tempfile.TemporaryDirectory() as tmp:
        _, report = defend_artifact(path, method, {**params, "defense_fraction": fraction}, Path(tmp) / "out")
    final = report.get("finetuned") or report
    return {"seconds": report["seconds"], "acc": final["acc"], "asr": final["asr"], "before": report["before"]}


def results_of(setting: str) -> Path:
    """The results file of `setting`: deploy_cost.jsonl for the recommended one."""
    slug = re.sub(r"\W+", "_", setting)
    return RESULTS if setting == RECOMMENDED else RESULTS.with_stem(f"deploy_cost_{slug}")


def measure(name: str, role: str, path: str, setting: str = RECOMMENDED) -> dict[str, Any]:
    torch.set_num_threads(1)
    method, params = SETTINGS[setting]
    cells = []
    for i, fraction in enumerate(FRACTIONS):
        runs = [(method, lambda f=fraction: defend(path, method, params, f)),
                ("anp", lambda f=fraction: defend(path, "anp", {}, f))]  # fmt: skip
        got = dict((label, run()) for label, run in (runs if i % 2 == 0 else runs[::-1]))
        cells.append({"fraction": fraction, "first": runs[i % 2][0], **got})
    return {"model": name, "role": role, "setting": setting, "host": platform.node(), "torch": torch.__version__,
            "cells": cells}  # fmt: skip


def report(rows: Rows) -> str:
    settings = sorted({r["setting"] for r in rows})
    method = SETTINGS[settings[0]][0]  # a cell's key: the timed defense's name (each setting has its own file)
    what = "the recommended `verdict`" if settings == [RECOMMENDED] else f"`{'`, `'.join(settings)}`"
    lines = [
        f"# Deploying {what} against ANP, side by side",
        "",
        f"Generated by `python benchmarks/deploy_cost.py` from {results_of(settings[0]).name}. Seconds as `onp "
        "defend` reports them (the defense alone, the repair included), one torch thread each, on the same model "
        f"and defense images; `{method}` with the settings `{'`, `'.join(settings)}` (onp_vs_baselines.SETTINGS), "
        "ANP with its paper's 2000 iterations, sequential. Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}; torch {', '.join(sorted({r['torch'] for r in rows}))}. "
        "ASR and accuracy lost after each show what each left, not a comparison of the two: these models are "
        "shadow models (in the shipped reference `verdict` judges against, and in the shipped agent's zoo), and "
        "ANP runs at its paper's settings, not tuned for these models.",
        "",
        f"| model | defense data | {method} s | ANP s | {method} / ANP | {method} ASR % | ANP ASR % | "
        f"{method} ACC lost | ANP ACC lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    for r in rows:
        for c in r["cells"]:
            v, a = c[method], c["anp"]
            ratio = v["seconds"] / a["seconds"]
            ratios[c["fraction"]].append(ratio)
            lost = [(c[k]["before"]["acc"] - c[k]["acc"]) * 100 for k in (method, "anp")]
            lines.append(f"| {r['model']} | {c['fraction']:.0%} | {v['seconds']:.1f} | {a['seconds']:.1f} | "
                         f"{ratio:.3f} | {v['asr'] * 100:.1f} | {a['asr'] * 100:.1f} | {lost[0]:.2f} | "
                         f"{lost[1]:.2f} |")  # fmt: skip
    lines += [
        "",
        f"| defense data | models | median {method} / ANP | max | within a tenth |",
        "|---|---:|---:|---:|---:|",
    ]
    for f, rs in ratios.items():
        if rs:
            within = sum(x <= TENTH for x in rs)
            lines.append(f"| {f:.0%} | {len(rs)} | {statistics.median(rs):.3f} | {max(rs):.3f} | {within} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    setting = {"choices": sorted(SETTINGS), "default": RECOMMENDED, "help": "onp_vs_baselines.SETTINGS entry to time"}
    per_model_main(__doc__, RESULTS, models(), measure, report, option=("--setting", setting, results_of))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
