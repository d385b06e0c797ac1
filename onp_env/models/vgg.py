"""VGG-style network (Simonyan & Zisserman, 2015), scaled down: conv3x3-BN-ReLU stages with
max-pooling, then a hidden Linear layer and the classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from onp_env.models.layers import ConvClassifier, MaxPool2x2, conv_bn_relu

DEFAULT_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGStyle(ConvClassifier):
    """`cfg` lists conv widths and "M" for 2x2 max-pooling (skipped once the map is 1 pixel wide);
    `width` scales every conv width."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        cfg: Sequence[int | str] = DEFAULT_CFG,
        width: float = 1.0,
        hidden: int = 256,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_shape, num_classes, mean, std)
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(MaxPool2x2())
                    h, w = h // 2, w // 2
            else:
                cout = max(1, int(round(int(v) * width)))
                layers += conv_bn_relu(c, cout)
                c = cout
        self.features = nn.Sequential(*layers)
        self.add_head(c, h, w, hidden, num_classes)
