"""Where one deployment's seconds go: cProfile of an `onp defend` run of an onp_vs_baselines.SETTINGS entry.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/deploy_profile.py \
        [--setting "shipped agent verdict repair"] [--fraction 0.05] [--model badnets-000] [--top 40]

deploy_cost.py says how long a defense takes against ANP; this says which stages take it, before any speed-up
is tried. The model is the sampled shadow model whose name contains --model (configs/agent/fashion-mnist-sampled.
yaml), one torch thread, this process's memos empty (as in a fresh `onp defend`). Prints the run's seconds as
`onp defend` reports them, then the functions with the most cumulative time (profiling adds about a third)."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch
from onp_vs_baselines import BEFORE_VERIFY, SETTINGS
from rows import exit_2_on_bad_input
from signal_models import CACHE, sampled_and_held_out

from onp_env import build_artifact
from onp_env.defend import defend_artifact
from onp_env.errors import OnpError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default=BEFORE_VERIFY)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--model", default="badnets-000", help="part of a sampled shadow model's name")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    labs = [lab for name, role, lab in sampled_and_held_out() if role == "shadow" and args.model in name]
    if not labs:
        raise OnpError(f"no sampled shadow model's name contains {args.model!r}: try badnets-000 or sig-003")
    torch.set_num_threads(1)
    path = build_artifact(labs[0], CACHE, progress=False)
    method, params = SETTINGS[args.setting]
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        profile.enable()
        _, report = defend_artifact(path, method, {**params, "defense_fraction": args.fraction}, Path(tmp) / "out")
        profile.disable()
    print(f"{labs[0].name}, {args.setting}, {args.fraction:.0%} defense data: {report['seconds']} s (onp defend's)")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
