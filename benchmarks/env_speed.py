"""Speed of NeuronPruningEnv, measured as ratios inside one run (the host is shared and noisy).

    python benchmarks/env_speed.py [--steps 60] [--threads 1]

1. Steps per second with and without the downstream activation cache, same action sequence, for
   the small CNN on Fashion-MNIST (the BadNets artifact of configs/attack/) and PreAct-ResNet-18
   (random weights, 28x28 inputs); also checks that both give identical rewards.
2. Episodes per second when every reset restores the first reset's full pass (the default) or runs
   it again, for short training-like episodes of the protocol's agent settings; same rewards checked.
3. Graph build time, edges and observation bytes against the number of units.
Writes benchmarks/results/env_speed.md."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from onp_env import build_artifact, load_config
from onp_env.artifacts import write_text_atomic
from onp_env.attacks import build_attack
from onp_env.config import LabConfig
from onp_env.env import NeuronPruningEnv, PruningTarget
from onp_env.graph.build import build_graph
from onp_env.graph.units import find_units
from onp_env.models import build_model

HERE = Path(__file__).resolve().parent


def random_target(name: str, arch: str, shape=(1, 28, 28), n: int = 512, **kw) -> PruningTarget:
    """Random weights and images, with a BadNets trigger so the oracle score can be measured."""
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, **kw).eval()
    trigger = build_attack("badnets", shape, 10, params={"patch_size": 3})
    return PruningTarget(name, model, torch.rand(n, *shape), torch.arange(n) % 10, trigger)


def steps_per_second(target: PruningTarget, steps: int, cache: bool, eval_images: int):
    env = NeuronPruningEnv(targets=[target], cache=cache, eval_images=eval_images, budget=1.0, max_acc_drop=1.0)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.permutation(env.num_units)[:steps]
    rewards = []
    start = time.perf_counter()
    for a in actions:
        _, r, term, _, _ = env.step(int(a))
        rewards.append(r)
        if term:
            break
    return len(rewards) / (time.perf_counter() - start), rewards


def speed_table(steps: int, cnn_target: PruningTarget) -> list[str]:
    cases = [
        ("small CNN, Fashion-MNIST BadNets", cnn_target, 512),
        ("PreAct-ResNet-18 (random weights)", random_target("preact", "preact_resnet18"), 128),
    ]
    rows = ["| model | units | eval images | steps/s cached | steps/s full | speedup | identical rewards |",
            "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for label, target, n_eval in cases:
        fast, r1 = steps_per_second(target, steps, True, n_eval)
        slow, r2 = steps_per_second(target, steps, False, n_eval)
        units = sum(lay.size for lay in find_units(target.model, target.x[:2])[0].layers)
        rows.append(f"| {label} | {units} | {n_eval} | {fast:.1f} | {slow:.1f} | {fast / slow:.2f}x | {r1 == r2} |")
        print(rows[-1], flush=True)
    return rows


def episodes_per_second(target: PruningTarget, episodes: int, restore: bool) -> tuple[float, list[float]]:
    """Ten random units per episode, with the protocol agent's settings (configs/agent/fashion-mnist.yaml)."""
    env = NeuronPruningEnv(targets=[target], features=["dynamic"], eval_images=256, budget=1.0, max_acc_drop=1.0)
    rng, rewards = np.random.default_rng(0), []
    start = time.perf_counter()
    for k in range(episodes):
        if not restore:
            env.task._start = None
        env.reset(seed=k)
        for a in rng.permutation(env.num_units)[:10]:
            rewards.append(env.step(int(a))[1])
    return episodes / (time.perf_counter() - start), rewards


def reset_table(episodes: int, cnn_target: PruningTarget) -> list[str]:
    fast, r1 = episodes_per_second(cnn_target, episodes, True)
    slow, r2 = episodes_per_second(cnn_target, episodes, False)
    rows = ["| model | episodes | episodes/s restored | episodes/s full pass | speedup | identical rewards |",
            "|---|---:|---:|---:|---:|---|",
            f"| small CNN, Fashion-MNIST BadNets | {episodes} | {fast:.2f} | {slow:.2f} | {fast / slow:.2f}x "
            f"| {r1 == r2} |"]  # fmt: skip
    print(rows[-1], flush=True)
    return rows


def graph_table() -> list[str]:
    cases = [
        ("small_cnn", {"channels": [8, 16], "hidden": 64}),
        ("small_cnn", {}),
        ("vgg", {"width": 0.5}),
        ("vgg", {}),
        ("preact_resnet18", {"width": 0.25}),
        ("preact_resnet18", {"width": 0.5}),
        ("preact_resnet18", {}),
    ]
    rows = ["| model | kwargs | units | edges | graph build s | observation bytes | bytes per unit |",
            "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for arch, kw in cases:
        t = random_target(arch, arch, n=256, **kw)
        layout, _ = find_units(t.model, t.x[:2])
        start = time.perf_counter()
        g = build_graph(t.model, layout, t.x, t.y)
        seconds = time.perf_counter() - start
        env = NeuronPruningEnv(targets=[t], eval_images=32)
        obs, _ = env.reset(seed=0)
        nbytes = sum(v.nbytes for v in obs.values())
        rows.append(f"| {arch} | {kw or ''} | {g.num_nodes} | {g.edge_index.shape[1]} | {seconds:.2f} "
                    f"| {nbytes:,} | {nbytes / g.num_nodes:,.0f} |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=HERE / "results" / "env_speed.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(LabConfig, HERE.parent / "configs/attack/badnets-fashion-mnist.yaml")
    cnn = PruningTarget.from_artifact(build_artifact(cfg))
    lines = [
        "# Environment speed",
        "",
        f"`python benchmarks/env_speed.py --steps {args.steps} --threads {args.threads}`; "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s). "
        "Each row's two columns come from the same run and the same random action sequence; "
        "absolute numbers vary with the host's load, ratios much less.",
        "",
        "## Steps per second: downstream cache versus full re-evaluation",
        "",
        "Each step prunes one unit and re-evaluates clean and triggered defense images (oracle score).",
        "",
        *speed_table(args.steps, cnn),
        "",
        "## Resets: the first reset's pass restored versus run again",
        "",
        "Episodes of 10 random units after a reset (dynamic features, 256 evaluation images: the protocol "
        "agent's settings); every episode starts from the same unpruned model.",
        "",
        *reset_table(max(args.steps // 2, 5), cnn),
        "",
        "## Graph size, build time and observation bytes",
        "",
        "Random weights, 256 defense images of 28x28; defaults k = 8, tau = 0.5, k_intra = 4.",
        "",
        *graph_table(),
    ]
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.results, text)
    print(text)


if __name__ == "__main__":
    main()
