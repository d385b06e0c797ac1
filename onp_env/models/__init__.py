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
    check_sizes(name, in_shape, num_classes, kwargs)
    try:
        return MODELS[name](in_shape, num_classes, mean=mean, std=std, **kwargs)
    except (TypeError, ValueError) as e:
        raise OnpError(f"bad arguments for model '{name}': {e}") from e


MAX_SIDE, MAX_CHANNELS, MAX_CLASSES, MAX_WIDTH, MAX_SCALE, MAX_LAYERS = 1024, 16, 100_000, 65_536, 16.0, 64


def check_sizes(name: str, in_shape: Any, num_classes: Any, kwargs: dict[str, Any]) -> None:
    """Refuse sizes no supported model has, before anything is built: an artifact's manifest is
    untrusted, and a few digits there would otherwise allocate gigabytes."""

    def count(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not (isinstance(in_shape, (tuple, list)) and len(in_shape) == 3 and count(in_shape[0], 1, MAX_CHANNELS)
            and all(count(v, 1, MAX_SIDE) for v in in_shape[1:])):  # fmt: skip
        raise OnpError(f"in_shape {in_shape!r} for model '{name}': need [channels <= {MAX_CHANNELS}, "
                       f"height, width <= {MAX_SIDE}]")  # fmt: skip
    if not count(num_classes, 2, MAX_CLASSES):
        raise OnpError(f"num_classes {num_classes!r} for model '{name}': need an integer in 2..{MAX_CLASSES}")
    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LAYERS:
            raise OnpError(f"model {key} lists {len(values)} entries for '{name}': at most {MAX_LAYERS}")
        for v in values:
            if isinstance(v, float) and not (0 < v <= MAX_SCALE):
                raise OnpError(f"model {key}={value!r} for '{name}': scales must be in (0, {MAX_SCALE:g}]")
            if isinstance(v, (int, float)) and not isinstance(v, float) and not count(v, 1, MAX_WIDTH):
                raise OnpError(f"model {key}={value!r} for '{name}': sizes must be integers in 1..{MAX_WIDTH}")


__all__ = ["MODELS", "Normalize", "PreActResNet18", "SmallCNN", "VGGStyle", "build_model", "check_sizes"]
