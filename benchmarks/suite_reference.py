"""Reference scores of a task suite: every policy on every split, then benchmarks/results/suite.md.

    python benchmarks/suite_reference.py --suite digits-v0
    python benchmarks/suite_reference.py --suite digits-v0 --agent gnn=benchmarks/runs/suite/digits-gnn-s0/agent

The policies: STOP, random, magnitude and every heuristic (as policies in the env, planning on the
model and its clean defense set), the oracle expert (the ceiling, which uses the trigger), and each
--agent (LABEL=DIR of `onp train-agent`, trained on the suite's train split only; its seed and env
steps are read from its agent.json). Resumable: every episode is one line of
benchmarks/results/suite-{suite}.jsonl, and an episode already there is not run again; suite.md is
regenerated from every suite-*.jsonl alone."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from onp_env.artifacts import write_text_atomic
from onp_env.suite.evaluate import evaluate, make_env, read_suite_rows
from onp_env.suite.policies import make_policy
from onp_env.suite.report import report_md
from onp_env.suite.spec import SPLITS, get_suite

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = HERE / "runs" / "suite"
POLICIES = ("stop", "random", "magnitude", "mnp", "anp", "rnp", "bnp", "fp", "clp", "nc", "oracle")


def run(args: argparse.Namespace) -> None:
    spec = get_suite(args.suite)
    out = RESULTS / f"suite-{spec.name}.jsonl"
    rows = read_suite_rows(out) if out.is_file() else []  # a first run starts the file
    done = {(r["policy"], r["split"], r["seed"], r["model"]) for r in rows}
    jobs: list[tuple[str, str, dict, int, int | None]] = [(p, p, {}, 0, None) for p in args.policies]
    for item in args.agent:
        label, _, folder = item.partition("=")
        training = json.loads((Path(folder) / "agent.json").read_text())["training"]
        jobs.append((label, "onp", {"agent": folder}, int(training["seed"]), int(training["steps"])))
    for seed in args.sb3_mlp:
        path, steps = train_sb3_mlp(spec.name, seed, args.sb3_steps, args.quiet)
        jobs.append(("maskable-ppo-mlp", "sb3-mlp", {"path": str(path)}, seed, steps))
    for split in args.splits:
        env = make_env(spec.name, split, progress=not args.quiet)
        for label, policy, params, seed, steps in jobs:
            todo = [m for m in env.names if (label, split, seed, m) not in done]
            if todo:
                start = time.perf_counter()
                chosen = SB3Policy(params["path"]) if policy == "sb3-mlp" else make_policy(policy, params, seed)
                evaluate(chosen, spec.name, split, name=label, seed=seed, models=todo, out=out, env=env,
                         progress=not args.quiet, train_steps=steps)  # fmt: skip
                print(f"{label} on {split}: {len(todo)} models in {time.perf_counter() - start:.0f} s")
    report()


def train_sb3_mlp(suite: str, seed: int, steps: int, quiet: bool) -> tuple[Path, int]:
    """sb3-contrib's MaskablePPO with SB3's generic MultiInputPolicy (an MLP over the flattened, padded
    observation) on the train split, at SB3's default hyperparameters; trained once, then loaded."""
    from sb3_contrib import MaskablePPO

    path = RUNS / f"{suite}-maskable-ppo-mlp-s{seed}-{steps}.zip"
    if not path.is_file():
        env = make_env(suite, "train", progress=not quiet)
        model = MaskablePPO("MultiInputPolicy", env, seed=seed, device="cpu", verbose=0)
        start = time.perf_counter()
        model.learn(steps, progress_bar=not quiet)
        print(f"MaskablePPO MultiInputPolicy seed {seed}: {steps} steps in {time.perf_counter() - start:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    return path, steps


class SB3Policy:
    """A saved MaskablePPO as a suite policy: its deterministic action under the env's mask."""

    def __init__(self, path: str):
        from sb3_contrib import MaskablePPO

        self.model = MaskablePPO.load(path, device="cpu")

    def act(self, env, obs, info):
        action, _ = self.model.predict(obs, action_masks=info["action_mask"], deterministic=True)
        return int(action)


def report() -> None:
    rows = [r for path in sorted(RESULTS.glob("suite-*.jsonl")) for r in read_suite_rows(path)]
    machine = f"{platform.machine()}, 2-core shared CPU, torch {torch.__version__}, one thread"
    text = report_md(rows, machine)
    write_text_atomic(RESULTS / "suite.md", "# Task suites: reference scores\n\n" + text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="digits-v0")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--agent", action="append", default=[], metavar="LABEL=DIR", help="a trained agent")
    p.add_argument("--sb3-mlp", nargs="*", type=int, default=[], metavar="SEED",
                   help="train and score MaskablePPO with MultiInputPolicy with these seeds")  # fmt: skip
    p.add_argument("--sb3-steps", type=int, default=8192, help="its environment steps")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.report_only:
        report()
    else:
        run(args)


if __name__ == "__main__":
    from rows import exit_2_on_bad_input

    exit_2_on_bad_input(main)
