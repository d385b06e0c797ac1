"""The graph policy network: a torch-geometric GNN over the unit graph, one logit per unit, and a
pooled graph embedding (with the environment's global features) for the STOP logit and the value.

It never depends on how many units the model has: trained on one zoo, it runs on a graph of any
size, and every per-unit output follows its unit when the units are permuted (message passing and
mean/max pooling are permutation-equivariant / invariant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.nn import GATv2Conv, GCNConv, SAGEConv, global_max_pool, global_mean_pool

from agents.features import GraphBatch
from onp_env.config import bounded

GNN_TYPES = ("gcn", "gat", "sage")
DENSE_MAX = 512
"""Padded width up to which GCN layers propagate with one dense batched matmul (B x U x U floats)
instead of torch-geometric's gather/scatter: the same numbers, several times faster on the CPU for
the small graphs PPO batches by the hundred (benchmarks/results/ppo_speed.md)."""
FAST = True
"""The fast paths (dense GCN propagation, views in place of scatters when every graph fills the
padded width, the unit head's graph term computed per graph); False: the plain torch-geometric
computation they replace, for the equivalence tests and benchmarks/ppo_speed.py's `before`."""
NEG = -1e8
"""Logit of a padded unit: never chosen, even without an action mask."""


@dataclass
class PolicyConfig:
    """The sizes are bounded (checked by from_dict, so by every loader of agent configs and saved
    agents): a crafted agent config must not allocate arbitrary memory."""

    gnn: str = "gcn"
    """Message passing: gcn (GCNConv, edge weight), gat (GATv2Conv, all edge attributes) or sage
    (SAGEConv, mean aggregation, edges unweighted)."""
    hidden: int = bounded(64, ge=4, le=1024)
    """Width of node and graph embeddings."""
    layers: int = bounded(3, ge=1, le=16)
    """Message-passing layers."""
    heads: int = bounded(4, ge=1, le=16)
    """Attention heads (gat only); hidden must be divisible by it."""
    reverse_edges: bool = True
    """Also pass messages against the data flow (see agents.features)."""


def _mlp(*dims: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _full(g: GraphBatch) -> bool:
    """Every graph has as many units as the padded width: its nodes, graph after graph, are the padded
    (B, U) rows in order, so views replace scatters and gathers."""
    return FAST and len(g.x) == g.num_graphs * g.width


def gcn_adjacency(g: GraphBatch) -> torch.Tensor:
    """(B, U, U) GCN propagation matrix of every graph, entry [b, t, s] for the edge s -> t: GCNConv's
    normalisation (torch_geometric gcn_norm at its defaults: one self loop per node, of weight 1 unless
    the node has one already, in-degree over targets, D^-1/2 (A + I) D^-1/2), parallel edges summed
    as its scatter sums them. Normalised per edge, then written in one scatter: the (B, U, U) tensor is
    touched once."""
    b, u = g.num_graphs, g.width
    src, dst = g.edge_index
    w = g.edge_attr[:, 0].to(g.x.dtype)
    loop = src == dst
    loop_w = torch.ones(len(g.x), dtype=g.x.dtype, device=g.x.device)
    loop_w[src[loop]] = w[loop]  # an existing loop keeps its weight, as in gcn_norm
    src, dst, w = src[~loop], dst[~loop], w[~loop]
    node = g.batch * u + g.pos  # flat (graph, row) of every real node
    deg = torch.zeros(b * u, dtype=g.x.dtype, device=g.x.device)
    deg.index_add_(0, node[dst], w).index_add_(0, node, loop_w)
    scale = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    target = torch.cat([node[dst], node])
    source = torch.cat([g.pos[src], g.pos])
    values = torch.cat([scale[node[dst]] * w * scale[node[src]], scale[node] ** 2 * loop_w])
    adj = torch.zeros(b * u * u, dtype=g.x.dtype, device=g.x.device)
    adj.index_add_(0, target * u + source, values)
    return adj.view(b, u, u)


class GraphPolicyNet(nn.Module):
    def __init__(self, cfg: PolicyConfig, node_dim: int, edge_dim: int, global_dim: int):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.inp = _mlp(node_dim, h, h)
        self.convs = nn.ModuleList()
        for _ in range(cfg.layers):
            if cfg.gnn == "gcn":
                conv: nn.Module = GCNConv(h, h)
            elif cfg.gnn == "gat":
                conv = GATv2Conv(h, h // cfg.heads, heads=cfg.heads, edge_dim=edge_dim)
            else:
                conv = SAGEConv(h, h)
            self.convs.append(conv)
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.graph = _mlp(2 * h + global_dim, h, h)
        self.unit_head = _mlp(2 * h, h, 1)
        self.stop_head = _mlp(h, h, 1)
        self.value_head = _mlp(h, h, 1)
        for head in (self.unit_head, self.stop_head):  # near-uniform first policy
            last = head[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.bias)
            last.weight.data.mul_(0.01)

    def _conv(self, conv: nn.Module, h: torch.Tensor, g: GraphBatch, adj: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.gnn == "gcn":
            if adj is None:
                return conv(h, g.edge_index, g.edge_attr[:, 0])
            assert isinstance(conv, GCNConv)
            x = conv.lin(h)
            if _full(g):  # the batch is the padded tensor itself: no scatter into it, no gather back
                out = torch.bmm(adj, x.view(g.num_graphs, g.width, -1)).view(len(x), -1)
            else:
                padded = x.new_zeros(g.num_graphs, g.width, x.shape[1])
                padded[g.batch, g.pos] = x
                out = torch.bmm(adj, padded)[g.batch, g.pos]
            return out if conv.bias is None else out + conv.bias
        if self.cfg.gnn == "gat":
            return conv(h, g.edge_index, g.edge_attr)
        return conv(h, g.edge_index)

    def encode(self, g: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(node embeddings (N, H), graph embeddings (B, H))."""
        h = self.inp(g.x)
        dense = FAST and self.cfg.gnn == "gcn" and g.width <= DENSE_MAX
        adj = gcn_adjacency(g) if dense else None  # shared by the layers
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = h + torch.relu(norm(self._conv(conv, h, g, adj)))
        if _full(g):
            rows = h.view(g.num_graphs, g.width, -1)
            pooled = torch.cat([rows.mean(1), rows.amax(1), g.globals], 1)
        else:
            pooled = torch.cat([global_mean_pool(h, g.batch, g.num_graphs), global_max_pool(h, g.batch, g.num_graphs),
                                g.globals], 1)  # fmt: skip
        return h, self.graph(pooled)

    def forward(self, g: GraphBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit logits (B, U) with NEG at padding, STOP logits (B,), values (B,))."""
        h, z = self.encode(g)
        if FAST:
            # unit_head on [h, z of the unit's graph], its first layer split so that z's share is computed
            # once per graph rather than once per unit (the same numbers without the (N, 2H) concatenation)
            first, rest = self.unit_head[0], self.unit_head[1:]
            assert isinstance(first, nn.Linear)
            width = h.shape[1]
            per_graph = nn.functional.linear(z, first.weight[:, width:], first.bias)
            unit = rest(nn.functional.linear(h, first.weight[:, :width]) + per_graph[g.batch]).squeeze(1)
        else:
            unit = self.unit_head(torch.cat([h, z[g.batch]], 1)).squeeze(1)
        logits = torch.full((g.num_graphs, g.width), NEG, dtype=unit.dtype, device=unit.device)
        logits[g.batch, g.pos] = unit
        return logits, self.stop_head(z).squeeze(1), self.value_head(z).squeeze(1)

    @staticmethod
    def neuron_logits(unit: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        """Discrete(U + 1) logits: one per unit, STOP last."""
        return torch.cat([unit, stop[:, None]], 1)

    @staticmethod
    def layer_logits(unit: torch.Tensor, g: GraphBatch, bits: int) -> torch.Tensor:
        """MultiBinary(bits) logits in sb3-contrib's (don't prune, prune) pairs: bit i is the i-th
        unit of the focused layer."""
        b = g.num_graphs
        fb, fpos = g.batch[g.focus], g.pos[g.focus]
        start = torch.full((b,), g.width, dtype=fpos.dtype, device=fpos.device).scatter_reduce(0, fb, fpos, "amin")
        prune = torch.zeros(b, bits, dtype=unit.dtype, device=unit.device)
        prune[fb, fpos - start[fb]] = unit[fb, fpos]
        return torch.stack([torch.zeros_like(prune), prune], 2).flatten(1)
