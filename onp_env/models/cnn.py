"""Small BatchNorm CNN sized for 8x8 (digits) and 28x28 (MNIST-like) inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from onp_env.models.layers import ConvClassifier, MaxPool2x2, conv_bn_relu


class SmallCNN(ConvClassifier):
    """[conv3x3-BN-ReLU-maxpool] per entry of `channels`, then one hidden Linear layer (prunable
    neurons) and the classifier. Pooling stops once the feature map is 1 pixel wide."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        hidden: int = 128,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_shape, num_classes, mean, std)
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for cout in channels:
            layers += conv_bn_relu(c, cout)
            if min(h, w) >= 2:
                layers.append(MaxPool2x2())
                h, w = h // 2, w // 2
            c = cout
        self.features = nn.Sequential(*layers)
        self.add_head(c, h, w, hidden, num_classes)
