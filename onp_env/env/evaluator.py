"""Predictions of a traced, masked model on a fixed batch, recomputing only what a mask change
touches.

The first call runs the whole fx graph and keeps the values later calls need. After masks change
in some unit layers, only the graph nodes downstream of those layers run again; everything upstream
is read from the cache. The masks themselves are forward hooks on the model's modules (see
`onp_env.masking`), so the cached and the full evaluation compute exactly the same thing. A unit
layer whose inputs did not change is not run again either where its output before the hooks is at
most half its inputs' size (a Linear layer's, say): that output is kept and only the hooks run on it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn


def without_inplace(model: nn.Module) -> nn.Module:
    """Turn off in-place activations, which would overwrite cached values."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010 (mypy: not every module declares it)
    return model


class Evaluator:
    """Logits of `gm` on `x`. `cache=False` re-runs the whole graph on every call (the reference).
    With `watch=True`, `fresh` holds the (masked) outputs of the unit layers that the last call
    recomputed, for the environment's dynamic features."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor, unit_layers: Iterable[str], cache: bool = True,
                 watch: bool = False):  # fmt: skip
        unit_layers = list(unit_layers)
        self.gm, self.x, self.cache = gm, x, cache
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        index = {n: i for i, n in enumerate(self.nodes)}
        desc: dict[fx.Node, set[fx.Node]] = {}
        for n in reversed(self.nodes):
            desc[n] = {n}.union(*(desc[u] for u in n.users))
        by_target = {n.target: n for n in self.nodes if n.op == "call_module"}
        self.downstream = {name: sorted(desc[by_target[name]], key=index.__getitem__) for name in unit_layers}
        # Values read by a recomputed node but produced outside its layer's downstream set.
        keep: set[fx.Node] = set()
        for run in self.downstream.values():
            inside = set(run)
            for n in run:
                keep.update(a for a in n.all_input_nodes if a not in inside)
        self.keep = keep
        self.values: dict[fx.Node, torch.Tensor] = {}
        self.output = self.nodes[-1]
        self.last: torch.Tensor
        self.watched = {by_target[name]: name for name in unit_layers} if watch else {}
        self.units = {by_target[name] for name in unit_layers}
        self.raw: dict[fx.Node, torch.Tensor] = {}
        """Unit layers' outputs before their hooks, where kept (see the module's docstring)."""
        self.retained = self.keep | {self.output} | set(self.watched)
        """The values a pass keeps to its end: the cache's, the logits, the watched layers' outputs."""
        self.fresh: dict[str, torch.Tensor] = {}

    def _run(self, order: list[fx.Node]) -> torch.Tensor:
        local: dict[fx.Node, Any] = {}
        # A value no later node of `order` reads is let go at once, as the model's own forward lets it go: held
        # to the end of a full pass, a large batch's activations took 1.6-3x its time (fresh memory every node).
        last_read = {a: i for i, n in enumerate(order) for a in n.all_input_nodes}

        def value(n: fx.Node) -> Any:
            return local[n] if n in local else self.values[n]

        for i, n in enumerate(order):
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            out: Any
            if n.op == "placeholder":
                out = self.x
            elif n.op == "get_attr":
                out = self.gm
                for atom in str(n.target).split("."):
                    out = getattr(out, atom)
            elif n.op == "call_module" and n in self.units and self.cache:
                out = self._unit(n, args, kwargs, local)
            elif n.op == "call_module":
                out = self.modules[str(n.target)](*args, **kwargs)
            elif n.op == "call_function":
                out = n.target(*args, **kwargs)  # type: ignore[operator]
            elif n.op == "call_method":
                self_arg, *rest = args
                out = getattr(self_arg, str(n.target))(*rest, **kwargs)
            else:  # output
                out = args[0]
            local[n] = out
            for a in n.all_input_nodes:
                if last_read[a] == i and a not in self.retained:
                    local.pop(a, None)
        if self.cache:
            self.values.update({n: v for n, v in local.items() if n in self.keep})
        self.last = local[self.output]
        self.fresh = {name: local[n] for n, name in self.watched.items() if n in local}
        return self.last

    def _unit(self, n: fx.Node, args: tuple, kwargs: dict[str, Any], local: dict[fx.Node, Any]) -> torch.Tensor:
        """A unit layer's output as its module's call gives it: forward, then the forward hooks in their order (the
        masks'); the forward's output reused where it was kept and no input was computed again in this pass. A module
        with other hooks is called as it is (and what was kept of it let go: its inputs may change meanwhile)."""
        module = self.modules[str(n.target)]
        if not _plain_hooks(module):
            self.raw.pop(n, None)
            return module(*args, **kwargs)
        if n in self.raw and not any(a in local for a in n.all_input_nodes):
            raw = self.raw[n]
        else:
            raw = module.forward(*args, **kwargs)
            size = sum(a.numel() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            if isinstance(raw, torch.Tensor) and 2 * raw.numel() <= size:
                self.raw[n] = raw
        out = raw
        for hook in module._forward_hooks.values():
            result = hook(module, args, out)
            out = out if result is None else result
        return out

    @torch.inference_mode()
    def logits(self, changed: Iterable[str] | None = None) -> torch.Tensor:
        """Logits after masks changed in the unit layers `changed` (None: anything may have)."""
        if not self.cache or not self.values or changed is None:
            return self._run(self.nodes)
        needed = set().union(*(self.downstream[c] for c in changed))
        if not needed:
            self.fresh = {}
            return self.last
        return self._run([n for n in self.nodes if n in needed])


def _plain_hooks(module: nn.Module) -> bool:
    """Whether calling `module` is its forward then its forward hooks, each given (module, args, output): no
    pre-hooks, no hooks with kwargs, none always called, no global ones (Evaluator._unit calls them so)."""
    from torch.nn.modules import module as torch_module

    return not (
        module._forward_pre_hooks
        or module._forward_hooks_with_kwargs
        or module._forward_hooks_always_called
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )
