"""The learned defense against every baseline: leave-one-attack-out on Fashion-MNIST.

    python benchmarks/onp_vs_baselines.py [--attacks ...] [--fractions 0.01 0.05] [--report-only]

For each held-out attack A: train an agent (configs/agent/fashion-mnist.yaml) on the shadow models
of the four other attacks, build held-out models of A with seeds no shadow model uses, and run on
each of them, with 1% and 5% of the training split as defense data: ONP (the agent), every
registered baseline at its paper's defaults, and the oracle expert as the upper reference (it uses
the trigger; no defense does). Then the ablations (--ablations), on the first held-out attack at 5%.

Resumable and crash-safe: agent runs resume from their checkpoints, artifacts come from the lab's
cache, and every finished cell is one fsync'd JSON line in benchmarks/results/onp.jsonl; a cell
already there is skipped. benchmarks/results/onp.md is regenerated from that file alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from agents.config import AgentConfig, load_agent_config
from agents.expert import OracleExpert, run_expert
from agents.train import train_agent, zoo_configs
from baselines.run import defend_artifact, defense_subset
from onp_env import build_artifact, load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.config import AttackConfig, from_dict
from onp_env.env import NeuronPruningEnv, PruningTarget
from onp_env.masking import Masks
from onp_env.metrics import der, evaluate

HERE = Path(__file__).resolve().parent

CONFIG = HERE.parent / "configs" / "agent" / "fashion-mnist.yaml"
ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")
BASELINES = ("mnp", "anp", "rnp", "bnp", "fp", "clp", "magnitude", "random")
HELD_OUT_SEEDS = (101, 102, 103)
KEPT = ("acc", "asr", "ra", "der", "pruned", "seconds", "before", "units")
ABLATIONS = {
    "gnn=gat": ["policy.gnn=gat", "policy.hidden=32", "policy.heads=2"],
    "gnn=sage": ["policy.gnn=sage"],
    "static features": ["env.features=[]"],
    "dynamic only": ["env.features=[dynamic]"],
    "no imitation": ["imitation.episodes=0"],
    "imitation only": ["ppo.total_steps=0"],
    "2x steps": ["ppo.total_steps=16384"],
}


def append(path: Path, row: dict) -> None:
    """One finished cell, durably: a killed run loses at most the cell in flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_keys(path: Path) -> set[str]:
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line} if path.is_file() else set()


