"""The neuron-connectivity graph: nodes are units, edges are typed and weighted.

- inter-layer (type 0): unit i of a source layer -> unit j of a target layer through a Conv/Linear,
  weight = L1 norm of the kernel slice W[j, i]; only the top-k strongest incoming per node;
- skip (type 1): channel c of a residual-group layer -> channel c of the next layer of the group
  (the identity path), weight 1;
- intra-layer (type 2, ONP's construction): units of one layer whose producing weight vectors have
  cosine similarity above tau, both directions, at most k per node.
Edge weights are divided by the largest incoming weight of their target layer so they are in [0, 1].
Every matrix built is one layer pair at a time, never N x N."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onp_env.graph.features import FEATURES, node_features
from onp_env.graph.units import UnitLayout

EDGE_TYPES = ("inter", "skip", "intra")


@dataclass
class NeuronGraph:
    layout: UnitLayout
    x: torch.Tensor
    """(N, F) node features, named by FEATURES."""
    edge_index: torch.Tensor
    """(2, E) int64, source row 0, target row 1."""
    edge_attr: torch.Tensor
    """(E, 1 + len(EDGE_TYPES)): weight in [0, 1], then the one-hot edge type."""
    layer: torch.Tensor
    """(N,) index of each node's unit layer."""

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def features(self, pruned: torch.Tensor | None = None) -> torch.Tensor:
        """Node features with the `pruned` column set from a boolean (N,) mask."""
        x = self.x.clone()
        if pruned is not None:
            x[:, FEATURES.index("pruned")] = pruned.float()
        return x

    def to_pyg(self, pruned: torch.Tensor | None = None):
        from torch_geometric.data import Data

        return Data(x=self.features(pruned), edge_index=self.edge_index, edge_attr=self.edge_attr, layer=self.layer)

    def to_networkx(self, pruned: torch.Tensor | None = None):
        import networkx as nx

        g = nx.DiGraph()
        feats = self.features(pruned)
        for lay in self.layout.layers:
            for c in range(lay.size):
                u = lay.offset + c
                g.add_node(u, layer=lay.name, channel=c, **dict(zip(FEATURES, feats[u].tolist(), strict=True)))
        for (s, t), a in zip(self.edge_index.t().tolist(), self.edge_attr.tolist(), strict=True):
            g.add_edge(s, t, weight=a[0], type=EDGE_TYPES[a[1:].index(1.0)])
        return g


def _kernel_l1(mod: nn.Conv2d | nn.Linear, fan: int) -> torch.Tensor:
    """(out, in_units) L1 norms of W[j, i] with `fan` input columns per unit, on the CPU."""
    w = mod.weight.detach().abs().cpu()
    if w.ndim == 4:
        return w.sum((2, 3))
    return w.view(w.shape[0], -1, fan).sum(2)


def _topk_incoming(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, dst, weight) of the k largest entries of each row of w (rows = targets)."""
    k = min(k, w.shape[1])
    vals, src = torch.topk(w, k, dim=1)
    dst = torch.arange(w.shape[0])[:, None].expand(-1, k)
    return src.flatten(), dst.flatten(), vals.flatten()


def build_graph(
    model: nn.Module,
    layout: UnitLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 8,
    tau: float = 0.5,
    k_intra: int = 4,
) -> NeuronGraph:
    """Graph of `model` from clean defense images (x, y) only, on the CPU: the activation statistics
    are computed on the model's device (x must be there too), the edges from weights on the CPU."""
    modules: dict[str, Any] = dict(model.named_modules())
    by = layout.by_name
    src_all, dst_all, w_all, t_all = [], [], [], []

    def add(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, kind: int) -> None:
        src_all.append(src)
        dst_all.append(dst)
        w_all.append(w)
        t_all.append(torch.full_like(src, kind))

    with torch.no_grad():
        for conn in layout.connections:
            w = _kernel_l1(modules[conn.module], conn.fan)
            for s in conn.sources:
                for t in conn.targets:
                    src, dst, val = _topk_incoming(w, k)
                    add(src + by[s].offset, dst + by[t].offset, val / val.max().clamp_min(1e-12), 0)
        for group in layout.groups:
            for a, b in zip(group[:-1], group[1:], strict=True):
                c = torch.arange(by[a].size)
                add(c + by[a].offset, c + by[b].offset, torch.ones(len(c)), 1)
        for lay in layout.layers:
            if lay.producer is None or lay.size < 2:
                continue
            v = modules[lay.producer].weight.detach().flatten(1).cpu()
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sim = v @ v.t()
            sim.fill_diagonal_(-1.0)
            vals, nbr = torch.topk(sim, min(k_intra, lay.size - 1), dim=1)
            keep = vals > tau
            dst = torch.arange(lay.size)[:, None].expand_as(nbr)[keep]
            src = nbr[keep]
            pairs = torch.unique(torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1), dim=1)
            if pairs.numel():
                add(pairs[0] + lay.offset, pairs[1] + lay.offset, sim[pairs[0], pairs[1]], 2)

    if src_all:
        edge_index = torch.stack([torch.cat(src_all), torch.cat(dst_all)]).long()
        types = torch.cat(t_all).long()
        attr = torch.cat([torch.cat(w_all).float()[:, None], nn.functional.one_hot(types, len(EDGE_TYPES)).float()], 1)
    else:
        edge_index, attr = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 1 + len(EDGE_TYPES))
    layer = torch.cat([torch.full((lay.size,), i) for i, lay in enumerate(layout.layers)])
    return NeuronGraph(layout, node_features(model, layout, x, y), edge_index, attr, layer)
