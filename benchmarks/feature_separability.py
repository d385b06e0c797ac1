"""How well each node feature the policy can see finds the oracle's units, per attack, and what each
trigger-free signal costs; with the inversion's verdicts, how well `onp detect` separates clean and
backdoored models.

    python benchmarks/feature_separability.py [--top 12] [--workers 2] [--report-only]

Models: benchmarks/signal_models.py (5 attacks x 3 held-out models, targets 0 / 3 / 7, and 3 clean
models; the agent config's recipe). Positives: the oracle's `--top` units with the largest
clean-vs-triggered activation gap (agents.expert's quantity; it uses the trigger, for this analysis
only). Every observed feature (static, and the signal sets at their environment defaults:
onp_env/env/signals.py) is scored by its ROC-AUC within the layer that holds most positives and over
all units. Seconds per signal on one torch thread, against ANP's own 2000 iterations on the same
kind of model (`anp 2000`, measured here once). One JSON line per model in
benchmarks/results/feature_separability.jsonl (resumable); writes feature_separability.md and
detection.md."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "feature_separability.jsonl"
SIGNAL_SETS = ("mnp", "anp", "rnp", "inversion", "latent_gap")
VERDICTS = ("inversion", "latent_gap")
"""Signals with a per-class verdict (an anomaly index of per-class trigger sizes)."""
SKIP = ("depth", "width", "is_bn", "pruned")  # constant within a layer, or always 0


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def oracle_positives(art: Any, layout: Any, x: torch.Tensor, y: torch.Tensor, top: int) -> torch.Tensor:
    """(units,) True for the `top` units with the largest clean-vs-triggered activation gap on the
    defense images not of the target class: the oracle's units (it uses the trigger: analysis only)."""
    positive = torch.zeros(layout.num_units, dtype=torch.bool)
    positive[torch.argsort(-oracle_gap(art, layout, x, y))[:top]] = True
    return positive