def oracle_cell(art_path: Path, fraction: float, cfg: AgentConfig) -> dict:
    """The oracle expert (trigger known) through the same environment: the upper reference."""
    art = load_artifact(art_path)
    x, y = defense_subset(art, fraction)
    start = time.perf_counter()
    env = NeuronPruningEnv(dataclasses.replace(cfg.env, artifacts=[], score="oracle"),
                           targets=[PruningTarget("held-out", art.model, x, y, art.attack)])  # fmt: skip
    run_expert(env, OracleExpert(cfg.imitation), 0, {})
    pruned = env.task.masks.pruned()
    seconds = time.perf_counter() - start
    with Masks(art.model, env.task.layout) as masks:  # the env pruned its own copy: art.model is intact
        masks.prune(pruned)
        model = masks.export()
    ds = art.dataset()
    after = evaluate(model, ds.test_x, ds.test_y, art.attack)
    before = {k: art.metrics[k] for k in ("acc", "asr", "ra")}
    return {"method": "oracle", **after, "der": der(before, after), "pruned": len(pruned), "seconds": seconds,
            "before": before, "defense_images": len(x), "units": pruned}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    results = args.results.with_suffix(".jsonl")
    finished = done_keys(results)
    base = load_agent_config(str(CONFIG), [])
    for fold, held in enumerate(args.attacks):
        variants = {"onp": []} | (ABLATIONS if args.ablations and fold == 0 else {})
        shadow = [a for a in base.zoo.attacks if a["name"] != held]
        held_attack = next(a for a in base.zoo.attacks if a["name"] == held)
        agents = {}
        for variant, sets in variants.items():
            cfg = load_agent_config(str(CONFIG), [f"zoo.attacks={json.dumps(shadow)}", *sets])
            out = args.runs / f"without-{held}" / variant.replace(" ", "-").replace("=", "-")
            agents[variant] = out / "agent"
            if not agents[variant].exists():
                print(f"[{held}] training agent '{variant}'", flush=True)
                train_agent(cfg, out, resume=(out / "config.json").is_file(), progress=not args.quiet)
        lab = dataclasses.replace(zoo_configs(base)[0], attack=None)
        for seed in HELD_OUT_SEEDS[: args.models]:
            attack = from_dict(AttackConfig, held_attack, "held-out attack")
            held_cfg = dataclasses.replace(lab, name=f"held-out-{held}-s{seed}", seed=seed, attack=attack)
            art = build_artifact(held_cfg, progress=not args.quiet)
            for fraction in args.fractions:
                ablate = fraction == max(args.fractions)
                methods = [*(variants if ablate else ["onp"]), "oracle", *BASELINES]
                for method in methods:
                    key = f"{held}/s{seed}/{fraction:g}/{method}"
                    if key in finished:
                        continue
                    start = time.perf_counter()
                    if method == "oracle":
                        report = oracle_cell(art, fraction, base)
                    else:
                        name = "onp" if method in variants else method
                        params = {"defense_fraction": fraction}
                        if name == "onp":
                            params["agent"] = str(agents[method])
                        if name == "anp":
                            params["parallel"] = True  # bit-identical masks, 1.42x (benchmarks/results/anp_speed.md)
                        out = args.runs / "defenses" / key
                        if out.exists():  # a cell killed after writing its folder: redo it
                            shutil.rmtree(out)
                        _, report = defend_artifact(art, name, params, out)
                        report["units"] = load_artifact(out).manifest["defense"]["pruned_units"]
                    row = {"key": key, "attack": held, "seed": seed, "fraction": fraction, "method": method,
                           **{k: report[k] for k in KEPT},
                           "wall_seconds": round(time.perf_counter() - start, 2), "host": platform.node(),
                           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
                    if method in variants:
                        row["sequence"] = report["details"].get("sequence")
                    append(results, row)
                    finished.add(key)
                    print(f"{key}: ACC {row['acc']:.4f} ASR {row['asr']:.4f} DER {row['der']:.3f} "
                          f"pruned {row['pruned']} in {row['seconds']:.1f} s", flush=True)  # fmt: skip
                    report_md(results, args.results)


def _ms(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return ""
    mean = statistics.mean(values) * scale
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}" if len(values) > 1 else f"{mean:.1f}"


def report_md(results: Path, out: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    order = ["onp", "oracle", *BASELINES, *ABLATIONS]
    lines = [
        "# ONP (learned) against every baseline: leave-one-attack-out on Fashion-MNIST",
        "",
        "Generated by `python benchmarks/onp_vs_baselines.py` from `onp.jsonl` alone. Per held-out attack, the "
        "agent is trained on small-CNN shadow models of the four other attacks (seeds 1-2) and deployed on held-out "
        f"models of that attack (seeds {', '.join(map(str, HELD_OUT_SEEDS))}); every baseline runs on the same "
        "models and defense data. `oracle` knows the trigger (upper reference, not a defense). Mean ± std over "
        "held-out models, in % (DER in %). Seconds: the defense alone, 1-2 torch threads on a shared 2-core CPU "
        f"({platform.machine()}, torch {torch.__version__}).",
        "",
        "| attack | defense data | method | n | ACC % | ASR % | RA % | DER % | pruned | oracle units hit % | seconds |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["fraction"]), []).append(r)
    for (attack, fraction), rs in groups.items():
        before = [r["before"] for r in rs if r["method"] == "oracle"] or [rs[0]["before"]]
        lines.append(f"| **{attack}** | {fraction:.0%} | *before* | {len(before)} | {_ms([b['acc'] for b in before])} "
                     f"| {_ms([b['asr'] for b in before])} | {_ms([b['ra'] for b in before])} | | | | |")  # fmt: skip
        oracle = {r["seed"]: set(r["units"]) for r in rs if r["method"] == "oracle"}
        best = max((statistics.mean([r["der"] for r in rs if r["method"] == m]), m) for m in {r["method"] for r in rs}
                   if m != "oracle")  # fmt: skip
        for m in sorted({r["method"] for r in rs}, key=lambda m: order.index(m) if m in order else 99):
            sel = [r for r in rs if r["method"] == m]
            name = f"**{m}**" if m == best[1] else m
            hits = [len(oracle[r["seed"]] & set(r["units"])) / len(oracle[r["seed"]]) for r in sel
                    if oracle.get(r["seed"])]  # fmt: skip
            lines.append(
                f"| | | {name} | {len(sel)} | {_ms([r['acc'] for r in sel])} | {_ms([r['asr'] for r in sel])} "
                f"| {_ms([r['ra'] for r in sel])} | {_ms([r['der'] for r in sel])} "
                f"| {_ms([r['pruned'] for r in sel], 1)} | {_ms(hits)} | {_ms([r['seconds'] for r in sel], 1)} |"
            )
    lines += [
        "",
        "Bold: best mean DER of the defenses in that group (oracle excluded). Oracle's units hit: share of "
        "the units the oracle expert pruned on the same model that the method also pruned.",
        "",
    ]
    write_text_atomic(out, "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--models", type=int, default=3, help="held-out models per attack")
    p.add_argument("--ablations", action="store_true", help="also train and deploy the ablation variants")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="regenerate onp.md from onp.jsonl")
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "onp")
    p.add_argument("--results", type=Path, default=HERE / "results" / "onp.md")
    args = p.parse_args()
    if args.report_only:
        report_md(args.results.with_suffix(".jsonl"), args.results)
    else:
        run(args)


if __name__ == "__main__":
    main()
