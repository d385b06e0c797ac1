"""Prunable units of a model, found by tracing it with torch.fx.

A *unit* is a channel of a BatchNorm layer or a neuron of a hidden Linear layer (one not followed by
BatchNorm, and not the output layer). Tracing follows the data flow through channel-preserving
operations (activations, pooling, dropout, flatten, input normalisation) and through residual
additions, which *couple* channels: all BatchNorm layers that read the same residual stream form a
group whose channel c is one physical channel. Convolutions and Linear layers are the *connections*
between units; their weights give the graph's inter-layer edges.

Dependency tracing lives here, apart from every pruning algorithm that uses it."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from onp_env.errors import OnpError
from onp_env.models.layers import max_pool_2x2

PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten,
)  # fmt: skip
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid, torch.tanh, torch.relu,
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten,
    operator.sub, operator.truediv, operator.mul, operator.getitem, max_pool_2x2,
}  # fmt: skip
PASS_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous", "sigmoid", "tanh", "size"}
ADDS = {operator.add, operator.iadd, torch.add}
CONNECTIONS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class UnitLayer:
    name: str
    """Module whose output channels are the units (a BatchNorm or a hidden Linear)."""
    kind: str
    """"bn" or "linear"."""
    size: int
    offset: int
    """Flat index of this layer's first unit."""
    depth: int
    """Position among unit layers in execution order."""
    producer: str | None
    """Conv/Linear whose output this layer normalises, or None where it reads a residual sum."""


@dataclass(frozen=True)
class Connection:
    """A Conv/Linear module carrying unit activations from `sources` to `targets` unit layers
    (no targets for the classifier)."""

    module: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    fan: int
    """Input columns per source unit (spatial positions folded by a flatten; 1 for convs)."""


@dataclass
class UnitLayout:
    layers: list[UnitLayer]
    connections: list[Connection]
    groups: list[tuple[str, ...]]
    """Residual groups: unit layers whose channel c is one coupled channel (two or more layers)."""
    output: str
    """The classifier, never prunable."""
    by_name: dict[str, UnitLayer] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {layer.name: layer for layer in self.layers}

    @property
    def num_units(self) -> int:
        return sum(layer.size for layer in self.layers)

    def locate(self, unit: int) -> tuple[UnitLayer, int]:
        """(layer, channel) of flat unit index `unit`."""
        for layer in self.layers:
            if layer.offset <= unit < layer.offset + layer.size:
                return layer, unit - layer.offset
        raise IndexError(f"unit {unit} out of range: the model has {self.num_units} units")


class _Spaces:
    """Union-find over channel spaces: a residual addition merges the spaces of its inputs."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """fx-trace `model` and record tensor shapes for one `example` batch."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise OnpError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "models with data-dependent control flow are not supported"
        ) from e
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was_training)
    return gm


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and "tensor_meta" in a.meta]