def oracle_gap(art: Any, layout: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(units,) the clean-vs-triggered activation gap on the defense images not of the target class."""
    from onp_env.graph.features import activation_gap

    keep = art.attack.targets(y) != y
    return activation_gap(art.model, layout, x[keep], y[keep], art.attack.apply(x[keep]), y[keep])


def measure(name: str, path: str, attack: str | None, seed: int, target: int | None, top: int) -> dict[str, Any]:
    """One model's row: per feature its AUCs, per signal its seconds, and the inversion's verdict."""
    torch.set_num_threads(1)
    from onp_env import load_artifact
    from onp_env.env.signals import layer_zscore, signal_columns
    from onp_env.graph.features import FEATURES, node_features
    from onp_env.graph.units import find_units
    from onp_env.signals import SIGNALS

    art = load_artifact(path)
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    columns = {n: node_features(art.model, layout, x, y)[:, i] for i, n in enumerate(FEATURES) if n not in SKIP}
    seconds, detection = {}, {}
    for s in SIGNAL_SETS:
        start = time.perf_counter()
        if s in VERDICTS:  # the column is this result z-scored per layer; its verdict is kept too
            result = SIGNALS[s]().compute(art.model, layout, x, y)
            columns[f"signal_{s}"] = layer_zscore(result.units.nan_to_num(0.0, 0.0, 0.0), layout)
            columns[f"{s} (raw)"] = result.units.nan_to_num(0.0, 0.0, 0.0)
            detection[s] = {**result.globals, "norms": result.details["norms"]}
        else:
            columns[f"signal_{s}"] = signal_columns([s], {}, art.model, layout, x, y)[:, 0]
        seconds[s] = round(time.perf_counter() - start, 2)
    row: dict[str, Any] = {"key": name, "attack": attack, "seed": seed, "target": target, "seconds": seconds,
                           "detection": detection}  # fmt: skip
    if art.attack is not None:
        positive = oracle_positives(art, layout, x, y, top)
        layers = [layout.locate(int(u))[0] for u in torch.nonzero(positive).flatten()]
        lay = max(set(layers), key=layers.count)
        sl = slice(lay.offset, lay.offset + lay.size)
        aucs = {n: {"layer": auc(c[sl], positive[sl]), "all": auc(c, positive)} for n, c in columns.items()}
        row |= {"layer": lay.name, "positives_in_layer": int(positive[sl].sum()), "auc": aucs}
    return row


def shadow_norms(name: str, path: str, attack: str | None, seed: int, target: int | None) -> dict[str, Any]:
    """A reference model's per-class trigger sizes under each verdict signal (what `onp detect
    --reference` computes for it)."""
    torch.set_num_threads(1)
    from onp_env import load_artifact
    from onp_env.graph.units import find_units
    from onp_env.signals import SIGNALS

    art = load_artifact(path)
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    seconds, detection = {}, {}
    for s in VERDICTS:
        start = time.perf_counter()
        result = SIGNALS[s]().compute(art.model, layout, x, y)
        seconds[s] = round(time.perf_counter() - start, 2)
        detection[s] = {**result.globals, "norms": result.details["norms"]}
    return {"key": f"shadow {name}", "role": "shadow", "attack": attack, "seed": seed, "target": target,
            "seconds": seconds, "detection": detection}  # fmt: skip


def anp_reference(path: str) -> dict[str, Any]:
    """ANP's scoring with its paper's 2000 iterations, on one thread: the yardstick for a signal's cost."""
    torch.set_num_threads(1)
    from baselines.anp import ANP
    from onp_env import load_artifact
    from onp_env.graph.units import find_units

    art = load_artifact(path)
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    start = time.perf_counter()
    ANP(iterations=2000).scores(art.model.eval(), layout, x, y)
    return {"key": "anp 2000", "model": Path(path).name, "seconds": round(time.perf_counter() - start, 1)}


def _ms(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}" if values else "-"


def report(rows: list[dict[str, Any]], top: int) -> None:
    from onp_env.artifacts import write_text_atomic

    cells = [r for r in rows if r.get("auc")]
    anp = next((r["seconds"] for r in rows if r["key"] == "anp 2000"), None)
    attacks = list(dict.fromkeys(r["attack"] for r in cells))
    names = list(cells[0]["auc"]) if cells else []
    lines = [
        "# Which features find the oracle's units, and what the signals cost",
        "",
        f"Generated by `python benchmarks/feature_separability.py` from `feature_separability.jsonl`. Positives: "
        f"the oracle's {top} units with the largest clean-vs-triggered activation gap (it uses the trigger: "
        "analysis only). ROC-AUC (0.5 = chance, below 0.5 = positives rank low), mean ± std over the held-out "
        "models of each attack (benchmarks/signal_models.py: seeds 101-103, targets 0 / 3 / 7, the agent "
        "config's Fashion-MNIST small-CNN recipe), 5% defense data.",
        "",
    ]
    header = ["| feature | " + " | ".join(attacks) + " | all attacks |", "|---|" + "---:|" * (len(attacks) + 1)]
    for scope, title in (("layer", "Within the layer that holds most positives"), ("all", "Over all units")):
        lines += [f"## {title}", "", *header]
        for n in names:
            per = [_ms([r["auc"][n][scope] for r in cells if r["attack"] == a]) for a in attacks]
            lines.append(f"| {n} | " + " | ".join(per) + f" | {_ms([r['auc'][n][scope] for r in cells])} |")
        lines.append("")
    layers = {
        a: sorted({f"{r['layer']} ({r['positives_in_layer']})" for r in cells if r["attack"] == a}) for a in attacks
    }
    lines += ["Layer holding most positives (positives in it): "
              + "; ".join(f"{a}: {', '.join(v)}" for a, v in layers.items()) + ".", ""]  # fmt: skip
    lines += ["## Seconds per model (one torch thread, shared 2-core machine)", "",
              "| signal | seconds | share of ANP's 2000 iterations |", "|---|---:|---:|"]  # fmt: skip
    for s in SIGNAL_SETS:
        secs = [r["seconds"][s] for r in rows if isinstance(r["seconds"], dict) and r.get("role") != "shadow"]
        share = f"{statistics.fmean(secs) / anp:.1%}" if anp and secs else "-"
        lines.append(f"| {s} | {_ms(secs)} | {share} |")
    lines.append(f"| anp, 2000 iterations (the paper's) | {anp if anp else '-'} | 100% |")
    write_text_atomic(HERE / "results" / "feature_separability.md", "\n".join(lines) + "\n")
    detection_report(rows)


def detection_report(rows: list[dict[str, Any]]) -> None:
    from onp_env.artifacts import write_text_atomic

    models = [r for r in rows if "detection" in r and r.get("role") != "shadow"]
    shadow = [r for r in rows if r.get("role") == "shadow"]
    backdoored = [r for r in models if r["attack"] is not None]
    clean = [r for r in models if r["attack"] is None]
    lines = [
        "# Per-class verdicts of the trigger-free signals on the lab's Fashion-MNIST models",
        "",
        "Generated by `python benchmarks/feature_separability.py` (the models of benchmarks/signal_models.py: "
        f"{len(backdoored)} backdoored, {len(clean)} clean). Each signal sizes a trigger per class (`inversion`: the "
        "inverted mask's L1 norm, what `onp detect` uses; `latent_gap`: the L2 norm of the minimum latent shift) "
        "and names the class with the largest anomaly index. Verdict: backdoored when that index exceeds 2 "
        "(Neural Cleanse's threshold); `target right`: the named class is the attack's target.",
    ]
    for signal in VERDICTS:
        verdicts = [
            (r, int(r["detection"][signal]["suspect"]), r["detection"][signal]["anomaly_index"]) for r in models
        ]
        lines += _index_table(
            verdicts,
            f"`{signal}`, each model on its own",
            "The index compares a class with the other classes of the same model.",
            flagged=True,
        )
        lines += _class_reference(models, signal)
        if shadow:
            lines += _shadow_reference(models, shadow, signal)
    write_text_atomic(HERE / "results" / "detection.md", "\n".join(lines) + "\n")


def _shadow_reference(models: list[dict[str, Any]], shadow: list[dict[str, Any]], signal: str) -> list[str]:
    """`onp detect --reference` with the defender's own shadow models as the reference."""
    from onp_env.signals.base import anomaly_index, class_reference

    ref = class_reference([torch.tensor(r["detection"][signal]["norms"]) for r in shadow],
                          [r["target"] for r in shadow])  # fmt: skip
    out = []
    for r in models:
        index = anomaly_index(torch.tensor(r["detection"][signal]["norms"]), ref)
        k = int(torch.argmax(index))
        out.append((r, k, float(index[k])))
    return _index_table(
        out,
        f"`{signal}` with the defender's shadow models as the reference",
        f"Reference: the {len(shadow)} models a defender trains for the agent (configs/agent/fashion-mnist.yaml: "
        "every attack with seeds 1-2, all targeting class 0, and 2 clean models of the same recipe); none of them "
        "is a held-out model. Each class's size is divided by its median over the reference models that do not "
        "target it, and the index is taken on the log ratios (`onp detect --reference` for the inversion).",
        flagged=True,
    )


def _class_reference(models: list[dict[str, Any]], signal: str) -> list[str]:
    """What a per-class reference would change: each class's size divided by its median size on the
    *other* models where it is not the target, the anomaly index taken on the log ratios. The
    reference comes from held-out models here (leave-one-out), a proxy for one from shadow models."""
    from onp_env.signals.base import anomaly_index

    out = []
    for i, r in enumerate(models):
        norms = r["detection"][signal]["norms"]
        ref = [statistics.median([o["detection"][signal]["norms"][k] for j, o in enumerate(models)
                                  if j != i and o["target"] != k]) for k in range(len(norms))]  # fmt: skip
        index = anomaly_index(torch.tensor(norms), torch.tensor(ref))
        k = int(torch.argmax(index))
        out.append((r, k, float(index[k])))
    return _index_table(
        out,
        f"`{signal}` against a leave-one-out reference of the other held-out models",
        "On every Fashion-MNIST model, clean ones included, some classes are reached with the smallest triggers "
        "(for the inversion, class 8, bag, and 6, shirt): a natural shortcut, not a backdoor, which an index "
        "within one model flags. Here each class's size is divided by its median on the other held-out models "
        "where it is not the target (a proxy for a reference from clean or shadow models).",
        flagged=False,
    )


def _index_table(out: list[tuple[dict[str, Any], int, float]], title: str, text: str, flagged: bool) -> list[str]:
    """A detection variant's section: (model row, suspected class, its index) per model, as the
    detection ROC-AUC and one table row per attack."""
    score = torch.tensor([i for _, _, i in out])
    label = torch.tensor([r["attack"] is not None for r, _, _ in out])
    lines = ["", f"## {title}", "", f"{text} Detection ROC-AUC: {auc(score, label):.2f}.", "",
             "| attack | models |" + (" flagged (index > 2) |" if flagged else "")
             + " target right | index (mean ± std) | min index |",
             "|---|---:|" + ("---:|" if flagged else "") + "---:|---:|---:|"]  # fmt: skip
    for a in dict.fromkeys(r["attack"] for r, _, _ in out):
        rs = [(r, k, i) for r, k, i in out if r["attack"] == a]
        right = "-" if a is None else str(sum(k == r["target"] for r, k, _ in rs))
        cols = [a or "clean", str(len(rs)), *([str(sum(i > 2 for _, _, i in rs))] if flagged else []), right,
                _ms([i for _, _, i in rs]), f"{min(i for _, _, i in rs):.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def main() -> None:
    from rows import read_separability
    from signal_models import CACHE, held_out, shadows

    from onp_env.results import append, end_last_line

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    done = {r["key"] for r in read_separability(RESULTS)}
    end_last_line(RESULTS)
    if not args.report_only:
        from onp_env import build_artifact

        jobs = []
        for lab in held_out():
            path = str(build_artifact(lab, CACHE, progress=False))
            if lab.name not in done:
                a = lab.attack
                jobs.append(
                    (measure, lab.name, path, a.name if a else None, lab.seed, a.target if a else None, args.top)
                )
        for lab in shadows():
            if f"shadow {lab.name}" not in done:
                a = lab.attack
                jobs.append((shadow_norms, lab.name, str(build_artifact(lab, CACHE, progress=False)),
                             a.name if a else None, lab.seed, a.target if a else None))  # fmt: skip
        if "anp 2000" not in done:
            jobs.append((anp_reference, jobs[0][2] if jobs else str(build_artifact(held_out()[0], CACHE))))
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(fn, *rest) for fn, *rest in jobs]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="models"):
                append(RESULTS, fut.result())
    report(read_separability(RESULTS), args.top)


if __name__ == "__main__":
    from rows import exit_2_on_bad_input

    exit_2_on_bad_input(main)
