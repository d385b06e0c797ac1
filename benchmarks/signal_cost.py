"""What the `mnp` signal costs against how well it ranks the backdoor units, by MNP mask epochs.

    python benchmarks/signal_cost.py [--attacks badnets blended wanet] [--epochs 20 10 5]

On the protocol's held-out Fashion-MNIST models (seed 101, 5% defense data; benchmarks/onp_vs_baselines.py
builds them into its cache), the oracle's 12 most trigger-sensitive units (activation gap; uses the
trigger, analysis only) are the positives; the signal column is scored by its ROC-AUC within `fc`,
next to the seconds it takes. Chooses onp_env.env.signals.SIGNAL_DEFAULTS["mnp"]. Writes
benchmarks/results/signal_cost.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from feature_separability import auc

from agents.expert import activation_gap
from onp_env.artifacts import write_text_atomic
from onp_env.env import NeuronPruningEnv
from onp_env.env.signals import signal_columns

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet"])
    p.add_argument("--epochs", nargs="+", type=int, default=[20, 10, 5])
    p.add_argument("--cache", type=Path, default=HERE / "runs" / "cache")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Cost and quality of the `mnp` signal by MNP mask epochs",
        "",
        "`python benchmarks/signal_cost.py`: held-out seed-101 models of benchmarks/onp_vs_baselines.py, 5% "
        "defense data; ROC-AUC within `fc` of the signal column against the oracle's 12 most trigger-sensitive "
        f"units; seconds on {args.threads} torch threads (shared 2-core CPU).",
        "",
        "| attack | mask epochs | seconds | AUC in fc |",
        "|---|---:|---:|---:|",
    ]
    for attack in args.attacks:
        found = sorted(d for d in os.listdir(args.cache) if d.startswith(f"held-out-{attack}-s101-"))
        if not found:
            raise SystemExit(f"no held-out {attack} model in {args.cache}: run benchmarks/onp_vs_baselines.py first")
        env = NeuronPruningEnv(artifacts=[str(args.cache / found[0])], features=[])
        env.reset(seed=0)
        task = env.task
        fc = task.layout.by_name["fc"]
        sl = slice(fc.offset, fc.offset + fc.size)
        positive = torch.zeros(env.num_units, dtype=torch.bool)
        positive[torch.argsort(-activation_gap(env))[:12]] = True
        x, y = task.defense
        for epochs in args.epochs:
            start = time.perf_counter()
            col = signal_columns(["mnp"], {"mnp": {"mask_epochs": epochs}}, task.source_model, task.layout, x, y)
            seconds = time.perf_counter() - start
            lines.append(f"| {attack} | {epochs} | {seconds:.1f} | {auc(col[sl, 0], positive[sl]):.2f} |")
            print(lines[-1], flush=True)
    write_text_atomic(HERE / "results" / "signal_cost.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
