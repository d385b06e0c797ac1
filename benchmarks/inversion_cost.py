"""What the `inversion` signal costs against how well it finds the oracle's units, by its settings.

    python benchmarks/inversion_cost.py [--seeds 101 102] [--workers 2]

On the held-out Fashion-MNIST models of benchmarks/signal_models.py (one per attack and seed), each
setting of (images, batch per class, steps) is timed on one torch thread and scored like
benchmarks/feature_separability.py: ROC-AUC of the raw per-unit gap against the oracle's 12 units
over all units, whether the suspected class is the target, and its anomaly index. Chooses the
defaults of onp_env.signals.trigger_inversion.InversionParams. Writes
benchmarks/results/inversion_cost.md."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS = [
    {"images": 256, "batch_size": 64, "steps": 300},
    {"images": 128, "batch_size": 32, "steps": 300},
    {"images": 128, "batch_size": 32, "steps": 150},
    {"images": 64, "batch_size": 16, "steps": 150},
]


def one(path: str, attack: str, target: int, settings: dict[str, int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from feature_separability import auc, oracle_positives

    from onp_env import load_artifact
    from onp_env.graph.units import find_units
    from onp_env.signals import TriggerInversion

    art = load_artifact(path)
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    positive = oracle_positives(art, layout, x, y, 12)
    start = time.perf_counter()
    result = TriggerInversion(**settings).compute(art.model, layout, x, y)
    return {"attack": attack, "settings": settings, "seconds": time.perf_counter() - start,
            "auc": auc(result.units, positive), "right": int(result.globals["suspect"]) == target,
            "index": result.globals["anomaly_index"], "steps": result.details["steps"]}  # fmt: skip


def main() -> None:
    from signal_models import CACHE, held_out

    from onp_env import build_artifact
    from onp_env.artifacts import write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    labs = [lab for lab in held_out() if lab.attack is not None and lab.seed in args.seeds]
    jobs = [(str(build_artifact(lab, CACHE, progress=False)), lab.attack.name, lab.attack.target, s)
            for lab in labs for s in SETTINGS]  # fmt: skip
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(one, *zip(*jobs, strict=True)))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = [
        "# Cost and quality of the `inversion` signal by its settings",
        "",
        f"`python benchmarks/inversion_cost.py`: held-out models of benchmarks/signal_models.py (seeds "
        f"{', '.join(map(str, args.seeds))}; one per attack and seed), 5% defense data, one torch thread on the "
        "shared 2-core machine, two jobs side by side. AUC: the raw per-unit gap against the oracle's 12 "
        "units, over all units; `right`: models whose suspected class is the target; `steps`: where early "
        "stopping ended.",
        "",
        "| images | batch per class | max steps | seconds | steps | "
        + " | ".join(f"AUC {a}" for a in attacks)
        + " | right | anomaly index |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(attacks) + "---:|---:|",
    ]
    for s in SETTINGS:
        rs = [r for r in rows if r["settings"] == s]
        aucs = [statistics.fmean(r["auc"] for r in rs if r["attack"] == a) for a in attacks]
        secs, steps = statistics.fmean(r["seconds"] for r in rs), statistics.fmean(r["steps"] for r in rs)
        right, index = sum(r["right"] for r in rs), statistics.fmean(r["index"] for r in rs)
        cols = [s["images"], s["batch_size"], s["steps"], f"{secs:.1f}", f"{steps:.0f}", *(f"{v:.2f}" for v in aucs)]
        lines.append("| " + " | ".join(map(str, cols)) + f" | {right} of {len(rs)} | {index:.2f} |")
    write_text_atomic(HERE / "results" / "inversion_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
