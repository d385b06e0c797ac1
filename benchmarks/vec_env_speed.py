"""Does SubprocVecEnv pay on this machine? PPO throughput of the graph policy with one env, two envs
in one process (DummyVecEnv) and two envs in two processes (SubprocVecEnv), on the embedded digits
model and, with --dataset fashion-mnist, on a Fashion-MNIST shadow model.

    python benchmarks/vec_env_speed.py [--steps 2048] [--dataset digits]

Writes benchmarks/results/vec_env_speed.md. Timings on a shared machine are noisy: compare the
ratios within one run, not across runs."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from agents.policy import GraphMaskablePolicy
from onp_env.artifacts import write_text_atomic
from onp_env.env import NeuronPruningEnv

HERE = Path(__file__).resolve().parent


def make(artifacts: list[str]):
    def build():
        torch.set_num_threads(1)
        return NeuronPruningEnv(artifacts=artifacts, features=["dynamic"], eval_images=256)

    return build


def throughput(vec, steps: int) -> float:
    model = MaskablePPO(GraphMaskablePolicy, vec, n_steps=256 // vec.num_envs, batch_size=64, n_epochs=4, seed=0)
    model.learn(256)  # warm-up: first rollout and update
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    vec.close()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2048)
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--results", type=Path, default=HERE / "results" / "vec_env_speed.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.dataset == "digits":
        from onp_env.zoo import default_artifact

        artifacts = [str(default_artifact())]
    else:
        from agents.config import load_agent_config
        from agents.train import build_zoo

        one = ["zoo.attacks=[{name: blended, params: {alpha: 0.2, pattern: random}}]", "zoo.seeds=[1]"]
        cfg = load_agent_config(str(HERE.parent / "configs" / "agent" / "fashion-mnist.yaml"), one)
        artifacts = build_zoo(cfg, progress=False)
    rows = [
        ("1 env", throughput(DummyVecEnv([make(artifacts)]), args.steps)),
        ("2 envs, DummyVecEnv", throughput(DummyVecEnv([make(artifacts)] * 2), args.steps)),
        ("2 envs, SubprocVecEnv", throughput(SubprocVecEnv([make(artifacts)] * 2, start_method="spawn"), args.steps)),
    ]
    base = rows[0][1]
    lines = [
        f"# PPO throughput with vector envs ({args.dataset}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/vec_env_speed.py --dataset {args.dataset}`: MaskablePPO with the graph policy (GCN), "
        f"256 steps per update, 4 epochs, {args.steps} timed steps after a warm-up; 1 torch thread per process.",
        "",
        "| setup | steps/s | vs 1 env |",
        "|---|---:|---:|",
        *(f"| {name} | {v:.1f} | {v / base:.2f}x |" for name, v in rows),
        "",
    ]
    write_text_atomic(args.results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
