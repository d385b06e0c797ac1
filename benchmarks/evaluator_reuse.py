"""What the Evaluator's reuse of a Linear unit layer's output buys, as ratios inside one run.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/evaluator_reuse.py [--repeats 5] [--model badnets-000]

cProfile of `repair_sweep` at 5% defense data (3000 images) put most of verdict's sweep in the `fc` layer's matmul,
run again after every cut although only its mask changed. onp_env.env.evaluator now keeps a unit layer's output
before its hooks where it is at most half its inputs' size and runs only the masks on it. Measured here on a sampled
shadow model's small CNN and defense images, one torch thread, alternating repeats (medians), the reuse on and off
(`_plain_hooks` forced false, which calls every module as before):

1. a sweep's loop: 60 cuts of `fc` units one at a time, the logits after each (what NC's and verdict's sweeps run);
2. an environment episode of up to 30 steps pruning `fc` units (NeuronPruningEnv, default features), the same actions;
3. one of conv units (`features.5`), where nothing is reused (its output is larger than its input): the control.

Identical: every logit (1) and every reward (2, 3) bit for bit. Writes benchmarks/results/evaluator_reuse.md."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from rows import exit_2_on_bad_input
from signal_models import CACHE, HERE, sampled_and_held_out

import onp_env.env.evaluator as evaluator
from onp_env import build_artifact, load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.defend import defense_subset
from onp_env.env import NeuronPruningEnv, PruningTarget
from onp_env.env.evaluator import Evaluator, without_inplace
from onp_env.graph.units import find_units
from onp_env.masking import Masks


@contextmanager
def reuse(on: bool):
    plain = evaluator._plain_hooks
    if not on:
        evaluator._plain_hooks = lambda module: False
    try:
        yield
    finally:
        evaluator._plain_hooks = plain


def sweep_loop(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    work = without_inplace(model).eval()
    layout, gm = find_units(work, x[:2])
    fc = layout.by_name["fc"]

    def run() -> list[torch.Tensor]:
        out = []
        with Masks(work, layout) as masks, torch.no_grad():
            ev = Evaluator(gm, x, ["fc"])
            ev.logits()
            for c in range(60):
                masks.prune([fc.offset + c])
                out.append(ev.logits(["fc"]).clone())
        return out

    return run


def episode(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str) -> Callable[[], list[float]]:
    def run() -> list[float]:
        env = NeuronPruningEnv(targets=[PruningTarget("m", model, x, y)], score="none")
        env.reset(seed=0)
        lay = env.task.layout.by_name[layer]
        rewards = []
        for c in range(30):  # until the episode ends (its budget or accuracy limit) if it ends first
            _, reward, term, trunc, _ = env.step(lay.offset + c)
            rewards.append(float(reward))
            if term or trunc:
                break
        return rewards

    return run


def timed(run: Callable[[], list], repeats: int) -> tuple[float, float, bool]:
    """(median seconds without reuse, with it, identical outputs), the two alternating."""
    times: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, list] = {}
    for i in range(repeats):
        for on in (False, True) if i % 2 == 0 else (True, False):
            with reuse(on):
                start = time.perf_counter()
                outs[on] = run()
                times[on].append(time.perf_counter() - start)
    same = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(outs[False], outs[True], strict=True))  # fmt: skip
    return statistics.median(times[False]), statistics.median(times[True]), same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="badnets-000", help="part of a sampled shadow model's name")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=HERE / "results" / "evaluator_reuse.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    name, _, lab = next(m for m in sampled_and_held_out() if m[1] == "shadow" and args.model in m[0])
    art = load_artifact(build_artifact(lab, CACHE, progress=False))
    x, y = defense_subset(art, args.fraction)
    rows = []
    runs = {
        "sweep loop, 60 `fc` cuts": sweep_loop(art.model, x),
        "env episode, up to 30 `fc` steps": episode(art.model, x, y, "fc"),
        "env episode, up to 30 `features.5` steps (control)": episode(art.model, x, y, "features.5"),
    }
    for label, run in runs.items():
        off, on, same = timed(run, args.repeats)
        rows.append(f"| {label} | {off:.3f} | {on:.3f} | {off / on:.2f}x | {same} |")
    lines = [
        "# The Evaluator's reuse of a Linear unit layer's output",
        "",
        f"Generated by `python benchmarks/evaluator_reuse.py` on {platform.node()}, torch {torch.__version__}: "
        f"{name}, {len(x)} defense images ({args.fraction:.0%}), one torch thread, medians of {args.repeats} "
        "alternating repeats.",
        "",
        "| run | every layer run s | reuse s | speed-up | identical |",
        "|---|---:|---:|---:|---|",
        *rows,
    ]
    lines += [
        "",
        "Read: where a run is mostly the Linear layer's evaluations after each cut (a sweep's loop) the reuse nearly "
        "halves it; an environment step spends its time elsewhere (observations, dynamic features), so episodes "
        "do not move, and conv layers are never reused.",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    exit_2_on_bad_input(main)
