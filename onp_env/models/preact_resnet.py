"""PreAct-ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), the
backbone of the pruning-defense literature, with a width multiplier and any input size (global
average pooling before the classifier)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onp_env.models.layers import Normalize, check_input


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        width: float = 1.0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        check_input(in_shape, num_classes)
        widths = [max(1, int(round(64 * width * m))) for m in (1, 2, 4, 8)]
        self.normalize = Normalize(mean, std, in_shape[0])
        self.conv1 = nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(2):
                blocks.append(PreActBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        return self.classifier(self.flatten(self.pool(out)))
