"""The one pruning primitive every method uses: reversible masks over prunable units.

A mask value m in [0, 1] per unit scales the unit's output y around a shift s:
    y' = m * (y - s) + s
`zero` semantics (default): s = 0, a pruned unit outputs 0 (BatchNorm gamma and beta both masked).
`gamma` semantics: s = beta (the Linear bias for Linear units), i.e. only the BatchNorm weight is
masked and a pruned channel outputs the constant beta: what the released ANP and RNP code does.

Masks live in forward hooks, never in the weights, so they are undone by `reset()`; `export()`
folds them into a copy of the model, and `export_smaller()` removes pruned channels physically
where nothing couples them (no residual group)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout

SEMANTICS = ("zero", "gamma")


def split_output(module: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(weight part, bias part, per-unit broadcast shape) of a BatchNorm or Linear output:
    out = weight part + bias, with the bias zero where the module has none."""
    shape = (1, -1) + (1,) * (out.ndim - 2)
    b: torch.Tensor | None = getattr(module, "bias", None)
    bias = b.view(shape) if b is not None else torch.zeros(shape, dtype=out.dtype, device=out.device)
    return out - bias, bias, shape


class Masks:
    """Masks over the units of `layout` (from `find_units(model, ...)`), hooked into `model`."""

    def __init__(self, model: nn.Module, layout: UnitLayout, semantics: str = "zero"):
        if semantics not in SEMANTICS:
            raise OnpError(f"unknown mask semantics '{semantics}': choose zero or gamma")
        self.model, self.layout, self.semantics = model, layout, semantics
        self.values = {layer.name: torch.ones(layer.size) for layer in layout.layers}
        self._hooks = self._register(model)
        self._others: list[dict[str, Any]] = []

    def _register(self, model: nn.Module) -> dict[str, Any]:
        modules = dict(model.named_modules())
        return {
            layer.name: modules[layer.name].register_forward_hook(self._hook(layer.name))
            for layer in self.layout.layers
        }

    def attach(self, model: nn.Module) -> None:
        """Apply these same mask values to another copy of the architecture (e.g. a fine-tuned or
        unlearned twin), so both are always pruned alike."""
        self._others.append(self._register(model))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
            m = self.values[name]
            if bool((m == 1).all()):
                return None
            core, bias, shape = split_output(module, out)
            m = m.to(out.device, out.dtype).view(shape)  # the values stay on the CPU, where edits are cheap
            return out * m if self.semantics == "zero" else m * core + bias

        return hook

    # --- editing -------------------------------------------------------------------------------
    def prune(self, units: Iterable[int]) -> None:
        """Set the masks of flat unit indices to 0."""
        for u in units:
            layer, c = self.layout.locate(int(u))
            self.values[layer.name][c] = 0.0

    def restore(self, units: Iterable[int]) -> None:
        """Set the masks of flat unit indices back to 1 (a cut tried and taken back)."""
        for u in units:
            layer, c = self.layout.locate(int(u))
            self.values[layer.name][c] = 1.0

    def set_layer(self, name: str, values: torch.Tensor) -> None:
        """Soft or hard mask values for one layer, each in [0, 1]."""
        if name not in self.values:
            raise OnpError(f"'{name}' is not a unit layer: choose one of {', '.join(self.values)}")
        v = torch.as_tensor(values, dtype=torch.float32).detach().flatten().cpu()
        if v.numel() != self.values[name].numel():
            raise OnpError(f"mask for '{name}' needs {self.values[name].numel()} values, got {v.numel()}")
        if not torch.isfinite(v).all() or v.min() < 0 or v.max() > 1:
            raise OnpError(f"mask values for '{name}' must be finite and in [0, 1]")
        self.values[name] = v.clone()

    def reset(self) -> None:
        for v in self.values.values():
            v.fill_(1.0)

    def remove(self) -> None:
        """Detach the hooks: the model behaves as if unmasked again."""
        for hooks in [self._hooks, *self._others]:
            for h in hooks.values():
                h.remove()
        self._hooks, self._others = {}, []

    def __enter__(self) -> Masks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- reading -------------------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """All mask values in flat unit order."""
        return torch.cat([self.values[layer.name] for layer in self.layout.layers])

    def pruned(self) -> list[int]:
        """Flat indices of units whose mask is 0."""
        return torch.nonzero(self.flat() == 0).flatten().tolist()

    def state(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) to save the masks."""
        return {"semantics": self.semantics, "masks": {k: v.tolist() for k, v in self.values.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("semantics") != self.semantics:
            raise OnpError(f"saved masks use '{state.get('semantics')}' semantics, these use '{self.semantics}'")
        saved = state.get("masks", {})
        if set(saved) != set(self.values):
            raise OnpError("saved masks are for different unit layers: they come from another architecture")
        for k, v in saved.items():
            self.set_layer(k, torch.tensor(v))

    # --- export --------------------------------------------------------------------------------
    def export(self) -> nn.Module:
        """A copy of the model with the masks folded into its weights (no hooks)."""
        out = copy.deepcopy(self.model)
        modules = dict(out.named_modules())
        for name, handle in self._hooks.items():  # the copy carries our hooks: drop them, keep others
            modules[name]._forward_hooks.pop(handle.id, None)
        with torch.no_grad():
            for layer in self.layout.layers:
                mod = modules[layer.name]
                m = self.values[layer.name].to(mod.weight.device)
                w = m.view(-1, *([1] * (mod.weight.ndim - 1)))
                mod.weight.mul_(w)
                if self.semantics == "zero" and mod.bias is not None:
                    mod.bias.mul_(m)
        return out

    def export_smaller(self) -> nn.Module:
        """`export()`, then physically remove every fully pruned channel that belongs to no
        residual group and sits between a Conv/Linear producer and Conv/Linear consumers.
        Only for zero semantics (a gamma-pruned channel still emits beta)."""
        if self.semantics != "zero":
            raise OnpError("export_smaller needs zero semantics: a gamma-pruned channel still outputs beta")
        out = self.export()
        modules = dict(out.named_modules())
        grouped = {name for g in self.layout.groups for name in g}
        consumers: dict[str, list[tuple[str, int]]] = {}
        for c in self.layout.connections:
            for s in c.sources:
                consumers.setdefault(s, []).append((c.module, c.fan))
        with torch.no_grad():
            for layer in self.layout.layers:
                keep = self.values[layer.name] != 0
                if bool(keep.all()) or not bool(keep.any()) or layer.name in grouped or layer.producer is None:
                    continue
                if any(len(c.sources) > 1 for c in self.layout.connections if layer.name in c.sources):
                    continue
                idx = torch.nonzero(keep).flatten()
                _slice_out(modules[layer.producer], idx)
                if layer.kind == "bn":
                    _slice_norm(modules[layer.name], idx)
                for name, fan in consumers.get(layer.name, []):
                    _slice_in(modules[name], idx, fan)
        return out


def _slice_out(mod: nn.Conv2d | nn.Linear, idx: torch.Tensor) -> None:
    mod.weight = nn.Parameter(mod.weight[idx].clone())
    if mod.bias is not None:
        mod.bias = nn.Parameter(mod.bias[idx].clone())
    if isinstance(mod, nn.Conv2d):
        mod.out_channels = len(idx)
    else:
        mod.out_features = len(idx)


def _slice_norm(mod: nn.BatchNorm1d | nn.BatchNorm2d, idx: torch.Tensor) -> None:
    assert mod.running_mean is not None and mod.running_var is not None
    mod.weight = nn.Parameter(mod.weight[idx].clone())
    mod.bias = nn.Parameter(mod.bias[idx].clone())
    mod.running_mean = mod.running_mean[idx].clone()
    mod.running_var = mod.running_var[idx].clone()
    mod.num_features = len(idx)


def _slice_in(mod: nn.Conv2d | nn.Linear, idx: torch.Tensor, fan: int) -> None:
    cols = (idx[:, None] * fan + torch.arange(fan)[None, :]).flatten()
    mod.weight = nn.Parameter(mod.weight[:, cols].clone())
    if isinstance(mod, nn.Conv2d):
        mod.in_channels = len(cols)
    else:
        mod.in_features = len(cols)
