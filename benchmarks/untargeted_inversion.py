"""Does an untargeted trigger inversion flag the all-to-all backdoors that Neural Cleanse's per-class
inversion misses, without flagging clean models?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/untargeted_inversion.py [--workers 2] [--report-only]

An all-to-all backdoor sends each class to another with one trigger, so each target class is reached
from one source only and no class's mask is an outlier. onp_env.signals.trigger_inversion.
invert_untargeted looks instead for one small trigger that sends the images to any class but their
own, in three forms: a mask and pattern as Neural Cleanse's (`mask`), one opacity over the whole
image (`blend`, its size the opacity times the pixels, as a blended trigger's) and one amplitude over
the whole image with a free value in [-1, 1] per pixel (`additive`, as SIG's sinusoid is added; measured after the
first two, it sits under each row's `cells`).

Models: the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml's zoo, four of them
all-to-all), the 9 clean held-out models of detect_shipped.py and the 12 configuration-shift models
(configs/bench/fashion-mnist-shift.yaml, two all-to-all Blended). Per model and defense fraction (5%:
the whole defense set; 1%: its stratified fifth, seed 0): the untargeted sizes, and the per-class
verdicts `verdict` reads today (the inversion's and the latent shift's largest anomaly index against
the shipped reference fashion-mnist). An untargeted size is judged as NC judges a class's, but
across models: its anomaly index is (median - log size) / (1.4826 MAD) of the log sizes on the
shadow models at 5% (each shadow model left out of its own). The attack is read only to label rows.

On the clean and all-to-all models, also the README's recommended `verdict` command (DEFENDED:
with `untargeted=true`, with `repair_blend=true` added, with `blend_verdict=true` too, and with
`untargeted_outranks`, `blend_reuse` and `repair_distill=0.5` too) as a user runs
it: its false alarms and what it does with an all-to-all backdoor. One JSON line per model in
benchmarks/results/untargeted_inversion.jsonl (resumable); writes untargeted_inversion.md."""

from __future__ import annotations

import time
from typing import Any

from detect_shipped import models as detect_models
from onp_vs_baselines import SETTINGS
from rows import exit_2_on_bad_input
from signal_models import HERE, per_model_main, sampled_and_held_out

from onp_env.bench.config import load_bench_config
from onp_env.config import LabConfig

RESULTS = HERE / "results" / "untargeted_inversion.jsonl"
SHIFT = HERE.parent / "configs" / "bench" / "fashion-mnist-shift.yaml"
FRACTIONS = (0.05, 0.01)
FORMS = ("mask", "blend", "additive")
LATER = ("additive",)
"""Forms measured after the rows were written: under row["cells"][form][fraction]."""
REFERENCE = "fashion-mnist"
LINE = 2.0
"""NC's anomaly-index line, for the untargeted index as for a class's."""
_UNTARGETED = {"reference_from": "fashion-mnist", "inversion_first": True, "stop_asr": 0.0, "repair_epochs": 5,
               "unlearn": 0.5, "untargeted": True}  # fmt: skip
_REUSE = "verdict shipped repair untargeted blend verdict outranks reuse"
_DISTILL = f"{_REUSE} distill"
DEFENDED = {
    "defended": _UNTARGETED,
    "defended blend": {**_UNTARGETED, "repair_blend": True},
    "defended blend verdict": {**_UNTARGETED, "repair_blend": True, "blend_verdict": True},
    "defended outranks reuse": SETTINGS[_REUSE][1],
    "defended outranks reuse distill": SETTINGS[_DISTILL][1],
}
"""`verdict` as the README recommended it with `untargeted=true` (`defended`), with `repair_blend=true`
added (`defended blend`, the README's command since 2026-12-04), with `blend_verdict=true` too (`defended
blend verdict`), with `untargeted_outranks` and `blend_reuse` too (`defended outranks reuse`), and with
`repair_distill=0.5` too (`defended outranks reuse distill`, the README's command since 2026-12-05), run on the
clean and all-to-all models. The last two ran on a later build of the models than the others (REBUILT_PARTS)."""
REBUILT_PARTS = ("defended outranks reuse", "defended outranks reuse distill")
"""Parts measured on 2026-12-05 on models rebuilt on another host (the shadow models as verdict_repair_second_build.md
measured them): the sizes and the other parts were measured on an earlier build, and a build moves the numbers."""


