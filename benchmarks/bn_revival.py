"""Does re-estimating BatchNorm alone bring back a backdoor the agent had cut? A diagnostic of the ResNet bench's
Blended revival.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/bn_revival.py [--workers 2] [--report-only]

On the bench's PreAct-ResNet-18 models the shipped agent cuts the Blended backdoor (ASR 0.0% on s201) and verdict's
repair lets it back in (48.4% and 63.8%; README, "Fashion-MNIST on a residual network"); holding BatchNorm at its
running statistics during the repair held most of it down on the bench's s201 and did worse on the shadow ResNets. Why
fine-tuning revives a backdoor whose units were cut was never measured directly. Here, per model, with 5% defense data
and the model's seed (the bench cell's), the agent's pruned model (no weight changed) is measured as it comes and after
its BatchNorm running statistics are re-estimated on the defense images (clean; cumulative averages, eval mode after,
no weight changes), every BatchNorm layer at once and one residual block at a time; the unpruned model re-estimated the
same way is the control. The oracle (the activation gap with the true trigger, on the defense images) cuts as many
units, measured the same two ways: whether the cut units were the backdoor's or only upset the statistics below them.
Beside them the repaired model of the bench's `onp-verdict-repair` spec (the same pruned model, repaired). The models:
the ResNet bench's six (the run of 2026-12-06 measured its two Blended ones; the other four were not built on that
host), the two shadow ResNets of fashion-mnist-resnet-shadow-2.yaml, and for comparison the five small-CNN held-out
models of seed 101, on which the repair revives nothing. This uses the test
split and the trigger to measure, and chooses nothing. One torch thread per worker; one JSON line per model in
bn_revival.jsonl (resumable), then bn_revival.md."""

from __future__ import annotations

import copy
import platform
import re
from typing import Any

import torch
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, held_out, per_model_main
from torch import nn

from baselines.common import top_units
from onp_env.artifacts import load_artifact
from onp_env.bench.config import load_bench_config
from onp_env.defend import defense_subset
from onp_env.graph.features import activation_gap
from onp_env.graph.units import find_units
from onp_env.masking import Masks
from onp_env.metrics import evaluate
from onp_env.registry import defense_class
from onp_env.training import reestimate_batchnorm

RESULTS = HERE / "results" / "bn_revival.jsonl"
CONFIGS = HERE.parent / "configs" / "bench"
REPAIR = load_bench_config(CONFIGS / "fashion-mnist-resnet-onp-no-mnp.yaml").defenses[1]["params"]
FRACTION = 0.05


def models() -> list[tuple[str, str, Any]]:
    picked = [
        (lab.name, "resnet bench", lab) for lab in load_bench_config(CONFIGS / "fashion-mnist-resnet.yaml").labs()
    ]
    picked += [(lab.name, "resnet shadow", lab)
               for lab in load_bench_config(CONFIGS / "fashion-mnist-resnet-shadow-2.yaml").labs()]  # fmt: skip
    picked += [(lab.name, "small cnn", lab) for lab in held_out() if lab.attack is not None and lab.seed == 101]
    return picked


def recalibrated(model: nn.Module, x: torch.Tensor, prefix: str = "") -> nn.Module:
    """A copy of `model` whose BatchNorm layers named under `prefix` (all where empty) hold running statistics
    re-estimated on `x`; weights, masks and the other layers unchanged."""
    return reestimate_batchnorm(copy.deepcopy(model), x, only=prefix)


