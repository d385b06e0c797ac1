"""PPO training throughput with the graph policy, before and after its fast paths, side by
side in one run: MaskablePPO (GCN, hidden 64, n_steps 256, batch 128, 4 epochs, one torch thread)
on the digits-v0 suite's train split, with 1 and 2 vector envs (DummyVecEnv), and where the time goes.

    python benchmarks/ppo_speed.py [--steps 1024] [--repeats 3]

"before" is the plain torch-geometric computation (GCNConv's gather / scatter, its normalisation
recomputed in each layer, pooling by scatter); "after" the fast paths of agents.gnn (FAST): each graph's
normalised propagation matrix built once and cached by its exact edges (a model's edges do not change
while it is pruned), one block-diagonal sparse product per layer and one for its gradient, views in
place of scatters when every graph fills the padded width, and the unit head's graph term computed
once per graph. The same numbers (tests/test_agents.py checks outputs and gradients).

The split of the time (env steps, the rest of rollout collection, the PPO update) comes from wrapping
the env's step and PPO's train() with timers. Writes benchmarks/results/ppo_speed.md. Timings on a
shared machine are noisy: compare ratios within a run."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import DummyVecEnv

import agents.gnn as gnn
from agents.policy import GraphMaskablePolicy
from onp_env.artifacts import write_text_atomic
from onp_env.suite.evaluate import make_env

HERE = Path(__file__).resolve().parent


class Timed:
    """Seconds spent in a callable, accumulated."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        start = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - start


def run(dense: bool, n_envs: int, steps: int) -> dict[str, float]:
    gnn.FAST = dense
    envs = [make_env("digits-v0", "train", progress=False) for _ in range(n_envs)]
    timers = []
    for e in envs:
        e.step = Timed(e.step)
        timers.append(e.step)
    vec = DummyVecEnv([(lambda e=e: e) for e in envs])
    model = MaskablePPO(GraphMaskablePolicy, vec, n_steps=256 // n_envs, batch_size=128, n_epochs=4, seed=0,
                        policy_kwargs={"policy": {"gnn": "gcn", "hidden": 64, "layers": 3}}, device="cpu")  # fmt: skip
    model.learn(256)  # warm-up: the first rollout and update
    train = Timed(model.train)
    model.train = train
    for t in timers:
        t.seconds = 0.0
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    total = time.perf_counter() - start
    env_s = sum(t.seconds for t in timers)
    return {"steps/s": steps / total, "update": train.seconds / total, "env": env_s / total,
            "rollout other": (total - train.seconds - env_s) / total}  # fmt: skip


def env_only(steps: int) -> float:
    env = make_env("digits-v0", "train", progress=False)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        free = np.flatnonzero(env.action_masks()[:-1])
        _, _, term, trunc, _ = env.step(int(rng.choice(free)))
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over the four settings, interleaved (a drifting host load hits each alike); "
                   "each row is the round with the median steps/s")  # fmt: skip
    p.add_argument("--results", type=Path, default=HERE / "results" / "ppo_speed.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs: dict[tuple[int, bool], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for n_envs in (1, 2):
            for dense in (False, True):
                r = run(dense, n_envs, args.steps)
                runs.setdefault((n_envs, dense), []).append(r)
                print(n_envs, dense, r)
    rows = [(n, d, sorted(rs, key=lambda r: r["steps/s"])[len(rs) // 2]) for (n, d), rs in runs.items()]
    base = rows[0][2]["steps/s"]
    random_steps = env_only(2000)
    lines = [
        "# PPO throughput of the graph policy: before and after its fast paths",
        "",
        f"`python benchmarks/ppo_speed.py --steps {args.steps}` on {platform.machine()} ({os.cpu_count()} cores, "
        f"shared), torch {torch.__version__}, one thread: MaskablePPO with the graph policy (GCN, hidden 64, "
        f"3 layers), n_steps 256 in all (split over the envs), batch 128, 4 epochs, on the digits-v0 train split; "
        f"{args.steps} timed steps after a 256-step warm-up; {args.repeats} interleaved round(s), the median "
        f"shown. The env alone takes {random_steps:.0f} random valid steps/s.",
        "",
        "| vector envs | policy computation | PPO steps/s | vs before, 1 env | PPO update | env steps "
        "| rest of rollouts |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *(f"| {n} | {'fast paths (after)' if d else 'torch-geometric (before)'} | {r['steps/s']:.1f} | "
          f"{r['steps/s'] / base:.2f}x | {100 * r['update']:.0f}% | {100 * r['env']:.0f}% | "
          f"{100 * r['rollout other']:.0f}% |" for n, d, r in rows),
        "",
    ]  # fmt: skip
    write_text_atomic(args.results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
