"""Measure every attack on digits and Fashion-MNIST: clean ACC, ASR, RA and training seconds of
the models built from configs/attack/, against the clean model trained the same way.

    python benchmarks/attacks.py [--datasets digits fashion-mnist] [--out DIR]

Writes benchmarks/results/attacks.md. Artifacts are cached (a rerun trains nothing new)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from onp_env import build_artifact, load_artifact, load_config
from onp_env.artifacts import write_text_atomic
from onp_env.config import LabConfig

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "attack"
ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")
# The bar per dataset: (min ASR for SIG, min ASR for the others, ACC rule).
BARS = {"digits": (None, 0.90), "fashion-mnist": (0.70, 0.95)}


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def run(datasets: list[str], out: Path | None) -> str:
    lines = [
        "# Attacks: backdoored small CNNs",
        "",
        "Built from `configs/attack/*.yaml` by `python benchmarks/attacks.py`. ACC on the clean test "
        "split; ASR and RA on triggered test images whose true label is not the target; "
        "ΔACC = ACC minus the clean model's ACC (same architecture, data and training). Seconds: "
        "wall-clock training on this machine (TrojanNN includes its clean reference model and the "
        "trigger optimisation).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
    ]
    for ds in datasets:
        clean = load_artifact(build_artifact(load_config(LabConfig, CONFIGS / f"clean-{ds}.yaml"), out))
        sig_bar, bar = BARS.get(ds, (None, None))
        notes: list[str] = []
        lines += [
            f"## {ds}",
            "",
            "| attack | ACC % | ΔACC | ASR % | RA % | train s | bar |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| none (clean) | {pct(clean.metrics['acc'])} | | | | {clean.manifest['training']['seconds']:.1f} | |",
        ]
        for name in ATTACKS:
            art = load_artifact(build_artifact(load_config(LabConfig, CONFIGS / f"{name}-{ds}.yaml"), out))
            m = art.metrics
            need = sig_bar if name == "sig" else bar
            verdict = "" if need is None else ("met" if m["asr"] >= need else "MISSED") + f" (ASR >= {100 * need:.0f}%)"
            lines.append(
                f"| {name} | {pct(m['acc'])} | {100 * (m['acc'] - clean.metrics['acc']):+.2f} | {pct(m['asr'])} "
                f"| {pct(m['ra'])} | {art.manifest['training']['seconds']:.1f} | {verdict} |"
            )
            prep = art.manifest["attack"]["preparation"]
            if prep:
                before, after = prep["activation_clean"], prep["activation_triggered"]
                notes.append(
                    f"TrojanNN on {ds}: the optimised trigger raises the mean pre-activation of {prep['layer']} "
                    f"neuron(s) {prep['neurons']} from {before:.2f} to {after:.2f} on training images."
                )
        lines += ["", *notes, ""] if notes else [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    p.add_argument("--out", type=Path, default=None, help="artifact cache (default: the onp cache)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "attacks.md")
    args = p.parse_args()
    text = run(args.datasets, args.out)
    write_text_atomic(args.results, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
