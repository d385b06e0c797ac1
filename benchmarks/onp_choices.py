"""Does the learned policy rank the oracle's units as well as the signals it reads? Leave-one-attack-out.

    python benchmarks/onp_choices.py [--variants "log-z signals" ...] [--workers 2]

For each trained fold agent of benchmarks/onp_vs_baselines.py (benchmarks/runs/onp-sampled/
without-ATTACK/VARIANT/agent, trained without ATTACK) and each held-out model of ATTACK in the
protocol's cache (seeds 102-106, 5% defense data), along the agent's own deterministic deployment:
ROC-AUC of the policy's unit logits over the units left against the oracle's 12 units left (largest
clean-vs-triggered activation gap: uses the trigger, analysis only), beside that of each signal
column it reads; its probability on the oracle's units and on STOP; how many of the oracle's units
the episode cuts; and the clean activity (`act_mean`, z-scored in its layer) of its first top 3 and
of the oracle's top 3. The shipped agent, trained with every attack, gives the in-range reference.
A signal-mode agent (env.action_mode=signal) is ranked by its unit head (its logits before they are
read at the nominees); its probability on the oracle's units is that of the columns nominating one,
and each step records the column it follows, beside the verdict signal with the larger anomaly index.
One row per (variant, model) appended to benchmarks/results/onp_choices.jsonl
(resumable); writes onp_choices.md.
The results files were made with the agent shipped until 2026-12-05 (with MNP's signal); a run now measures the one
that ships since (configs/agent/fashion-mnist-sampled-no-mnp.yaml)."""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from feature_separability import auc, oracle_gap
from rows import exit_2_on_bad_input, read_choices
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "onp_choices.jsonl"
RUNS = HERE / "runs" / "onp-sampled"
CACHE = HERE / "runs" / "cache"
ATTACKS = ("badnets", "blended", "wanet", "sig", "trojannn")
SEEDS = (102, 103, 104, 105, 106)
FRACTION = 0.05
TOP = 12


def models(attack: str) -> list[tuple[int, Path]]:
    """(seed, artifact) of the protocol's held-out models of `attack` found in the cache."""
    out = []
    for seed in SEEDS:
        found = sorted(p for p in CACHE.glob(f"held-out-{attack}-s{seed}-*") if "-reference-" not in p.name)
        out += [(seed, found[0])] if found else []
    return out


SHIPPED = "shipped agent (all attacks)"
"""The variant name of agents/pretrained/fashion-mnist: trained on every attack, one agent for all."""


def agent_dir(variant: str, attack: str) -> Path:
    if variant == SHIPPED:
        return HERE.parent / "agents" / "pretrained" / "fashion-mnist"
    return RUNS / f"without-{attack}" / variant.replace(" ", "-").replace("=", "-") / "agent"


