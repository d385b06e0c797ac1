"""Device selection, `cpu | cuda | cuda:N | auto`, for the code that can run on an accelerator."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from onp_env.errors import OnpError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """The torch device for `name`; `auto` is the first GPU when torch sees one, else the CPU. A GPU
    asked for on a machine without one is an OnpError before any work."""
    base = name.split(":")[0]
    if base not in DEVICES or (":" in name and (base != "cuda" or not name.split(":")[1].isdigit())):
        raise OnpError(f"unknown device '{name}': choose cpu, cuda, cuda:N or auto")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise OnpError(f"device {name} requested but torch sees no GPU: use device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise OnpError(f"device {name} requested but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def device_of(module: nn.Module) -> torch.device:
    """Where `module` runs: the device of its first parameter or buffer, the CPU if it has none."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")
