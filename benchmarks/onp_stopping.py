"""When should the learned defense stop? A stopping rule calibrated on shadow models, checked on held-out ones.

    python benchmarks/onp_stopping.py [--workers 2] [--report-only]

ONP stops on its STOP action, on its budget, or once defense accuracy has fallen `max_acc_drop`
(0.1 in configs/agent/fashion-mnist.yaml) below its start, the step that crossed it included. On the
leave-one-attack-out protocol (benchmarks/onp_vs_baselines.py) it loses 6 points of test accuracy
with 1% defense data and 2 with 5%. A tighter limit is a trigger-free stopping rule, but picking it
on the held-out models would let the test models choose the defense. So, per fold and fraction:

1. deploy the fold's agent (`onp` in onp.md: the config as shipped) with no accuracy limit
   on each of its own shadow models (trigger known), reading after every step the accuracy and the
   ASR on the defense images, the only data a defense has (never the test split);
2. per defense fraction, pick the limit t that maximises the shadow models' mean DER on those
   images, where limit t keeps the longest prefix of the pruning sequence before the first step
   whose accuracy drop exceeds t;
3. deploy the same agent on the fold's held-out models and report test ACC, ASR and DER of the
   sequence cut by the picked limit, by the deployed rule and by every limit of the grid (the grid
   is shown, not chosen from).

Deploying with no limit changes no observation before the deployed rule would have stopped: the
sequence up to that point is the one the protocol deployed. Resumable: one fsync'd JSON line per
deployed model and fraction in benchmarks/results/onp_stopping.jsonl; onp_stopping.md is
regenerated from it alone."""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from rows import exit_2_on_bad_input, read_protocol, read_stopping
from tqdm import tqdm

from agents.config import load_agent_config
from agents.defense import deploy
from agents.io import load_agent
from agents.train import zoo_configs
from onp_env import build_artifact, load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.config import AttackConfig, from_dict
from onp_env.defend import defense_subset
from onp_env.graph.units import find_units
from onp_env.masking import Masks
from onp_env.metrics import der, evaluate
from onp_env.results import append

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "agent" / "fashion-mnist.yaml"
RUNS = HERE / "runs" / "onp"
RESULTS = HERE / "results" / "onp_stopping.jsonl"
PROTOCOL = HERE / "results" / "onp.jsonl"
ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")
AGENT = "onp"  # the protocol's agent: the config as shipped
HELD_SEEDS = (101, 102, 103)
FRACTIONS = (0.01, 0.05)
DEPLOYED = load_agent_config(str(CONFIG), []).env.max_acc_drop  # the deployed rule's limit
GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 1.0)


def cut(accs: list[float], limit: float, inclusive: bool = False) -> int:
    """Steps kept: those before the first whose accuracy drop exceeds `limit` (and that one too if
    `inclusive`, as the environment does); accs[0] is the accuracy before any pruning."""
    for i, a in enumerate(accs[1:], 1):
        if accs[0] - a > limit:
            return i if inclusive else i - 1
    return len(accs) - 1


def lengths(accs: list[float]) -> dict[str, int]:
    """Steps kept by the deployed rule and by every limit of the grid."""
    return {"deployed": cut(accs, DEPLOYED, inclusive=True)} | {f"{t:g}": cut(accs, t) for t in GRID}


def trace(fold: str, role: str, art_path: str, fraction: float) -> dict:
    """Deploy the fold's agent with no accuracy limit; per step the defense-image accuracy (and ASR on
    shadow models); on held-out models, test metrics of the sequence cut by each rule."""
    torch.set_num_threads(1)
    art = load_artifact(art_path)
    agent = load_agent(RUNS / f"without-{fold}" / AGENT / "agent")
    x, y = defense_subset(art, fraction, 0)
    torch.manual_seed(0)
    shadow = role == "shadow"
    order, record = deploy(agent, art.model, x, y, max_acc_drop=1.0, attack=art.attack if shadow else None)
    steps = [0] + [len(r.get("units", [])) for r in record[1:]]  # units per step (one in neuron mode)
    name = art.manifest["config"]["name"]
    row = {"key": f"{fold}/{role}/{name}/{fraction:g}", "fold": fold, "role": role,
           "model": name, "attack": art.attack.name, "fraction": fraction, "order": order,
           "steps": steps, "acc": [r["acc"] for r in record]}  # fmt: skip
    if shadow:
        row["asr"] = [r["asr"] for r in record]
        return row
    layout, _ = find_units(art.model, x[:2])
    ds = art.dataset()
    before = {k: art.metrics[k] for k in ("acc", "asr", "ra")}
    row["before"], row["test"] = before, {}
    for n in sorted(set(lengths(row["acc"]).values())):
        with Masks(art.model, layout) as masks:
            masks.prune(order[: sum(steps[: n + 1])])
            after = evaluate(masks.export(), ds.test_x, ds.test_y, art.attack)
        row["test"][str(n)] = {**after, "der": der(before, after)}
    return row


def jobs() -> list[tuple[str, str, str, float]]:
    """(fold, role, artifact, fraction) for every shadow and held-out model of every fold, from the cache."""
    base = load_agent_config(str(CONFIG), [])
    shadow = [(lab.attack.name, str(build_artifact(lab, progress=False))) for lab in zoo_configs(base)]
    lab = dataclasses.replace(zoo_configs(base)[0], attack=None)
    out = []
    for fold in ATTACKS:
        attack = from_dict(AttackConfig, next(a for a in base.zoo.attacks if a["name"] == fold), "held-out attack")
        held = [dataclasses.replace(lab, name=f"held-out-{fold}-s{s}", seed=s, attack=attack) for s in HELD_SEEDS]
        for fraction in FRACTIONS:
            out += [(fold, "shadow", p, fraction) for a, p in shadow if a != fold]
            out += [(fold, "held-out", str(build_artifact(h, progress=False)), fraction) for h in held]
    return out