def measure(variant: str, attack: str, seed: int, path: str) -> dict[str, Any]:
    import dataclasses

    import torch

    from agents.defense import act
    from agents.features import to_graph_batch
    from agents.io import load_agent
    from onp_env.artifacts import load_artifact
    from onp_env.defend import defense_subset
    from onp_env.env import NeuronPruningEnv, PruningTarget
    from onp_env.graph.features import FEATURES

    torch.set_num_threads(1)
    agent = load_agent(agent_dir(variant, attack))
    art = load_artifact(path)
    x, y = defense_subset(art, FRACTION)
    env = NeuronPruningEnv(agent.env, targets=[PruningTarget("held-out", art.model, x, y, None)])
    obs, _ = env.reset(seed=0)
    layout = env.task.layout
    gap = oracle_gap(art, layout, x, y)
    positive = torch.zeros(layout.num_units, dtype=torch.bool)
    positive[torch.argsort(-gap)[:TOP]] = True
    n = layout.num_units
    names = env.feature_names
    nodes = torch.as_tensor(obs["nodes"][:n])
    signals = {c[len("signal_") :]: auc(nodes[:, i], positive) for i, c in enumerate(names) if c.startswith("signal_")}
    activity = nodes[:, FEATURES.index("act_mean")]
    signal_mode = agent.env.action_mode == "signal"
    columns = [c for c in names if c.startswith("signal_")]
    glob = dict(zip(env.global_names, obs["globals"].tolist(), strict=True))
    larger = max(("inversion", "latent_gap"), key=lambda s: glob.get(f"{s}_anomaly", -1.0))
    path: dict[str, list[float]] = {"auc": [], "p_oracle": [], "p_stop": []}
    followed: list[str] = []
    first_top = None
    done = False
    while not done:  # the policy's own deployment path, deterministic as `onp defend` runs it
        with torch.no_grad():
            batch = {k: torch.as_tensor(v).float()[None] for k, v in obs.items()}
            g = to_graph_batch(batch, agent.policy.reverse_edges)
            choice, stop, _ = agent.net(g)
            unit = agent.net(dataclasses.replace(g, nominees=None))[0][0] if signal_mode else choice[0]
            logits = agent.net.neuron_logits(choice, stop)[0]
        valid = torch.as_tensor(env.action_masks())
        p = torch.softmax(logits.masked_fill(~valid, -torch.inf), 0)
        free = torch.as_tensor(~env.pruned[:n])
        left = positive & free
        if left.any() and (free & ~positive).any():
            path["auc"].append(auc(unit[:n][free], left[free]))
        if signal_mode:  # the columns whose nominee is one of the oracle's units left
            hits = valid[:-1] & left[torch.as_tensor(obs["nominees"])]
            path["p_oracle"].append(float(p[:-1][hits].sum()))
        else:
            path["p_oracle"].append(float(p[:n][left].sum()))
        path["p_stop"].append(float(p[-1]))
        if first_top is None:
            first_top = torch.argsort(-unit[:n].masked_fill(~free, -torch.inf))[:3]
        action = act(agent, env, obs)
        if signal_mode and action != env.stop_action:
            followed.append(columns[action][len("signal_") :])
        obs, _, term, trunc, _ = env.step(action)
        done = term or trunc
    oracle_top = torch.argsort(-gap)[:3]
    return {
        "key": f"{variant}/{attack}/s{seed}", "variant": variant, "attack": attack, "seed": seed,
        "auc_signals": signals, "auc_path": path["auc"], "p_oracle_path": path["p_oracle"],
        "p_stop_path": path["p_stop"], "pruned": int(env.pruned.sum()),
        "oracle_pruned": int((positive & torch.as_tensor(env.pruned)).sum()),
        "activity_policy_top3": float(activity[first_top].mean()),
        "activity_oracle_top3": float(activity[oracle_top].mean()),
        "oracle_top3_layers": [layout.locate(int(u))[0].name for u in oracle_top],
        **({"followed": followed, "larger_verdict": larger} if signal_mode else {}),
    }  # fmt: skip


