"""On the ResNets, do the agent's trigger-free signals rank the oracle's units, and does the agent pick them?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/resnet_signals.py [--workers 2] [--top 12]

A diagnostic (it reads the trigger to find the oracle's units; it chooses nothing). On the bench's cached
PreAct-ResNet-18 models (fashion-mnist-resnet.yaml: BadNets and Blended, seeds 201-202; its WaNet models where the
cache holds them) and the two shadow ResNets of fashion-mnist-resnet-shadow-2.yaml, with the defense images a bench
cell draws (5%, the model's seed): the oracle's `--top` units (the largest clean-vs-triggered activation gap:
agents.expert's quantity), and
  - where they lie (layers);
  - each signal of the shipped agent (inversion, latent_gap; their defaults, no class reference, as the agent deploys
    on a ResNet), scored by ROC-AUC against them over all units and within the layer holding most of them, and the
    class its verdict names against the true target;
  - the shipped agent's own cut, deployed as `onp` deploys it (deterministic, the model's seed), and how many of the
    oracle's units it holds, with its units' layers.
bn_revival.md and resnet_bn_stats.md found that the agent's cut on the bench's Blended models hides the backdoor and,
read with BatchNorm re-estimated, stops after 4-6 units: this says whether the signals or the policy miss the units.
Then, what each signal's own ranking would buy: its top CUTS units over the whole model pruned (its raw values, as no
per-layer z-score weighs them), with the test split's ASR and accuracy lost as the cut comes and with every BatchNorm
layer's statistics re-estimated on the defense images (as a repair's training would; bn_revival.md). One JSON line per
model in resnet_signals.jsonl (resumable), then resnet_signals.md."""

from __future__ import annotations

import collections
import copy
import platform
import sys
from typing import Any

import torch
from bn_revival import per_layer, recalibrated
from feature_separability import auc, oracle_gap
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main

from onp_env.bench.config import load_bench_config

RESULTS = HERE / "results" / "resnet_signals.jsonl"
CONFIGS = HERE.parent / "configs" / "bench"
TOP = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 12
CUTS = (8, 16, 32)


def models() -> list[tuple[str, str, Any]]:
    from onp_env.zoo import cache_dir, find_cached

    bench = [(lab.name, "bench", lab) for lab in load_bench_config(CONFIGS / "fashion-mnist-resnet.yaml").labs()
             if lab.attack is not None]  # fmt: skip
    shadow = [
        (lab.name, "shadow", lab) for lab in load_bench_config(CONFIGS / "fashion-mnist-resnet-shadow-2.yaml").labs()
    ]
    return [m for m in bench if m[2].attack.name != "wanet" or find_cached(m[2], cache_dir()) is not None] + shadow


def block(name: str) -> str:
    """A unit layer's block: `layers.7` for `layers.7.bn2`, `bn` for the final BatchNorm."""
    return name.rsplit(".", 1)[0] if name.startswith("layers.") else name


