"""What the channels-last layout buys a trigger inversion's step, per architecture, as ratios inside one run.

    python benchmarks/layout_speed.py [--repeats 7] [--training]

trigger_inversion.CPU_LAYOUT puts the model's 4-d weights in channels-last while a trigger is optimised on a CPU.
A step is one forward of 10 classes x 16 images with an input gradient and its backward (the model's weights
frozen, as in trigger_inversion._optimise), timed for each architecture (freshly initialised: the speed does not
depend on the weights) in the default layout and in channels-last, alternating, one torch thread. Also says how
far the two layouts' outputs and input gradients differ on the same images (they sum in another order). Writes
benchmarks/results/layout_speed.md; the defense's outcome both ways is onp_repair_knobs.py's study `layout-seeds`.
`--training` times a repair's step instead (onp_env.training.train as a defense's repair runs it: train mode, a batch
of TRAIN_BATCH images, cross-entropy, backward to the weights, an SGD step with momentum) and writes
layout_speed_training.md; the gradient compared is the weights'."""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from signal_models import HERE

from onp_env.artifacts import write_text_atomic
from onp_env.models import build_model

MODELS = (
    ("small_cnn", {}, (1, 28, 28)),
    ("vgg", {}, (1, 28, 28)),
    ("preact_resnet18", {"width": 0.25}, (1, 28, 28)),
    ("small_cnn", {}, (3, 32, 32)),
    ("preact_resnet18", {"width": 0.25}, (3, 32, 32)),
)
"""(architecture, its arguments, input shape): the lab's Fashion-MNIST models, and CIFAR-10-shaped ones."""
IMAGES = 160
"""A step's images: 10 classes x the inversion's 16 a class."""
TRAIN_BATCH = 64
"""A repair step's images (NC's and verdict's repair: TrainConfig batch_size 64)."""


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.clone().requires_grad_()
    out = model(xg)
    out.logsumexp(1).sum().backward()
    assert xg.grad is not None
    return out.detach(), xg.grad


class TrainingStep:
    """A repair's step on a copy of the model per layout (each keeps its own SGD state): returns the logits and the
    first convolution's weight gradient."""

    def __init__(self) -> None:
        self.optimisers: dict[int, torch.optim.Optimizer] = {}

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opt = self.optimisers.setdefault(id(model), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        y = torch.arange(len(x)) % 10
        out = model(x)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(out, y).backward()
        conv = next(q for q in model.parameters() if q.dim() == 4)
        assert conv.grad is not None
        grad = conv.grad.clone()
        opt.step()
        return out.detach(), grad


def seconds(run: Callable[..., object], model: torch.nn.Module, x: torch.Tensor, n: int = 5) -> float:
    run(model, x)
    start = time.perf_counter()
    for _ in range(n):
        run(model, x)
    return (time.perf_counter() - start) / n


def measure(name: str, kwargs: dict[str, float], shape: tuple[int, int, int], repeats: int,
            training: bool = False) -> dict[str, float]:  # fmt: skip
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **kwargs)
    models = {"default": model, "channels-last": copy.deepcopy(model)}
    if training:
        run: Callable[..., tuple[torch.Tensor, torch.Tensor]] = TrainingStep()
        x = torch.rand(TRAIN_BATCH, *shape)
        for m in models.values():
            m.train()
    else:
        run = step
        x = torch.rand(IMAGES, *shape)
        for m in models.values():
            m.eval().requires_grad_(False)
    models["channels-last"].to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"default": [], "channels-last": []}
    outputs = {layout: run(m, x) for layout, m in models.items()}  # the same first step: what is compared
    for _ in range(repeats):
        for layout, m in models.items():
            times[layout].append(seconds(run, m, x))
    (out0, grad0), (out1, grad1) = outputs["default"], outputs["channels-last"]
    return {
        "default ms": statistics.median(times["default"]) * 1000,
        "channels-last ms": statistics.median(times["channels-last"]) * 1000,
        "output diff": float((out0 - out1).abs().max()),
        "gradient diff": float((grad0 - grad1).abs().max() / grad0.abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--training", action="store_true", help="time a repair's training step instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.training:
        title, what, grad = (f"A repair's training step ({TRAIN_BATCH} images)", f"one training step on {TRAIN_BATCH} "
                             "images (train mode, cross-entropy, backward to the weights, SGD with momentum)",
                             "the first convolution's weight gradient")  # fmt: skip
    else:
        title, what, grad = ("A trigger inversion's step", f"one forward of {IMAGES} images with an input gradient and "
                             "its backward, weights frozen", "the input gradient")  # fmt: skip
    flag = " --training" if args.training else ""
    lines = [
        f"# {title} in the default layout and in channels-last",
        "",
        f"Generated by `python benchmarks/layout_speed.py --repeats {args.repeats}{flag}`: {what}, one torch thread, "
        f"median of alternating repeats (each the mean of 5 steps). Host {platform.node()}, torch {torch.__version__}. "
        f"Differences, after one step from the same weights: the largest absolute difference of the logits, and of "
        f"{grad} relative to its largest value.",
        "",
        "| model | input | default ms | channels-last ms | ratio | logits differ by | gradient differs by |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, kwargs, shape in MODELS:
        m = measure(name, kwargs, shape, args.repeats, args.training)
        label = name + "".join(f" {k} {v}" for k, v in kwargs.items())
        lines.append(
            f"| {label} | {'x'.join(map(str, shape))} | {m['default ms']:.1f} | {m['channels-last ms']:.1f} | "
            f"{m['channels-last ms'] / m['default ms']:.2f} | {m['output diff']:.1e} | {m['gradient diff']:.1e} |"
        )
        print(lines[-1])
    out = HERE / "results" / ("layout_speed_training.md" if args.training else "layout_speed.md")
    write_text_atomic(out, "\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    main()