def models() -> list[tuple[str, str, LabConfig]]:
    """(name, role, lab): shadow, clean, shift."""
    shadow = [(n, role, lab) for n, role, lab in sampled_and_held_out() if role == "shadow"]
    clean = [(n, "clean", lab) for n, role, lab in detect_models() if role == "clean"]
    shift = [(lab.name, "shift", lab) for lab in load_bench_config(SHIFT).labs() if lab.attack is not None]
    return shadow + clean + shift


def defended(name: str, path: str, parts: list[str]) -> dict[str, Any]:
    """Each of DEFENDED's `parts` at each fraction: what it followed, what it cut, and the repaired model's ASR
    and accuracy lost."""
    import tempfile

    from onp_env.defend import defend_artifact

    out: dict[str, Any] = {}
    for part in parts:
        cells = out[part] = {}
        for fraction in FRACTIONS:
            with tempfile.TemporaryDirectory() as tmp:
                params = {**DEFENDED[part], "defense_fraction": fraction}
                _, report = defend_artifact(path, "verdict", params, out=f"{tmp}/o")
            d, tuned = report["details"], report.get("finetuned") or report
            cells[str(fraction)] = {"follows": d.get("follows"), "flagged": bool(d.get("flagged")),
                                    "pruned": report["pruned"], "asr": tuned["asr"], "seconds": report["seconds"],
                                    "acc_lost": report["before"]["acc"] - tuned["acc"]}  # fmt: skip
    return {"model": name, "cells": out}


def missing(row: dict[str, Any]) -> list[str]:
    """The forms of LATER a row lacks, and on the clean and all-to-all models the parts of DEFENDED."""
    wanted = row["role"] == "clean" or row["mode"] == "all-to-all"
    parts = [*LATER, *DEFENDED] if wanted else list(LATER)
    return [part for part in parts if part not in row.get("cells", {})]