def measure(name: str, role: str, path: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from agents.defense import SHIPPED, deploy
    from agents.io import load_agent
    from baselines.common import top_units
    from onp_env import load_artifact
    from onp_env.defend import defense_subset
    from onp_env.graph.units import find_units
    from onp_env.masking import Masks
    from onp_env.metrics import evaluate
    from onp_env.signals import SIGNALS

    seed = int(name.rsplit("-s", 1)[1])
    art = load_artifact(path)
    x, y = defense_subset(art, 0.05, seed)
    model = art.model.eval()
    layout, _ = find_units(model, x[:2])
    where = [layout.locate(u)[0].name for u in range(layout.num_units)]
    positive = torch.zeros(layout.num_units, dtype=torch.bool)
    positive[torch.argsort(-oracle_gap(art, layout, x, y))[:TOP]] = True
    held = [where[u] for u in torch.nonzero(positive).flatten().tolist()]
    lay = max(reversed(layout.layers), key=lambda lay: held.count(lay.name))  # ties: the later layer
    sl = slice(lay.offset, lay.offset + lay.size)
    ds = art.dataset()
    before = evaluate(model, ds.test_x, ds.test_y, art.attack)

    def cut(units: list[int]) -> dict[str, Any]:
        with Masks(copy.deepcopy(model), layout, "zero") as masks:
            masks.prune(units)
            pruned = masks.export()
        out: dict[str, Any] = {"layers": per_layer(layout, units)}
        for how, m in (("as cut", pruned), ("re-estimated", recalibrated(pruned, x))):
            after = evaluate(m, ds.test_x, ds.test_y, art.attack)
            out[how] = {"asr": round(100 * after["asr"], 2), "lost": round(100 * (before["acc"] - after["acc"]), 2)}
        return out

    signals = {}
    for s in ("inversion", "latent_gap"):
        result = SIGNALS[s]().compute(model, layout, x, y)  # seed 0, as the agent's env computes it
        units = result.units.nan_to_num(0.0, 0.0, 0.0)
        top = torch.argsort(-units)[:TOP]
        signals[s] = {"auc_all": auc(units, positive), "auc_layer": auc(units[sl], positive[sl]),
                      "top_hits": int(positive[top].sum()), "suspect": result.globals.get("suspect"),
                      "index": result.globals.get("anomaly_index"), "globals": result.globals,
                      "cuts": {k: cut(top_units(units, torch.isfinite(units))[:k]) for k in CUTS}}  # fmt: skip
    agent = load_agent(SHIPPED)
    params = {k: {n: v for n, v in p.items() if n != "reference"} for k, p in agent.env.signal_params.items()}
    agent.env = agent.env.__class__(**{**agent.env.__dict__, "signal_params": params})
    order, record = deploy(agent, model, x, y, deterministic=True, seed=seed)
    if record[-1].get("accuracy_collapsed"):  # as onp's undo_collapse leaves it
        order = [u for u in order if u not in set(record[-1].get("units", []))]
    return {"model": name, "role": role, "host": platform.node(), "torch": torch.__version__, "top": TOP,
            "target": art.attack.target if art.attack is not None else None, "before": before, "layer": lay.name,
            "oracle_blocks": dict(collections.Counter(map(block, held))), "signals": signals,
            "agent": {"units": len(order), "hits": int(positive[order].sum()) if order else 0,
                      "blocks": dict(collections.Counter(block(where[u]) for u in order))}}  # fmt: skip


def report(rows: Rows) -> str:
    lines = [
        "# The agent's signals and cut against the oracle's units, on ResNets",
        "",
        f"Generated by `python benchmarks/resnet_signals.py` from resnet_signals.jsonl: {len(rows)} PreAct-ResNet-18 "
        "models, 5% defense data drawn with the model's seed. Oracle's units: the top "
        f"{rows[0]['top'] if rows else TOP} by clean-vs-triggered activation gap (reads the trigger: a diagnostic). "
        "Per signal (the shipped agent's, at their defaults without a class reference): ROC-AUC against those units "
        "over all units and within the layer holding most of them, how many of its own top units are the oracle's, "
        "and the class its verdict names (target in brackets). Agent: the shipped agent's cut as `onp` deploys it, "
        f"and how many of its units are the oracle's. Hosts: {', '.join(sorted({r['host'] for r in rows}))}.",
        "",
        "| model | role | oracle's units (blocks) | inversion AUC all / layer | top hits | suspect [target] "
        "| latent_gap AUC all / layer | top hits | suspect | agent units | oracle's among them | agent's blocks |",
        "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        inv, lat, ag = r["signals"]["inversion"], r["signals"]["latent_gap"], r["agent"]
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items()))  # noqa: E731
        lines.append(f"| {r['model'].split('preact_resnet18-')[-1]} | {r['role']} | {fmt(r['oracle_blocks'])} "
                     f"| {inv['auc_all']:.2f} / {inv['auc_layer']:.2f} | {inv['top_hits']} | {inv['suspect']} "
                     f"[{r['target']}] | {lat['auc_all']:.2f} / {lat['auc_layer']:.2f} | {lat['top_hits']} "
                     f"| {lat['suspect']} | {ag['units']} | {ag['hits']} | {fmt(ag['blocks'])} |")  # fmt: skip
    lines += [
        "",
        "Each signal's own top units over the whole model, pruned: test ASR / points lost, as the cut comes and with "
        "every BatchNorm layer's statistics re-estimated on the defense images (before: the model's ASR).",
        "",
        "| model | before | signal | " + " | ".join(f"top {k}: as cut | re-estimated" for k in CUTS) + " |",
        "|---|---:|---|" + "---:|---:|" * len(CUTS),
    ]
    for r in rows:
        for s, v in r["signals"].items():
            cells = [
                f"{c[h]['asr']:.1f} / {c[h]['lost']:.1f}"
                for c in v["cuts"].values()
                for h in ("as cut", "re-estimated")
            ]
            lines.append(
                f"| {r['model'].split('preact_resnet18-')[-1]} | {100 * r['before']['asr']:.1f} | {s} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--top" in sys.argv:
        del sys.argv[sys.argv.index("--top") : sys.argv.index("--top") + 2]
    per_model_main(__doc__, RESULTS, models(), measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
