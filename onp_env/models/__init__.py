"""Model registry: every architecture takes the input shape, class count and normalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from onp_env.errors import OnpError
from onp_env.models.cnn import SmallCNN
from onp_env.models.layers import Normalize
from onp_env.models.preact_resnet import PreActResNet18
from onp_env.models.vgg import VGGStyle

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "vgg": VGGStyle,
    "preact_resnet18": PreActResNet18,
}


def build_model(
    name: str,
    in_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    if name not in MODELS:
        raise OnpError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    try:
        return MODELS[name](in_shape, num_classes, mean=mean, std=std, **kwargs)
    except TypeError as e:
        raise OnpError(f"bad arguments for model '{name}': {e}") from e


__all__ = ["MODELS", "Normalize", "PreActResNet18", "SmallCNN", "VGGStyle", "build_model"]
