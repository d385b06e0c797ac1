"""The benchmark's figures (matplotlib, PNG, readable without the text): ASR and ACC against pruned
units per defense (one panel per attack), DER per defense and attack, seconds per defense (log)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from onp_env.bench.config import attack_key  # noqa: E402
from onp_env.bench.report import FINE_TUNED  # noqa: E402


def _attack(r: dict[str, Any]) -> str:
    return f"{attack_key(r['config']['attack'])}\n{r['config']['data']['name']}, {r['config']['model']['name']}"


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def write_plots(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """The three figures of the largest defense fraction; returns their file names."""
    fraction = max(r["fraction"] for r in rows)
    rows = [r for r in rows if r["fraction"] == fraction]
    attacks = sorted({_attack(r) for r in rows})
    # a fine-tuned model beside its defense, in the light shade of its colour
    bases = list(dict.fromkeys(r["defense"].removesuffix(FINE_TUNED) for r in rows))
    labels = {r["defense"] for r in rows}
    shade = {d: 2 * bases.index(d.removesuffix(FINE_TUNED)) + d.endswith(FINE_TUNED) for d in labels}
    defenses = sorted(shade, key=shade.__getitem__)
    colours = {d: plt.get_cmap("tab20")(shade[d] % 20) for d in defenses}
    # past ten defenses the colours come round again: a marker and a hatch of their own tell those apart
    markers = {d: "os^Dv"[shade[d] // 20 % 5] for d in defenses}
    hatches = {d: ["", "//", "..", "xx", "\\\\"][shade[d] // 20 % 5] for d in defenses}
    names = []

    fig, axes = plt.subplots(2, len(attacks), figsize=(3.6 * len(attacks), 6.4), squeeze=False, sharey="row")
    for j, attack in enumerate(attacks):
        for d in defenses:
            sel = [r for r in rows if r["defense"] == d and _attack(r) == attack]
            x = [r["pruned"] for r in sel]
            axes[0, j].scatter(x, [100 * r["asr"] for r in sel], color=colours[d], marker=markers[d], label=d, s=28)
            axes[1, j].scatter(x, [100 * r["acc"] for r in sel], color=colours[d], marker=markers[d], s=28)
        axes[0, j].set_title(attack, fontsize=9)
        axes[1, j].set_xlabel("pruned units")
    axes[0, 0].set_ylabel("ASR after, % (lower is better)")
    axes[1, 0].set_ylabel("clean ACC after, %")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=min(len(defenses), 6),
               bbox_to_anchor=(0.5, 1.06), fontsize=8)  # fmt: skip
    names.append(_save(fig, folder / "asr_acc_vs_pruned.png"))

    # at least 2.2 inches a group: a label such as "fashion-mnist, small_cnn" must not reach its neighbour's
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(attacks), 1.1 * len(attacks) * len(defenses) / 3), 3.8))
    width = 0.8 / len(defenses)
    for i, d in enumerate(defenses):
        means, errs = [], []
        for attack in attacks:
            v = [100 * r["der"] for r in rows if r["defense"] == d and _attack(r) == attack and r["der"] is not None]
            means.append(statistics.mean(v) if v else float("nan"))  # missing: no bar, not a zero
            errs.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        ax.bar([k + i * width for k in range(len(attacks))], means, width, yerr=errs, color=colours[d], label=d,
               hatch=hatches[d], edgecolor="white" if hatches[d] else None)  # fmt: skip
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(attacks))], attacks, fontsize=8)
    ax.set_ylabel("DER, % (50 = no effect)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # beside the bars, never over them
    ax.set_title(f"DER per defense and attack ({fraction * 100:g}% defense data)")
    names.append(_save(fig, folder / "der.png"))

    fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(defenses) + 1.2))
    for i, d in enumerate(defenses):
        secs = [max(r["seconds"], 1e-3) for r in rows if r["defense"] == d]
        ax.scatter(secs, [i] * len(secs), color=colours[d], marker=markers[d], s=28)
        ax.plot([statistics.median(secs)] * 2, [i - 0.3, i + 0.3], color="black", lw=1.5)
    ax.set_xscale("log")
    ax.set_yticks(range(len(defenses)), defenses)
    ax.set_xlabel("seconds to defend (log; bar = median)")
    ax.invert_yaxis()
    names.append(_save(fig, folder / "seconds.png"))
    return names