def run(workers: int) -> None:
    done = {r["key"] for r in read_stopping(RESULTS)}
    todo = []
    for fold, role, path, fraction in jobs():  # an artifact folder is its config's name and hash
        if f"{fold}/{role}/{Path(path).name.rsplit('-', 1)[0]}/{fraction:g}" not in done:
            todo.append((fold, role, path, fraction))
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(trace, *job) for job in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="deploys"):
            append(RESULTS, fut.result())
            report()


def _ms(values: list[float], scale: float = 100.0) -> str:
    return f"{statistics.fmean(values) * scale:.1f} ± {statistics.pstdev(values) * scale:.1f}"


def picked(rows: list[dict], fold: str, fraction: float) -> tuple[str, float] | None:
    """The grid's limit with the best mean DER on the fold's shadow models (defense images), ties to the
    loosest limit (the deployed behaviour's side)."""
    shadow = [r for r in rows if r["fold"] == fold and r["role"] == "shadow" and r["fraction"] == fraction]
    if len(shadow) < 8:
        return None
    score = {}
    for t in GRID:
        ders = []
        for r in shadow:
            n = cut(r["acc"], t)
            ders.append(der({"acc": r["acc"][0], "asr": r["asr"][0]}, {"acc": r["acc"][n], "asr": r["asr"][n]}))
        score[f"{t:g}"] = statistics.fmean(ders)
    best = max(score, key=lambda k: (round(score[k], 6), float(k)))
    return best, score[best]


def _reproduces(row: dict, protocol: dict[str, list[int]]) -> bool:
    """Whether the deployed rule's units are those the protocol's cell pruned (onp.jsonl)."""
    key = f"{row['fold']}/s{row['model'].rsplit('-s', 1)[1]}/{row['fraction']:g}/onp"
    n = lengths(row["acc"])["deployed"]
    return protocol.get(key) == row["order"][: sum(row["steps"][: n + 1])]


def report() -> None:
    rows = read_stopping(RESULTS)
    protocol = {r["key"]: r["units"] for r in read_protocol(PROTOCOL) if r.get("method") == "onp"}
    lines = [
        "# When should ONP stop? A defense-accuracy limit calibrated on shadow models",
        "",
        "Generated by `python benchmarks/onp_stopping.py` from `onp_stopping.jsonl` alone. Agent: the "
        "configuration as shipped (`onp` in onp.md), one per held-out attack, trained on shadow models "
        "of the four others (benchmarks/results/onp.md). `deployed`: the environment's rule (stop after the "
        f"step whose defense-accuracy drop exceeds {DEPLOYED:g}); limit t: keep the steps before the first "
        "drop above t. `picked`: per fold and fraction, the limit with the best mean DER on that fold's "
        "shadow models measured on their defense images (trigger known there); the held-out models play no "
        "part in the pick. Held-out rows: test split, mean ± std over models, in %; ACC lost in points.",
        "",
    ]
    for fraction in FRACTIONS:
        held = [r for r in rows if r["role"] == "held-out" and r["fraction"] == fraction]
        folds = sorted({r["fold"] for r in held}, key=ATTACKS.index)
        picks = {f: picked(rows, f, fraction) for f in folds}
        lines += [f"## {fraction:.0%} defense data ({len(held)} held-out models; folds: {', '.join(folds)})", "",
                  "| rule | ACC lost | ASR % | DER % | pruned |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        rules = ["deployed", "picked", *[f"{t:g}" for t in GRID]]
        for rule in rules:
            sel = []
            for r in held:
                pick = picks[r["fold"]]
                if rule == "picked" and pick is None:
                    break
                n = lengths(r["acc"])[pick[0] if rule == "picked" else rule]
                sel.append((r["before"], r["test"][str(n)], sum(r["steps"][: n + 1])))
            else:
                if sel:
                    name = {"deployed": "deployed (as in onp.md)", "picked": "**picked on shadow models**"}
                    lost, asr = [b["acc"] - a["acc"] for b, a, _ in sel], [a["asr"] for _, a, _ in sel]
                    lines.append(
                        f"| {name.get(rule, f'limit {rule}')} | {_ms(lost)} | {_ms(asr)} | "
                        f"{_ms([a['der'] for _, a, _ in sel])} | {_ms([n for *_, n in sel], 1)} |"
                    )
        grid = {t: statistics.fmean(r["test"][str(lengths(r["acc"])[f"{t:g}"])]["der"] for r in held) for t in GRID}
        same = sum(_reproduces(r, protocol) for r in held)
        lines += ["", f"Across the grid the held-out mean DER spans {min(grid.values()):.1%} (limit "
                  f"{min(grid, key=grid.get):g}) to {max(grid.values()):.1%} (limit {max(grid, key=grid.get):g}; "
                  "a choice made with the test models, so not a defense). The deployed rule's units equal those of "
                  f"the protocol's run (onp.jsonl) on {same} of {len(held)} models."]  # fmt: skip
        lines += ["", "Limit picked per fold (its mean DER on the shadow models' defense images): "
                  + ", ".join(f"{f} {p[0]} ({p[1]:.1%})" if p else f"{f} (shadow models missing)"
                              for f, p in picks.items()), ""]  # fmt: skip
    write_text_atomic(RESULTS.with_suffix(".md"), "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        run(args.workers)
    report()


if __name__ == "__main__":
    exit_2_on_bad_input(main)
