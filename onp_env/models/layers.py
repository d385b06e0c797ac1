"""Building blocks shared by the architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as the model's first layer, so every model eats [0, 1] pixels
    and a trigger is defined once in pixel space. Has buffers only: nothing here is prunable."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, channels: int):
        super().__init__()
        m = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32)
        s = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32)
        if m.numel() != channels or s.numel() != channels:
            raise ValueError(f"mean/std need {channels} values, got {m.numel()} and {s.numel()}")
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _quarters(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four corners of every 2x2 window, in the window's row-major order (odd edges dropped, as floor mode)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2], x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2), the same numbers. Without autograd on CPU it is the elementwise maximum of the
    windows' corners, several times faster than PyTorch's kernel, which also finds every window's index
    (benchmarks/pool_speed.py); with autograd, or on another device, it is that kernel, whose backward
    needs the indices (computing them from the corners cost as much as the kernel)."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return F.max_pool2d(x, 2)
    a, b, c, d = _quarters(x)
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


torch.fx.wrap("max_pool_2x2")  # one node in a traced model, which onp_env.graph.units passes through as pooling


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2) computed by max_pool_2x2: the architectures' pooling, which every defense's and the
    environment's forward passes go through many times."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x)


def lay_out(model: nn.Module, layout: torch.memory_format) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's 4-d weights and buffers copied into `layout`, in place (nn.Module.to(memory_format=...),
    typed); returns each tensor with its data before, for put_back or keep_values. A copy, not
    `contiguous(memory_format=)`: that returns a tensor unchanged where it is contiguous in both layouts, as a first
    convolution's weight of one input channel is, and a convolution whose input and weight are both ambiguous runs in
    the default. On a CPU, channels-last runs max-pooling with indices (autograd's) several times faster
    (benchmarks/results/layout_speed.md, layout_speed_training.md)."""
    moved = [(t, t.data) for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    for t, data in moved:
        t.data = data.clone(memory_format=layout)
    return moved


def put_back(moved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The tensors' data as lay_out found it (the same storage and strides: the layout a stride-1 dimension
    reads as is kept too)."""
    for t, data in moved:
        t.data = data


def keep_values(moved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The tensors' values now (trained since lay_out) in the strides lay_out found them in, as put_back would lay
    them out: a model trained in another layout is returned in its own."""
    for t, data in moved:
        t.data = torch.empty_like(data).copy_(t.data)


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def check_input(in_shape: tuple[int, int, int], num_classes: int) -> None:
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")


class ConvClassifier(nn.Module):
    """normalize -> features -> flatten -> fc (hidden, prunable neurons) -> ReLU -> classifier.
    Subclasses build `features` and call `add_head` with the feature map's final shape."""

    features: nn.Sequential

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
    ):
        super().__init__()
        check_input(in_shape, num_classes)
        self.normalize = Normalize(mean, std, in_shape[0])

    def add_head(self, c: int, h: int, w: int, hidden: int, num_classes: int) -> None:
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c * h * w, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(self.normalize(x)))
        return self.classifier(self.relu(self.fc(x)))
