"""Every baseline defense on every Fashion-MNIST attack model of the lab, with 1% and 5% of the
training split as defense data, at each method's paper defaults.

    python benchmarks/baseline_defenses.py [--methods ...] [--attacks ...] [--fractions 0.01 0.05]

Resumable: each cell writes its defended artifact and report.json under --runs and is skipped when
that report exists. Writes benchmarks/results/baselines.md and baselines.jsonl (one report a cell).
The defenses see only the defense set; the test split and trigger are used for reporting only."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from rows import exit_2_on_bad_input, read_report

from baselines import DEFENSES
from onp_env import build_artifact, load_config
from onp_env.artifacts import write_text_atomic
from onp_env.config import LabConfig
from onp_env.defend import defend_artifact

HERE = Path(__file__).resolve().parent

ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def cell(dataset: str, attack: str, method: str, fraction: float, runs: Path) -> dict:
    out = runs / dataset / attack / f"{fraction:g}" / method
    if (out / "report.json").is_file():
        return read_report(out / "report.json")
    art = build_artifact(load_config(LabConfig, HERE.parent / "configs" / "attack" / f"{attack}-{dataset}.yaml"))
    _, report = defend_artifact(art, method, {"defense_fraction": fraction}, out)
    return report


def table(reports: list[dict]) -> list[str]:
    rows = ["| attack | defense data | method | pruned | ACC % | ASR % | RA % | DER | seconds |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    last = None
    for r in reports:
        key = (r["attack"], r["fraction"])
        if key != last:
            b = r["before"]
            rows.append(f"| **{r['attack']}** | {r['fraction']:.0%} ({r['defense_images']} images) | *none* | 0 "
                        f"| {pct(b['acc'])} | {pct(b['asr'])} | {pct(b['ra'])} | | |")  # fmt: skip
            last = key
        der = "n/a" if r["der"] is None else f"{r['der']:.3f}"
        rows.append(f"| | | {r['method']} | {r['pruned']} | {pct(r['acc'])} | {pct(r['asr'])} | {pct(r['ra'])} "
                    f"| {der} | {r['seconds']:.1f} |")  # fmt: skip
        if "finetuned" in r:
            f = r["finetuned"]
            rows.append(f"| | | {r['method']} + fine-tune | {r['pruned']} | {pct(f['acc'])} | {pct(f['asr'])} "
                        f"| {pct(f['ra'])} | {f['der']:.3f} | |")  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--methods", nargs="+", default=list(DEFENSES))
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "baselines")
    p.add_argument("--results", type=Path, default=HERE / "results" / "baselines.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reports = []
    for attack in args.attacks:
        for fraction in args.fractions:
            for method in args.methods:
                r = cell(args.dataset, attack, method, fraction, args.runs)
                reports.append({**r, "attack": attack, "fraction": fraction})
                print(f"{attack} {fraction:g} {method}: ACC {pct(r['acc'])} ASR {pct(r['asr'])} "
                      f"pruned {r['pruned']} in {r['seconds']:.1f} s", flush=True)  # fmt: skip
    lines = [
        f"# Baseline defenses on {args.dataset}",
        "",
        "`python benchmarks/baseline_defenses.py`: each method at its paper's defaults (see its module docstring for "
        "every departure), on the small-CNN models of `benchmarks/results/attacks.md`, with the given share of "
        "the training split as clean defense data (a stratified part of the artifact's 5% defense set). "
        "ACC/ASR/RA on the test split, reported only; DER = (max(0, ASR drop) - max(0, ACC drop) + 1) / 2. "
        "Mask semantics: zero for every method. Seconds: wall clock of the defense alone, "
        f"{args.threads} torch thread(s), {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        *table(reports),
        "",
    ]
    write_text_atomic(args.results, "\n".join(lines))
    write_text_atomic(args.results.with_suffix(".jsonl"), "\n".join(json.dumps(r) for r in reports) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