def stages(model: nn.Module) -> list[str]:
    """Name prefixes of `model`'s BatchNorm layers, one per module that holds some directly (a residual block:
    "layers.3."), or a top-level BatchNorm layer's own name, in order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return list(dict.fromkeys(n.rsplit(".", 1)[0] + "." if "." in n else n for n in names))


def oracle_cut(model: nn.Module, layout: Any, x: torch.Tensor, y: torch.Tensor, attack: Any,
               count: int) -> tuple[nn.Module, dict]:  # fmt: skip
    """`model` with the `count` units of the largest activation gap between the defense images of the other classes
    with the true trigger and without it (the oracle's ranking) pruned, and how many of them each layer holds."""
    other = attack.targets(y) != y
    gap = activation_gap(model, layout, x[other], y[other], attack.apply(x[other]), y[other])
    units = top_units(gap, torch.isfinite(gap))[:count]
    with Masks(copy.deepcopy(model), layout, "zero") as masks:
        masks.prune(units)
        return masks.export(), per_layer(layout, units)


def per_layer(layout: Any, units: list[int]) -> dict[str, int]:
    """How many of `units` each layer of `layout` holds (the layers that hold some)."""
    counts: dict[str, int] = {}
    for u in units:
        name = layout.locate(u)[0].name
        counts[name] = counts.get(name, 0) + 1
    return counts


def measure(name: str, role: str, path: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    seed = int(re.findall(r"-s(\d+)", name)[-1])
    art = load_artifact(path)
    ds = art.dataset()
    x, y = defense_subset(art, FRACTION, seed)

    def score(model: nn.Module) -> dict[str, float]:
        m = evaluate(model, ds.test_x, ds.test_y, art.attack)
        return {"acc": round(100 * m["acc"], 2), "asr": round(100 * m["asr"], 2)}  # type: ignore[operator]

    result = defense_class("onp")(seed=seed, **REPAIR).run(art.model, x, y)
    pruned = result.model
    cells = {"before": score(art.model), "before, re-estimated": score(recalibrated(art.model, x)),
             "agent": score(pruned), "agent, re-estimated": score(recalibrated(pruned, x))}  # fmt: skip
    for stage in stages(pruned):
        cells[f"agent, {stage.rstrip('.')} re-estimated"] = score(recalibrated(pruned, x, stage))
    cells["repaired"] = score(result.finetuned) if result.finetuned is not None else None
    layout, _ = find_units(art.model, x[:2])
    oracle, oracle_layers = oracle_cut(art.model, layout, x, y, art.attack, len(result.pruned))
    cells["oracle"], cells["oracle, re-estimated"] = score(oracle), score(recalibrated(oracle, x))
    return {"model": name, "role": role, "units": len(result.pruned), "defense_images": len(x),
            "agent_layers": per_layer(layout, result.pruned), "oracle_layers": oracle_layers,
            "host": platform.node(), "torch": torch.__version__, "cells": cells}  # fmt: skip


def report(rows: Rows) -> str:
    lines = [
        "# Does re-estimating BatchNorm alone bring a cut backdoor back?",
        "",
        f"Generated by `python benchmarks/bn_revival.py` from bn_revival.jsonl: {len(rows)} models, the shipped agent "
        f"with {FRACTION:.0%} defense data and the model's seed; its pruned model as it comes (agent), with every "
        "BatchNorm layer's running statistics re-estimated on the defense images (no weight changed), and the same "
        "pruned model after fashion-mnist-resnet-onp-no-mnp.yaml's verdict repair (repaired); as many units of the "
        "oracle's ranking (the activation gap with the true trigger on the defense images), as they come and "
        "re-estimated. ASR after / accuracy "
        "lost in %/points against the model before any defense. A diagnostic: it reads the test split and the "
        f"trigger and chooses nothing. Hosts: {', '.join(sorted({r['host'] for r in rows}))}.",
        "",
        "| model | role | units | before: re-estimated | agent | agent, re-estimated | repaired | oracle | oracle, "
        "re-estimated |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(c: dict[str, float] | None, base: dict[str, float]) -> str:
        return "—" if c is None else f"{c['asr']:.1f} / {base['acc'] - c['acc']:.2f}"

    for r in rows:
        c, base = r["cells"], r["cells"]["before"]
        lines.append(f"| {r['model']} | {r['role']} | {r['units']} | {cell(c['before, re-estimated'], base)} | "
                     f"{cell(c['agent'], base)} | {cell(c['agent, re-estimated'], base)} | "
                     f"{cell(c['repaired'], base)} | {cell(c['oracle'], base)} | "
                     f"{cell(c['oracle, re-estimated'], base)} |")  # fmt: skip
    lines += [
        "",
        "The agent's pruned model with one block's BatchNorm layers re-estimated (and a top-level BatchNorm alone), "
        "ASR after / points lost:",
        "",
    ]
    for r in rows:
        c, base = r["cells"], r["cells"]["before"]
        staged = [(k.split(", ")[1].split(" ")[0], v) for k, v in c.items()  # "agent, BLOCK re-estimated"
                  if k.startswith("agent, ") and k.endswith(" re-estimated") and k.count(" ") == 2]  # fmt: skip
        lines.append(f"- {r['model']}: " + "; ".join(f"{s} {cell(v, base)}" for s, v in staged))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    exit_2_on_bad_input(lambda: per_model_main(__doc__, RESULTS, models(), measure, report))
