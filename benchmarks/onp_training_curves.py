"""Training curves of the protocol's agents (benchmarks/onp_vs_baselines.py): PPO's mean episode
reward against steps, per held-out attack and variant, and the behaviour-cloning loss.

    python benchmarks/onp_training_curves.py [--runs benchmarks/runs/onp]

Reads each run folder's logs/progress.csv (SB3's CSV logger) and imitation.json; writes
benchmarks/results/onp_training.png and onp_training.md."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from onp_env.artifacts import write_text_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
PLOTTED = {"onp": "-", "imitation-target-next": "--"}  # run folder -> line style


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "onp")
    args = p.parse_args()
    runs = sorted(d for d in args.runs.glob("without-*/*") if (d / "logs" / "progress.csv").is_file())
    if not runs:
        raise SystemExit(f"no agent runs under {args.runs}: run benchmarks/onp_vs_baselines.py first")
    folds = {d.parent.name.removeprefix("without-") for d in runs}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    lines = ["# Training curves of the protocol's agents", "",
             "`python benchmarks/onp_training_curves.py`: per held-out attack (the agent never saw it) and variant; "
             "reward = the oracle reward on shadow models (onp_env.env: Δ accuracy + drop in triggered ASR - unit "
             "cost). The plot shows each fold's `onp` agent (solid) and `imitation-target-next` (dashed); the table "
             "lists every run. ![curves](onp_training.png)", "",
             "| run | PPO steps | first ep. reward | last ep. reward | last ep. length | BC samples | BC loss |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for run in runs:
        with open(run / "logs" / "progress.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("rollout/ep_rew_mean")]
        if not rows:
            continue
        name = f"{run.parent.name.removeprefix('without-')}/{run.name}"
        steps = [int(r["time/total_timesteps"]) for r in rows]
        reward = [float(r["rollout/ep_rew_mean"]) for r in rows]
        bc = json.loads((run / "imitation.json").read_text()) if (run / "imitation.json").is_file() else None
        if run.name in PLOTTED:  # every fold's agent and its earlier default; the ablations stay in the table
            fold = run.parent.name.removeprefix("without-")
            style = {"color": f"C{sorted(folds).index(fold)}", "linestyle": PLOTTED[run.name], "label": name}
            ax.plot(steps, reward, **style)
            if bc:
                bx.plot(range(1, len(bc["losses"]) + 1), bc["losses"], **style)
        loss = f"{bc['losses'][0]:.2f} → {bc['losses'][-1]:.2f}" if bc else ""
        length = float(rows[-1]["rollout/ep_len_mean"])
        samples = bc["samples"] if bc else ""
        first, last = reward[0], reward[-1]
        lines.append(f"| {name} | {steps[-1]} | {first:.3f} | {last:.3f} | {length:.1f} | {samples} | {loss} |")
    ax.set(xlabel="PPO steps", ylabel="mean episode reward (shadow models)", title="PPO")
    bx.set(xlabel="epoch", ylabel="cross-entropy", title="behaviour cloning of the oracle expert")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(HERE / "results" / "onp_training.png", dpi=110, bbox_inches="tight")
    write_text_atomic(HERE / "results" / "onp_training.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