def _mean(v: list[float]) -> str:
    import numpy as np

    return f"{np.mean(v):.2f}" if v else "-"


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Does the policy rank the oracle's units as well as its signals do? (leave-one-attack-out)",
        "",
        "Generated by `python benchmarks/onp_choices.py` from `onp_choices.jsonl`. Each fold agent (trained "
        "without the attack) deployed as `onp defend` runs it on the protocol's held-out models of the attack "
        f"(seeds {SEEDS[0]}-{SEEDS[-1]} where built, {FRACTION:g} defense data). Positives: the oracle's {TOP} units "
        "(largest clean-vs-triggered activation gap: uses the trigger, analysis only). `AUC signal`: each signal "
        "column of the first observation (log-z per layer), over all units. `AUC policy`: the policy's unit "
        "logits over the units not yet pruned against the oracle's units not yet pruned, at the first step and "
        f"averaged over the episode's steps. `P(oracle)`: the policy's probability on the oracle's {TOP} still "
        "there, first and last step; `P(stop)` at the last step. `cut / of 12`: units the episode pruned, and "
        "how many of them are the oracle's 12. `activity`: clean `act_mean` (z in its layer) of the policy's "
        "top 3 at the first step and of the oracle's top 3.",
        "",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sets = list(dict.fromkeys(k for r in rows if r["variant"] == variant for k in r["auc_signals"]))
        lines += [f"## {variant}", "",
                  "| held-out attack | models | " + " | ".join(f"AUC {s}" for s in sets)
                  + " | AUC policy, step 1 | AUC policy, episode | P(oracle) first | P(oracle) last | P(stop) last "
                  "| cut | of 12 | activity policy top 3 | activity oracle top 3 | oracle top-3 layers |",
                  "|---|---:|" + "---:|" * len(sets) + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for attack in ATTACKS:
            group = [r for r in rows if r["variant"] == variant and r["attack"] == attack]
            if not group:
                continue
            layers = sorted({la for r in group for la in r["oracle_top3_layers"]})
            cells = [_mean([r["auc_signals"][s] for r in group if s in r["auc_signals"]]) for s in sets]
            paths = [r for r in group if r["auc_path"]]
            episode = _mean([sum(r["auc_path"]) / len(r["auc_path"]) for r in paths])
            lines.append(
                f"| {attack} | {len(group)} | " + " | ".join(cells)
                + f" | {_mean([r['auc_path'][0] for r in paths])} | {episode}"
                f" | {_mean([r['p_oracle_path'][0] for r in group])} | {_mean([r['p_oracle_path'][-1] for r in group])}"
                f" | {_mean([r['p_stop_path'][-1] for r in group])} | {_mean([r['pruned'] for r in group])}"
                f" | {_mean([r['oracle_pruned'] for r in group])} | {_mean([r['activity_policy_top3'] for r in group])}"
                f" | {_mean([r['activity_oracle_top3'] for r in group])} | {', '.join(layers)} |"
            )  # fmt: skip
        lines.append("")
        lines += _followed(rows, variant)
    return "\n".join(lines)


def _followed(rows: list[dict[str, Any]], variant: str) -> list[str]:
    """Signal mode: the share of steps following each signal column, per held-out attack, and the share
    of models whose first step follows the verdict signal with the larger anomaly index."""
    group = [r for r in rows if r["variant"] == variant and "followed" in r]
    if not group:
        return []
    cols = list(dict.fromkeys(c for r in group for c in r["followed"]))
    lines = ["Columns followed (share of the steps that prune), and the first step against the verdict with the "
             "larger anomaly index (benchmarks/results/signal_verdicts.md: it names the target on 38 of 40 "
             "held-out models):", "",
             "| held-out attack | models | " + " | ".join(cols) + " | first step follows the larger verdict |",
             "|---|---:|" + "---:|" * len(cols) + "---:|"]  # fmt: skip
    for attack in ATTACKS:
        rs = [r for r in group if r["attack"] == attack]
        steps = [c for r in rs for c in r["followed"]]
        if not rs:
            continue
        shares = [f"{steps.count(c) / len(steps):.2f}" if steps else "-" for c in cols]
        first = sum(bool(r["followed"]) and r["followed"][0].startswith(r["larger_verdict"]) for r in rs)
        lines.append(f"| {attack} | {len(rs)} | " + " | ".join(shares) + f" | {first} of {len(rs)} |")
    return [*lines, ""]


def main() -> None:
    from onp_env.artifacts import write_text_atomic
    from onp_env.errors import OnpError
    from onp_env.results import append

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["log-z signals"],
        help=f"fold agents' variant names, or '{SHIPPED}' (trained with every attack: in range)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.workers < 1:
        raise OnpError(f"--workers must be at least 1, got {args.workers}")
    rows = read_choices(RESULTS)
    if not args.report_only:
        done = {r["key"] for r in rows}
        todo = [(v, a, s, str(path)) for v in args.variants for a in ATTACKS for s, path in models(a)
                if f"{v}/{a}/s{s}" not in done and agent_dir(v, a).is_dir()]  # fmt: skip
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(measure, *job) for job in todo]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="models"):
                append(RESULTS, fut.result())
        rows = read_choices(RESULTS)
    write_text_atomic(RESULTS.with_suffix(".md"), report(rows) + "\n")


if __name__ == "__main__":
    exit_2_on_bad_input(main)
