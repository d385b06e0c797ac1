"""How much room the learning tests' thresholds leave: every test that trains something and asserts a
bar on the outcome, measured over 20 seeds.

    python benchmarks/test_margins.py [--seeds 20]

Each measure is the function the test itself calls (tests/test_*.py), run with seeds 0..N-1 for
everything the test seeds (model training, defense, policy initialisation, sampled actions); the
tests run seed 0. Rows go to benchmarks/results/test_margins.jsonl as they finish (a rerun skips the
measured ones); benchmarks/results/test_margins.md tables the spread against each test's bar. A bar
that some seed misses is a bar that holds by luck: the table says how many."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests package: its measures are what this script runs

import torch  # noqa: E402
from rows import exit_2_on_bad_input, read_margins  # noqa: E402
from tqdm import tqdm  # noqa: E402

from onp_env.artifacts import write_text_atomic  # noqa: E402
from onp_env.results import append, end_last_line  # noqa: E402
from tests import (  # noqa: E402
    test_agents,
    test_attack_quality,
    test_attacks,
    test_baselines,
    test_env,
    test_readme,
    test_signals,
    test_zoo,
)

RESULTS = HERE / "results" / "test_margins.jsonl"
CACHE = HERE / "runs" / "margins-cache"


_agent: list[Path] = []


def tiny_agent() -> Path:
    """The tiny agent of tests/test_agents.py (its `agent_dir` fixture), trained once per run."""
    if not _agent:
        from agents.config import load_agent_config
        from agents.train import train_agent

        folder = Path(tempfile.mkdtemp(prefix="margins-agent-"))
        cfg = load_agent_config(test_agents.CONFIG, test_agents.TINY)
        _agent.append(train_agent(cfg, folder / "tiny", progress=False))
    return _agent[0]


def resnet_deploy(seed: int) -> dict[str, float]:
    _, order, record = test_agents.deploy_on_a_resnet(tiny_agent(), seed)
    return {"pruned": record[-1]["pruned"]}


# measure -> (function of the seed, {quantity: (the test's bar as text, whether a seed's values pass)})
Bars = dict[str, tuple[str, Callable[[dict[str, float]], bool]]]


def bar(text: str, ok: Callable[[float], bool], quantity: str) -> tuple[str, Callable[[dict[str, float]], bool]]:
    return text, lambda values: ok(values[quantity])


MEASURES: dict[str, tuple[Callable[[int], dict[str, float]], Bars]] = {
    **{
        f"attack quality: {a}": (
            lambda s, a=a: test_attack_quality.attack_quality(a, s),
            {
                "asr": bar(f">= {low:.2f}", lambda v, low=low: v >= low, "asr"),
                "acc_lost": bar("<= 0.03", lambda v: v <= 0.03, "acc_lost"),
            },
        )
        for a, low in test_attack_quality.MIN_ASR.items()
    },
    **{
        f"planted unit ranked first: {m}": (
            lambda s, m=m: test_baselines.planted_unit_rank(m, s),
            {
                "above": bar("== 0" + (" (3 of seeds 0-4)" if m == "rnp" else ""), lambda v: v == 0, "above"),
                "pruned": bar("== 1" + (" (3 of seeds 0-4)" if m == "rnp" else ""), lambda v: v == 1, "pruned"),
                "tied_top_share": bar("< 0.25", lambda v: v < 0.25, "tied_top_share"),
            },
        )
        for m in test_baselines.MASK_LEARNERS
    },
    "MNP suppression spares the planted unit": (
        test_baselines.mnp_suppression,
        {
            "reached": bar("1 of seeds 0-4", lambda v: v == 1, "reached"),
            "margin": ("> 0.05 where reached", lambda values: not values["reached"] or values["margin"] > 0.05),
        },
    ),
    "RNP unlearning on the default model": (
        test_baselines.rnp_unlearning,
        {
            "reached": bar("== 1", lambda v: v == 1, "reached"),
            "final_batch_acc": bar("<= 0.2", lambda v: v <= 0.2, "final_batch_acc"),
            "pruned": bar("> 0", lambda v: v > 0, "pruned"),
        },
    ),
    "BNP finds a dead unit": (
        test_baselines.bnp_dead_unit,
        {
            "position": bar("< 9", lambda v: v < 9, "position"),
            "tuned_bias": bar("< 0.3", lambda v: v < 0.3, "tuned_bias"),
        },
    ),
    "ANP masks move in 20 iterations": (
        test_baselines.anp_masks_move,
        {"min_mask": bar("< 1", lambda v: v < 1, "min_mask")},
    ),
    "TrojanNN trigger excites its neuron (MLP)": (
        test_attacks.trojannn_excitation,
        {"triggered_minus_clean": bar("> 0", lambda v: v > 0, "triggered_minus_clean")},
    ),
    "TrojanNN trigger excites its neuron (tiny CNN)": (
        test_zoo.tiny_trojannn_excitation,
        {"triggered_minus_clean": bar("> 0", lambda v: v > 0, "triggered_minus_clean")},
    ),
    "oracle prunes 20 units of the default model": (
        test_env.oracle_pruning,
        {"asr": bar("< 0.2", lambda v: v < 0.2, "asr"), "acc": bar("> 0.8", lambda v: v > 0.8, "acc")},
    ),
    "behaviour cloning lowers its loss": (
        test_agents.behaviour_cloning_loss,
        {"last_over_first": bar("< 0.95", lambda v: v < 0.95, "last_over_first")},
    ),
    "tiny agent prunes a ResNet (sampled)": (resnet_deploy, {"pruned": bar("> 0", lambda v: v > 0, "pruned")}),
    "inversion on the BadNets model": (
        test_signals.inversion_on_badnets,
        {
            "names_target": bar("== 1", lambda v: v == 1, "names_target"),
            "anomaly_index": bar("> 1.5", lambda v: v > 1.5, "anomaly_index"),
            "auc_oracle_12": bar("> 0.75", lambda v: v > 0.75, "auc_oracle_12"),
        },
    ),
    "NC on the BadNets model": (
        lambda s: test_signals.nc_on("badnets", s),
        {
            "flagged": bar("== 1 (2 of seeds 0-2)", lambda v: v == 1, "flagged"),
            "names_target": bar("== 1", lambda v: v == 1, "names_target"),
            "pruned": ("> 0 where flagged", lambda values: not values["flagged"] or values["pruned"] > 0),
            "asr_after": ("< 0.6 where flagged", lambda values: not values["flagged"] or values["asr_after"] < 0.6),
            "acc_lost": bar("< 0.1", lambda v: v < 0.1, "acc_lost"),
        },
    ),
    "NC on the clean model": (
        lambda s: test_signals.nc_on("clean", s),
        {
            "flagged": bar("measured, not asserted", lambda v: v == 0, "flagged"),
            "pruned": bar("measured, not asserted", lambda v: v == 0, "pruned"),
        },
    ),
    "README MNP example keeps accuracy": (
        test_readme.own_model_accuracy,
        {"acc": bar("> 0.5", lambda v: v > 0.5, "acc")},
    ),
}


def measure(seeds: int) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in read_margins(RESULTS)}
    end_last_line(RESULTS)
    todo = [(name, s) for name in MEASURES for s in range(seeds) if f"{name}/{s}" not in done]
    for name, seed in tqdm(todo, desc="measures", unit="run"):
        start = time.perf_counter()
        values = MEASURES[name][0](seed)
        values = {k: float(v) for k, v in values.items()}
        append(RESULTS, {"key": f"{name}/{seed}", "measure": name, "seed": seed, "values": values,
                         "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def report(seeds: int) -> None:
    rows = read_margins(RESULTS)
    lines = [
        "# How much room the learning tests' thresholds leave",
        "",
        f"Generated by `python benchmarks/test_margins.py` from `test_margins.jsonl` on "
        f"{datetime.now(timezone.utc).date()} ({platform.machine()}, torch {torch.__version__}, 1 thread). "
        f"Each test that trains something and asserts a bar runs at seed 0; here its own measure "
        f"(the function it calls, in tests/) runs with seeds 0-{seeds - 1} for everything it seeds. "
        "`misses`: seeds whose value fails the test's bar. Where a property holds on most seeds but not "
        "all, the test asserts it on a majority of seeds 0-4 (the bar says so).",
        "",
        "| measure | quantity | bar | seed 0 | min | median | max | misses |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, (_, bars) in MEASURES.items():
        got = {r["seed"]: r["values"] for r in rows if r["measure"] == name and r["seed"] < seeds}
        if not got:
            continue
        for quantity, (text, ok) in bars.items():
            values = [got[s][quantity] for s in sorted(got)]
            misses = [s for s in sorted(got) if not ok(got[s])]
            shown = f"{len(misses)} of {len(values)}" + (f" (seeds {', '.join(map(str, misses))})" if misses else "")
            lines.append(
                f"| {name} | {quantity} | {text} | {_fmt(got[0][quantity]) if 0 in got else '-'} | {_fmt(min(values))} "
                f"| {_fmt(statistics.median(values))} | {_fmt(max(values))} | {shown} |"
            )
    write_text_atomic(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    os.environ["ONP_CACHE"] = str(CACHE)  # after the tests' conftest set its own: models persist across runs
    if not args.report_only:
        measure(args.seeds)
    report(args.seeds)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