def find_units(model: nn.Module, example: torch.Tensor) -> tuple[UnitLayout, fx.GraphModule]:
    """Trace `model` on `example` (one batch of inputs) into its unit layout."""
    gm = trace(model, example)
    modules = dict(gm.named_modules())
    spaces = _Spaces()
    space: dict[fx.Node, int] = {}
    has_add: set[int] = set()
    norm_space: dict[str, int] = {}
    order: list[fx.Node] = []

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            space[node] = spaces.new()
        elif node.op in ("get_attr", "output"):
            continue
        else:
            ins = [a for a in _tensor_args(node) if a in space]
            if node.op == "call_module":
                mod = modules[node.target]
                if isinstance(mod, CONNECTIONS):
                    space[node] = spaces.new()
                elif isinstance(mod, NORMS):
                    space[node] = space[ins[0]]
                    norm_space[str(node.target)] = space[node]
                elif isinstance(mod, PASS_MODULES):
                    space[node] = space[ins[0]]
                else:
                    raise OnpError(
                        f"unsupported layer '{node.target}' of type {type(mod).__name__}: supported are "
                        "Conv2d, Linear, BatchNorm1d/2d, activations, pooling, dropout, flatten and residual adds"
                    )
            elif node.op == "call_function" and node.target in ADDS and len(ins) == 2:
                spaces.union(space[ins[0]], space[ins[1]])
                space[node] = space[ins[0]]
                has_add.add(space[node])
            elif (node.op == "call_function" and node.target in PASS_FUNCTIONS) or (
                node.op == "call_method" and node.target in PASS_METHODS
            ):
                if not ins:
                    continue
                space[node] = space[ins[0]]
            else:
                name = getattr(node.target, "__name__", str(node.target))
                raise OnpError(f"unsupported operation '{name}' at '{node.name}' in {type(model).__name__}")
            order.append(node)

    users = {n: list(n.users) for n in order}

    def reaches_output(n: fx.Node) -> bool:
        stack, seen = list(n.users), set()
        while stack:
            u = stack.pop()
            if u.op == "output":
                return True
            if u in seen or (u.op == "call_module" and isinstance(modules[u.target], CONNECTIONS)):
                continue
            seen.add(u)
            stack += list(u.users)
        return False

    def is_unit_node(n: fx.Node) -> bool:
        if n.op != "call_module":
            return False
        mod = modules[n.target]
        if isinstance(mod, NORMS):
            return True
        if isinstance(mod, nn.Linear):
            nxt = [u for u in users.get(n, []) if u.op == "call_module" and isinstance(modules[u.target], NORMS)]
            return not nxt and not reaches_output(n)
        return False

    def upstream_units(n: fx.Node) -> list[str]:
        """Unit layers whose activations reach node `n` through channel-preserving ops and adds."""
        found: list[str] = []
        stack = [a for a in _tensor_args(n) if a in space]
        seen = set()
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            if is_unit_node(a):
                found.append(str(a.target))
            elif a.op == "call_module" and isinstance(modules[a.target], CONNECTIONS):
                continue
            else:
                stack += [b for b in _tensor_args(a) if b in space]
        return sorted(set(found), key=lambda t: unit_names.index(t))

    def downstream_units(n: fx.Node) -> list[str]:
        if is_unit_node(n):
            return [str(n.target)]
        found: list[str] = []
        stack = list(users.get(n, []))
        seen = set()
        while stack:
            u = stack.pop()
            if u in seen or u.op == "output":
                continue
            seen.add(u)
            if is_unit_node(u):
                found.append(str(u.target))
            elif not (u.op == "call_module" and isinstance(modules[u.target], CONNECTIONS)):
                stack += users.get(u, [])
        return sorted(set(found), key=lambda t: unit_names.index(t))

    unit_nodes = [n for n in order if is_unit_node(n)]
    unit_names = [str(n.target) for n in unit_nodes]
    if not unit_nodes:
        raise OnpError(
            f"{type(model).__name__} has no prunable units: it needs BatchNorm layers or a hidden Linear layer"
        )
    layers, offset = [], 0
    for depth, n in enumerate(unit_nodes):
        mod = modules[n.target]
        if isinstance(mod, NORMS):
            src = n.args[0]
            producer = (
                str(src.target)
                if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], CONNECTIONS)
                else None
            )
            size, kind = mod.num_features, "bn"
        else:
            producer, size, kind = str(n.target), mod.out_features, "linear"
        layers.append(UnitLayer(str(n.target), kind, size, offset, depth, producer))
        offset += size

    connections = []
    outputs = [
        n for n in order if n.op == "call_module" and isinstance(modules[n.target], nn.Linear) and reaches_output(n)
    ]
    for n in order:
        if not (n.op == "call_module" and isinstance(modules[n.target], CONNECTIONS)):
            continue
        sources, targets = upstream_units(n), downstream_units(n)
        if not sources:  # fed by the input only: carries no unit activations
            continue
        mod = modules[n.target]
        width = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
        sizes = {layers[unit_names.index(s)].size for s in sources}
        if len(sizes) != 1 or width % min(sizes):
            raise OnpError(f"cannot map the {width} inputs of '{n.target}' onto the channels of {', '.join(sources)}")
        connections.append(Connection(str(n.target), tuple(sources), tuple(targets), width // min(sizes)))

    by_space: dict[int, list[str]] = {}
    for name, s in norm_space.items():
        root = spaces.find(s)
        if any(spaces.find(h) == root for h in has_add):
            by_space.setdefault(root, []).append(name)
    groups = [tuple(sorted(g, key=unit_names.index)) for g in by_space.values() if len(g) > 1]
    if not outputs:
        raise OnpError(f"{type(model).__name__} has no Linear output layer: the classifier must be nn.Linear")
    return UnitLayout(layers, connections, groups, str(outputs[-1].target)), gm
