"""What onp_env.models.layers.max_pool_2x2 buys over PyTorch's pooling kernel, as ratios inside one run.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/pool_speed.py [--repeats 7] [--defend badnets-000 ...]

cProfile of one `onp defend` run (deploy_profile.py) put half the small CNN's forward time in max_pool2d. The
architectures' pooling is now MaxPool2x2: without autograd on CPU the elementwise maximum of each 2x2 window's
corners, with autograd PyTorch's kernel. Both give the same numbers; this measures where that is faster:

1. the small CNN's forward on 1024 Fashion-MNIST-shaped images without autograd (evaluation, activation
   statistics, the environment's steps) and with an input gradient as a trigger inversion takes it (160 images);
2. `onp defend` end to end, with the setting of the recommended `verdict` and the shipped agent with its repair
   (onp_vs_baselines.SETTINGS), on sampled shadow models at 5% defense data, each run once with each pooling,
   each in a fresh process (nothing memoised, as a new `onp defend`): the defense's seconds and whether the
   reports are identical.

One torch thread; medians of alternating repeats. Writes benchmarks/results/pool_speed.md (run with the agent
shipped until 2026-12-05, with MNP's signal)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from onp_vs_baselines import BEFORE_VERIFY, SETTINGS
from rows import exit_2_on_bad_input
from signal_models import CACHE, sampled_and_held_out

from onp_env import build_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.defend import defend_artifact
from onp_env.models import build_model
from onp_env.models.layers import MaxPool2x2

HERE = Path(__file__).resolve().parent
AGENT = "shipped agent verdict repair"


@contextmanager
def kernel_pooling():
    """MaxPool2x2 computed by PyTorch's kernel, as nn.MaxPool2d(2) was, while inside."""
    fast = MaxPool2x2.forward
    MaxPool2x2.forward = lambda self, x: F.max_pool2d(x, 2)  # type: ignore[method-assign]
    try:
        yield
    finally:
        MaxPool2x2.forward = fast  # type: ignore[method-assign]


def timed(fn: Callable[[], torch.Tensor], kernel: bool) -> tuple[float, torch.Tensor]:
    with kernel_pooling() if kernel else nullcontext():
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out


def defend(path: str, setting: str, kernel: bool) -> tuple[float, str]:
    """One `onp defend` run at 5% defense data: its seconds and its report but them, as JSON."""
    torch.set_num_threads(1)
    method, params = SETTINGS[setting]
    with kernel_pooling() if kernel else nullcontext(), tempfile.TemporaryDirectory() as tmp:
        _, report = defend_artifact(path, method, {**params, "defense_fraction": 0.05}, Path(tmp) / "out")
    return report.pop("seconds"), json.dumps(report, sort_keys=True, default=str)


def forward_rows(repeats: int) -> list[str]:
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 28, 28), 10).eval()
    x = torch.rand(1024, 1, 28, 28)

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(part) for part in x.split(256)])

    def inversion_step() -> torch.Tensor:
        xs = x[:160].clone().requires_grad_()
        model(xs).logsumexp(1).sum().backward()
        assert xs.grad is not None
        return xs.grad

    rows = []
    for label, fn in (("forward, no autograd, 1024 images", inference),
                      ("forward + input gradient, 160 images", inversion_step)):  # fmt: skip
        times: dict[bool, list[float]] = {True: [], False: []}
        outs = {}
        for r in range(repeats):
            for kernel in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
                t, outs[kernel] = timed(fn, kernel)
                times[kernel].append(t)
        kern, fast = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
        same = torch.equal(outs[True], outs[False])
        rows.append(f"| {label} | {kern:.1f} | {fast:.1f} | {kern / fast:.2f}x | {same} |")
        print(rows[-1], flush=True)
    return rows


def defend_rows(models: list[str]) -> list[str]:
    rows = []
    shadows = {name: lab for name, role, lab in sampled_and_held_out() if role == "shadow"}
    for part in models:
        name = next((n for n in shadows if part in n), None)
        if name is None:
            raise SystemExit(f"no sampled shadow model's name contains {part!r}: try badnets-000")
        path = build_artifact(shadows[name], CACHE, progress=False)
        for setting in (BEFORE_VERIFY, AGENT):
            seconds, reports = {}, {}
            for kernel in (True, False):
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:
                    seconds[kernel], reports[kernel] = fresh.submit(defend, str(path), setting, kernel).result()
            label = "verdict (recommended)" if setting == BEFORE_VERIFY else AGENT
            same = reports[True] == reports[False]
            rows.append(f"| {name} | {label} | {seconds[True]:.1f} | {seconds[False]:.1f} | "
                        f"{seconds[True] / seconds[False]:.2f}x | {same} |")  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--defend", nargs="*", default=["badnets-000", "wanet-002"], help="parts of shadow models' names")
    p.add_argument("--out", type=Path, default=HERE / "results" / "pool_speed.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# 2x2 max-pooling: elementwise maxima against PyTorch's kernel",
        "",
        f"Generated by `python benchmarks/pool_speed.py` on {platform.node()}, torch {torch.__version__}. "
        "One torch thread; the small CNN of the protocol (random weights for part 1). `kernel` is PyTorch's "
        "max_pool2d, `ours` MaxPool2x2 (onp_env.models.layers): "
        "elementwise maxima without autograd, the kernel with it. Identical: logits and input gradients bit for "
        "bit (part 1), the whole `onp defend` report but its seconds (part 2).",
        "",
        "| pass | kernel ms | ours ms | speed-up | identical |",
        "|---|---:|---:|---:|---|",
        *forward_rows(args.repeats),
    ]
    if args.defend:
        lines += [
            "",
            "`onp defend` at 5% defense data, each pooling once per model and setting, memos cleared before each run:",
            "",
            "| model | defense | kernel s | ours s | speed-up | identical report |",
            "|---|---|---:|---:|---:|---|",
            *defend_rows(args.defend),
        ]
    lines += [
        "",
        "Read: the pooling layer alone runs several times faster without autograd (whole forward above), but "
        "the defenses spend most of their time in autograd passes (the inversions' steps, the repair's "
        "fine-tuning), where the kernel stays: end to end the gain is small, and the reports do not change.",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    exit_2_on_bad_input(main)