def untargeted(model: Any, x: Any, y: Any, form: str) -> dict[str, Any]:
    """The untargeted inversion's size in `form` (seed 0, the shipped inversion settings), timed."""
    import torch

    from onp_env.signals.trigger_inversion import InversionParams, invert_untargeted

    start = time.perf_counter()
    inv = invert_untargeted(model, x, y, InversionParams(), 0, torch.device("cpu"), form)
    return {"size": float(inv.norms[0]), "reached": bool(inv.reached[0]), "steps": inv.steps,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def later_forms(path: str, forms: list[str]) -> dict[str, Any]:
    """`forms` of LATER at each fraction, as cells: form -> fraction -> size record."""
    from onp_env import load_artifact
    from onp_env.defend import defense_subset

    art = load_artifact(path)
    cells: dict[str, Any] = {form: {} for form in forms}
    for fraction in FRACTIONS:
        x, y = defense_subset(art, fraction, 0)
        for form in forms:
            cells[form][str(fraction)] = untargeted(art.model, x, y, form)
    return cells


def size(row: dict[str, Any], fraction: str, form: str) -> dict[str, Any]:
    """A row's untargeted size record of `form` at `fraction`."""
    return row["cells"][form][fraction] if form in LATER else row[fraction][form]


def measure(name: str, role: str, path: str, parts: list[str] | None = None) -> dict[str, Any]:
    import torch

    if parts is not None:
        torch.set_num_threads(1)
        forms = [p for p in parts if p in LATER]
        cells = later_forms(path, forms) if forms else {}
        others = [p for p in parts if p not in LATER]
        return {"model": name, "cells": {**cells, **(defended(name, path, others)["cells"] if others else {})}}

    from onp_env import load_artifact
    from onp_env.defend import defense_subset
    from onp_env.graph.units import find_units
    from onp_env.signals import SIGNALS

    torch.set_num_threads(1)
    art = load_artifact(path)
    attack = art.manifest.get("attack") or {}
    row: dict[str, Any] = {"model": name, "role": role, "label": attack.get("label") or attack.get("name", "clean"),
                           "mode": attack.get("mode")}  # fmt: skip
    for fraction in FRACTIONS:
        x, y = defense_subset(art, fraction, 0)
        layout, _ = find_units(art.model, x[:2])
        cell: dict[str, Any] = {}
        for form in FORMS:  # a LATER form goes where the rows written before it keep it
            found = untargeted(art.model, x, y, form)
            if form in LATER:
                row.setdefault("cells", {}).setdefault(form, {})[str(fraction)] = found
            else:
                cell[form] = found
        for s in ("inversion", "latent_gap"):
            index = SIGNALS[s](reference_from=REFERENCE).compute(art.model, layout, x, y).details["anomaly"]
            k = max(range(len(index)), key=index.__getitem__)
            cell[s] = {"index": index[k], "suspect": k}
        row[str(fraction)] = cell
    return row


def reference(rows: list[dict[str, Any]], form: str, leave_out: str | None = None) -> tuple[float, float]:
    """(median, 1.4826 MAD) of the log untargeted sizes of the shadow models at 5% (base.log_spread)."""
    from onp_env.signals.base import log_spread

    return log_spread([size(r, "0.05", form)["size"] for r in rows
                       if r["role"] == "shadow" and r["model"] != leave_out])  # fmt: skip


def index(rows: list[dict[str, Any]], row: dict[str, Any], fraction: str, form: str) -> float:
    import math

    med, spread = reference(rows, form, row["model"])
    return (med - math.log(size(row, fraction, form)["size"])) / spread


GROUPS = {"clean": ("clean", "tab:green", "o"), "all-to-all": ("all-to-all", "tab:red", "^"),
          "all-to-one": ("all-to-one", "tab:blue", ".")}  # fmt: skip


def plot(rows: list[dict[str, Any]]) -> None:
    """untargeted_inversion.png: each model's mask index against its blend index (top) and its additive index
    (bottom), per fraction, NC's line drawn on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 9), sharex=True, sharey=True)
    for row_axes, form in zip(axes, ("blend", "additive"), strict=True):
        for ax, f in zip(row_axes, ("0.05", "0.01"), strict=True):
            for name, (label, color, marker) in GROUPS.items():
                group = [r for r in rows if (r["role"] == "clean" if name == "clean" else r["mode"] == name)]
                xs, ys = [index(rows, r, f, "mask") for r in group], [index(rows, r, f, form) for r in group]
                ax.scatter(xs, ys, c=color, marker=marker, s=40 if marker != "." else 60,
                           label=f"{label} ({len(group)})")  # fmt: skip
            ax.axvline(LINE, color="grey", ls="--", lw=1)
            ax.axhline(LINE, color="grey", ls="--", lw=1)
            ax.set(title=f"{float(f):.0%} defense data", xlabel="mask form: anomaly index across models",
                   ylabel=f"{form} form: anomaly index across models")  # fmt: skip
    axes[0, 0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Untargeted trigger: flagged beyond the dashed line (NC's 2)", fontsize=10)
    fig.tight_layout()
    tmp = HERE / "results" / ".untargeted_inversion.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(HERE / "results" / "untargeted_inversion.png")


def report(rows: list[dict[str, Any]]) -> str:
    plot(rows)
    lines = ["# An untargeted trigger inversion against all-to-all backdoors", "",
             f"Generated by `python benchmarks/untargeted_inversion.py`: {len(rows)} Fashion-MNIST small CNNs. Per "
             "defense fraction: `class` is the larger of the per-class verdicts `verdict` reads (Neural Cleanse's "
             "inversion and the latent shift, anomaly index against the shipped reference fashion-mnist; flagged "
             f"above {LINE:g}); `mask`, `blend` and `additive` are the untargeted inversion's anomaly index across "
             "models (against the shadow models' log sizes at 5%, each shadow model left out of its own; flagged "
             f"above {LINE:g}); sizes in pixels of mask L1 (blend, additive: the opacity or amplitude times the "
             "pixels). `verdict` reads the mask and blend forms; the additive one is measured here only. Bold: "
             "above the line.", ""]  # fmt: skip
    for form in FORMS:
        med, spread = reference(rows, form)
        lines.append(f"- reference `{form}`: median size {2.718281828 ** med:.1f}, spread (1.4826 MAD of the log "
                     f"sizes) {spread:.3f}")  # fmt: skip
    lines += ["", "![each model's untargeted indices](untargeted_inversion.png)"]
    half = "---:|" * 4 + "---|"
    lines += ["", "| model | role | attack | mode | 5%: class | mask | blend | additive | sizes | 1%: class | mask "
              "| blend | additive | sizes |", "|---|---|---|---|" + half * 2]  # fmt: skip

    def mark(v: float) -> str:
        return f"**{v:.1f}**" if v > LINE else f"{v:.1f}"

    for r in rows:
        cells = []
        for f in ("0.05", "0.01"):
            c = r[f]
            cls = max(c["inversion"]["index"], c["latent_gap"]["index"])
            cells += [mark(cls), *(mark(index(rows, r, f, form)) for form in FORMS),
                      " / ".join(f"{size(r, f, form)['size']:.0f}" for form in FORMS)]  # fmt: skip
        head = f"| {r['model'].removeprefix('fashion-mnist-')} | {r['role']} | {r['label']} | {r['mode'] or '-'} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += ["", "## Summary", "", "| models | fraction | flagged by class | + untargeted (mask or blend) | "
              "flagged by untargeted (mask or blend) alone | + additive too | additive alone |",
              "|---|---|" + "---:|" * 5]  # fmt: skip
    groups = {"clean": lambda r: r["role"] == "clean", "all-to-all": lambda r: r["mode"] == "all-to-all",
              "all-to-one": lambda r: r["mode"] == "all-to-one"}  # fmt: skip
    for name, keep in groups.items():
        group = [r for r in rows if keep(r)]
        for f in ("0.05", "0.01"):
            cls = [max(r[f]["inversion"]["index"], r[f]["latent_gap"]["index"]) > LINE for r in group]
            unt = [max(index(rows, r, f, form) for form in ("mask", "blend")) > LINE for r in group]
            add = [index(rows, r, f, "additive") > LINE for r in group]
            either = sum(a or b for a, b in zip(cls, unt, strict=True))
            every = sum(a or b or c for a, b, c in zip(cls, unt, add, strict=True))
            lines.append(f"| {name} ({len(group)}) | {float(f):.0%} | {sum(cls)} | {either} | {sum(unt)} | {every} | "
                         f"{sum(add)} |")  # fmt: skip
    lines += ["", "## The recommended defense on the clean and all-to-all models", "",
              "`verdict` as the README recommends it (the repaired model): `defended` with `untargeted=true`, "
              "`defended blend` with `repair_blend=true` added (the README's command since 2026-12-04), `defended "
              "blend verdict` with `blend_verdict=true` too, `defended outranks reuse` with `untargeted_outranks` "
              "and `blend_reuse` too, `defended outranks reuse distill` with `repair_distill=0.5` too (the README's "
              "command since 2026-12-05). " + ", ".join(f"`{part}`" for part in REBUILT_PARTS) + " ran on models "
              "rebuilt on another host than the other parts and the sizes above: compare them with each other only. "
              "Per "
              "fraction: what it followed, units cut, ASR after (backdoored) and accuracy lost in points; the "
              "mean points lost on the clean models last."]  # fmt: skip
    for part in DEFENDED:
        lines += ["", f"### `{part}`", "",
                  "| model | attack | 5%: follows | cut | ASR | lost | 1%: follows | cut | ASR | lost |",
                  "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]  # fmt: skip
        lost: dict[str, list[float]] = {"0.05": [], "0.01": []}
        for r in rows:
            if part not in r.get("cells", {}):
                continue
            cells = []
            for f in ("0.05", "0.01"):
                c = r["cells"][part][f]
                follows = c["follows"] if c["flagged"] else "not flagged"
                asr = "-" if c["asr"] is None else f"{100 * c['asr']:.1f}"
                cells += [follows, str(c["pruned"]), asr, f"{100 * c['acc_lost']:.1f}"]
                if r["role"] == "clean":
                    lost[f].append(100 * c["acc_lost"])
            lines.append(f"| {r['model'].removeprefix('fashion-mnist-')} | {r['label']} | " + " | ".join(cells) + " |")
        means = [f"{sum(v) / len(v):.2f} ({len(v)} models)" if v else "-" for v in lost.values()]
        lines += ["", f"Mean points lost on the clean models: {means[0]} at 5%, {means[1]} at 1%."]
    secs = sorted(size(r, f, form)["seconds"] for r in rows for f in ("0.05", "0.01") for form in FORMS)
    lines += ["", f"Median seconds per untargeted inversion (one form, one thread): {secs[len(secs) // 2]:.1f}."]
    from onp_env.signals.trigger_inversion import InversionParams

    additive = [size(r, f, "additive") for r in rows for f in ("0.05", "0.01")]
    loud = [c for c in additive if c["size"] > 0.5 * 28 * 28]
    p = InversionParams()
    if loud and max(c["steps"] for c in loud) < p.steps:
        steps = [c["steps"] for c in loud]
        lines += ["", f"Additive inversions that ended with an amplitude above 0.5: {len(loud)} of {len(additive)}, "
                  f"after {min(steps)}-{max(steps)} steps of at most {p.steps}: the early stop (no best size 1% "
                  f"smaller in `patience`, {p.patience} steps) ended them, so their best came within the first "
                  f"{max(steps) - p.patience} steps, above the amplitude it starts at (0.5, NC's mask start), and "
                  "never shrank. Not a form `verdict` reads."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    per_model_main(__doc__, RESULTS, models(), measure, report, missing)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
