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


# measure -> (function of the seed, {quantity: (the test's bar as text, whether a value passes)})
Bars = dict[str, tuple[str, Callable[[float], bool]]]
MEASURES: dict[str, tuple[Callable[[int], dict[str, float]], Bars]] = {
    **{
        f"attack quality: {a}": (
            lambda s, a=a: test_attack_quality.attack_quality(a, s),
            {"asr": (">= 0.90", lambda v: v >= 0.90), "acc_lost": ("<= 0.03", lambda v: v <= 0.03)},
        )
        for a in ("badnets", "blended", "wanet", "trojannn")
    },
    **{
        f"planted unit ranked first: {m}": (
            lambda s, m=m: test_baselines.planted_unit_rank(m, s),
            {
                "above": ("== 0", lambda v: v == 0),
                "pruned": ("== 1", lambda v: v == 1),
                "tied_top_share": ("< 0.15", lambda v: v < 0.15),
            },
        )
        for m in test_baselines.MASK_LEARNERS
    },
    "MNP suppression spares the planted unit": (
        test_baselines.mnp_suppression,
        {"reached": ("== 1", lambda v: v == 1), "margin": ("> 0", lambda v: v > 0)},
    ),
    "RNP unlearning on the default model": (
        test_baselines.rnp_unlearning,
        {
            "reached": ("== 1", lambda v: v == 1),
            "final_batch_acc": ("<= 0.2", lambda v: v <= 0.2),
            "pruned": ("> 0", lambda v: v > 0),
        },
    ),
    "BNP finds a dead unit": (
        test_baselines.bnp_dead_unit,
        {"position": ("< 9", lambda v: v < 9), "tuned_bias": ("< 0.3", lambda v: v < 0.3)},
    ),
    "ANP masks move in 20 iterations": (test_baselines.anp_masks_move, {"min_mask": ("< 1", lambda v: v < 1)}),
    "TrojanNN trigger excites its neuron (MLP)": (
        test_attacks.trojannn_excitation,
        {"triggered_minus_clean": ("> 0", lambda v: v > 0)},
    ),
    "TrojanNN trigger excites its neuron (tiny CNN)": (
        test_zoo.tiny_trojannn_excitation,
        {"triggered_minus_clean": ("> 0", lambda v: v > 0)},
    ),
    "oracle prunes 12 units of the default model": (
        test_env.oracle_pruning,
        {"asr": ("< 0.2", lambda v: v < 0.2), "acc": ("> 0.8", lambda v: v > 0.8)},
    ),
    "behaviour cloning lowers its loss": (
        test_agents.behaviour_cloning_loss,
        {"last_over_first": ("< 0.8", lambda v: v < 0.8)},
    ),
    "tiny agent prunes a ResNet (sampled)": (resnet_deploy, {"pruned": ("> 0", lambda v: v > 0)}),
    "README MNP example keeps accuracy": (test_readme.own_model_accuracy, {"acc": ("> 0.5", lambda v: v > 0.5)}),
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
        "`misses`: seeds whose value fails the test's bar.",
        "",
        "| measure | quantity | bar | seed 0 | min | median | max | misses |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, (_, bars) in MEASURES.items():
        got = {r["seed"]: r["values"] for r in rows if r["measure"] == name and r["seed"] < seeds}
        if not got:
            continue
        for quantity, (bar, ok) in bars.items():
            values = [got[s][quantity] for s in sorted(got)]
            misses = [s for s in sorted(got) if not ok(got[s][quantity])]
            shown = f"{len(misses)} of {len(values)}" + (f" (seeds {', '.join(map(str, misses))})" if misses else "")
            lines.append(
                f"| {name} | {quantity} | {bar} | {_fmt(got[0][quantity]) if 0 in got else '-'} | {_fmt(min(values))} "
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
