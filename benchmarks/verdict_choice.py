"""Which class each of `verdict`'s three per-class verdicts names, and which one `choose` follows.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/verdict_choice.py [--workers 2] [--report-only]

The README's `verdict` (onp_vs_baselines.SETTINGS's BEFORE_VERIFY entry) names a suspected class three ways:
NC's mask inversion, the latent shift and the whole-image blend inversion, each with a score against the
shipped reference; `choose` picks the one the sweep follows, and the untargeted look (with
`untargeted_outranks`, on every model whose class verdicts score at most `outrank_ceiling`) is followed where
it is flagged and either no mask or latent verdict is, or its index is above every class verdict's score. A
sweep and repair that follow a wrong class leave the backdoor in place, so most of what the defense gets wrong
is decided here, before the sweep and the repair (about 12 s of a 15-20 s run). Per model and defense-data
fraction (1% and 5%; the defense images and the defense's seed as the runs it explains draw them: seed 0 on a
shadow model, as verdict_repair.py does, and the model's own seed on a shift model, as `onp bench` does), this
records what `Verdict.scores` records: each verdict's suspect, anomaly index, score and per-class sizes, the one
followed, and the untargeted look (its size and index in each form; also on the models where the run does not
look, for the record: `looked` says whether it did).
The target is read only to score the verdicts.

Models: the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml; the shipped reference
summarises them, so their verdicts are in-sample) and the 12 configuration-shift models
(configs/bench/fashion-mnist-shift.yaml), trained through the lab cache. A rule for `choose` is to be
chosen on the shadow models; the shift rows are the check. One JSON line per model in
benchmarks/results/verdict_choice.jsonl (resumable); writes verdict_choice.md. `--seed N` (N > 0) runs every model,
shadow and shift, with the defense's seed N instead (its defense images and inversions), into
verdict_choice_seedN.jsonl and .md: how often the verdicts' race turns with the seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from onp_vs_baselines import BEFORE_VERIFY, SETTINGS
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main, sampled_and_held_out

from baselines.verdict import Verdict
from onp_env import load_artifact
from onp_env.bench.config import load_bench_config
from onp_env.defend import defense_subset

RESULTS = HERE / "results" / "verdict_choice.jsonl"
SHIFT = HERE.parent / "configs" / "bench" / "fashion-mnist-shift.yaml"
FRACTIONS = (0.01, 0.05)
VERDICTS = ("inversion", "latent_gap", "blend")
KEPT = ("suspect", "anomaly_index", "score", "norms")


def models() -> list[tuple[str, str, Any]]:
    shadows = [m for m in sampled_and_held_out() if m[1] == "shadow"]
    shift = [(lab.name, "shift", lab) for lab in load_bench_config(SHIFT).labs() if lab.attack is not None]
    return shadows + shift


def verdicts(defense: Verdict, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """What `defense.scores` records on `model` (as `Defense.plan` calls it), the three verdicts kept whole."""
    work, layout, _ = defense.scored(model, x, y)
    e = dict(defense.extra)
    found = {name: {k: e[name][k] for k in KEPT if k in e[name]} for name in VERDICTS}
    found["inversion"]["norms"] = e["mask_norms"]
    looked = "untargeted" in e
    if not looked:  # where a class verdict is flagged the run does not look: looked at here for the record alone
        defense.untargeted_verdict(work, layout, x, y)
    return {**found, "follows": e["follows"], "suspect": e["suspect"], "flagged": bool(e["flagged"]),
            "untargeted": defense.extra["untargeted"], "looked": looked}  # fmt: skip


def results_of(seed: int) -> Path:
    return RESULTS if seed == 0 else RESULTS.with_stem(f"verdict_choice_seed{seed}")


def measure(name: str, role: str, path: str, seed_option: int = 0) -> dict[str, Any]:
    torch.set_num_threads(1)
    art = load_artifact(path)
    attack = art.manifest["attack"]
    method, params = SETTINGS[BEFORE_VERIFY]
    assert method == "verdict"
    # as the runs this dump explains draw them: verdict_repair.py's with seed 0, a bench cell's with its model's seed
    seed = seed_option or (art.manifest["config"]["seed"] if role == "shift" else 0)
    cells = []
    for fraction in FRACTIONS:
        x, y = defense_subset(art, fraction, seed)
        cells.append({"fraction": fraction, **verdicts(Verdict(seed=seed, **params), art.model, x, y)})
    return {"model": name, "role": role, "attack": attack["name"], "mode": attack["mode"],
            "target": attack["target"], "cells": cells, **({"seed": seed} if seed_option else {})}  # fmt: skip


def right(row: dict[str, Any], cell: dict[str, Any], name: str) -> bool:
    suspect = cell["suspect"] if name == "followed" else cell[name]["suspect"]
    return row["mode"] == "all-to-one" and suspect == row["target"]


def report(rows: Rows) -> str:
    seed = rows[0].get("seed", 0)
    lines = [
        "# Which class `verdict`'s per-class verdicts name" + (f": the defense's seed {seed}" if seed else ""),
        "",
        f"Generated by `python benchmarks/verdict_choice.py{f' --seed {seed}' if seed else ''}` from "
        f"{results_of(seed).name}. Per model and defense-data "
        "fraction, the suspect of NC's mask inversion (`mask`), the latent shift (`latent`) and the whole-image "
        "blend inversion (`blend`), each with its score against the shipped reference (the anomaly index; "
        "flagged above 2), and the verdict `choose` follows (`followed`; `untargeted` where the untargeted "
        f"look flagged a trigger). Settings: `{BEFORE_VERIFY}` (onp_vs_baselines.py). Names: the suspect is the "
        "all-to-one target. The shadow models are in the shipped reference (in-sample).",
        "",
    ]
    for role in dict.fromkeys(r["role"] for r in rows):
        group = [r for r in rows if r["role"] == role and r["mode"] == "all-to-one"]
        lines += [f"## {role} models: how many verdicts name the target ({len(group)} all-to-one)", "",
                  "| defense data | mask names | latent names | blend names | followed names |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        for i, fraction in enumerate(FRACTIONS):
            counts = [sum(right(r, r["cells"][i], name) for r in group) for name in (*VERDICTS, "followed")]
            lines.append(f"| {fraction:.0%} | " + " | ".join(str(c) for c in counts) + " |")
        lines.append("")
    lines += ["## Every model", "", "`untargeted`: the larger of the untargeted trigger's two indices (mask and blend "
              "forms; flagged above 2), in brackets where the run did not look.", "",
              "| model | target | data | mask | latent | blend | untargeted | followed |",
              "|---|---:|---:|---|---|---|---:|---|"]  # fmt: skip
    for r in rows:
        target = r["target"] if r["mode"] == "all-to-one" else "all-to-all"
        for c in r["cells"]:
            shown = [f"{c[n]['suspect']} ({c[n]['score']:.2f})" for n in VERDICTS]
            followed = "untargeted" if c["follows"] == "untargeted" else f"{c['follows']}: {c['suspect']}"
            mark = "" if r["mode"] != "all-to-one" or c["follows"] == "untargeted" else (
                " ✓" if c["suspect"] == r["target"] else " ✗")  # fmt: skip
            flagged = "" if c["flagged"] else " (not flagged)"
            index = max(v["anomaly_index"] for v in c["untargeted"].values())
            look = f"{index:.2f}" if c["looked"] else f"({index:.2f})"
            lines.append(f"| {r['model']} | {target} | {c['fraction']:.0%} | {' | '.join(shown)} | {look} | "
                         f"{followed}{mark}{flagged} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    seed = {"type": int, "default": 0, "help": "the defense's seed on every model (0: as the runs it explains)"}
    per_model_main(__doc__, RESULTS, models(), measure, report, option=("--seed", seed, results_of))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
