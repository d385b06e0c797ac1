"""The graph policy network: a torch-geometric GNN over the unit graph, one logit per unit, and a
pooled graph embedding (with the environment's global features) for the STOP logit and the value.
In the signal action mode, each signal column's logit is its nominee's unit logit plus a term of the
graph embedding for that column (which signal to trust, from the signals' own verdicts among the
globals), or with `verdict_head` one shared term of the graph embedding and the column's own verdict.

It never depends on how many units the model has: trained on one zoo, it runs on a graph of any
size, and every per-unit output follows its unit when the units are permuted (message passing and
mean/max pooling are permutation-equivariant / invariant)."""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch_geometric.nn import GATv2Conv, GCNConv, SAGEConv, global_max_pool, global_mean_pool

from agents.features import GraphBatch, PaddedEdges
from onp_env.config import bounded

GNN_TYPES = ("gcn", "gat", "sage")
DENSE_MAX = 512
"""Padded width up to which GCN layers propagate with each graph's normalised matrix, built once per
graph (a U x U dense tensor while it is built, then sparse and cached) instead of torch-geometric's
gather/scatter with its normalisation in every layer: the same numbers, several times faster on the
CPU for the small graphs PPO batches by the hundred (benchmarks/results/ppo_speed.md)."""
FAST = True
"""The fast paths (cached sparse GCN propagation, views in place of scatters when every graph fills
the padded width, the unit head's graph term computed per graph); False: the plain torch-geometric
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
    skip: bool = False
    """Add to each unit's logit a linear function of its own observed features (zero at the start):
    a path on which a signal's rank reaches the choice unmixed with the message passing's learned
    interactions (benchmarks/results/onp_choices.md: the policy ranks the oracle's units below its
    best signal column)."""
    verdict_head: bool = False
    """Signal action mode: score every signal column with one head of the graph embedding and that
    column's verdict (its signal's anomaly index, and its margin over the strongest other column's),
    instead of one output per column: no logit depends on which signal a column is, so following
    the stronger verdict, learnt where the inversion's is stronger, also holds where the latent
    shift's is (benchmarks/results/signal_verdicts.md: the stronger verdict names the target on 38
    of 40 held-out models)."""


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


def gcn_adjacency(p: PaddedEdges, width: int, reverse_edges: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, U, U) GCN propagation matrix of every graph, entry [b, t, s] for the edge s -> t: GCNConv's
    normalisation (torch_geometric gcn_norm at its defaults: one self loop per node, of weight 1 unless
    the node has one already, in-degree over targets, D^-1/2 (A + I) D^-1/2), parallel edges summed
    as its scatter sums them; with `reverse_edges` every edge also counts reversed. Normalised per
    edge, then written in one scatter: the (B, U, U) tensor is touched once."""
    b, u = len(p.counts), width
    device = p.index.device
    ok = torch.arange(p.index.shape[2], device=device)[None, :] < p.counts[:, 1:]
    graph = torch.arange(b, device=device)[:, None].expand_as(ok)[ok]
    src, dst, w = p.index[:, 0][ok], p.index[:, 1][ok], p.attr[..., 0][ok].to(dtype)
    if reverse_edges:
        src, dst, graph, w = torch.cat([src, dst]), torch.cat([dst, src]), graph.repeat(2), w.repeat(2)
    src, dst = graph * u + src, graph * u + dst  # flat (graph, row)
    real = (torch.arange(u, device=device)[None, :] < p.counts[:, :1]).flatten()
    loop = src == dst
    loop_w = real.to(dtype)
    loop_w[src[loop]] = w[loop]  # an existing loop keeps its weight, as in gcn_norm
    src, dst, w = src[~loop], dst[~loop], w[~loop]
    deg = loop_w.clone().index_add_(0, dst, w)
    scale = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    node = torch.arange(b * u, device=device)
    target = torch.cat([dst, node])
    source = torch.cat([src % u, node % u])
    values = torch.cat([scale[dst] * w * scale[src], scale**2 * loop_w])
    adj = torch.zeros(b * u * u, dtype=dtype, device=device)
    adj.index_add_(0, target * u + source, values)
    return adj.view(b, u, u)


class _SparseMatmul(torch.autograd.Function):
    """a @ x for a sparse CSR `a` whose transpose `at` is given, so that the backward pass is one more
    sparse product (torch's own CSR backward transposes `a` on every call)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, at: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.at = at
        return a @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.at @ grad


def _block_diagonal(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
    """The (B*U, B*U) CSR matrix with each graph's (U, U) CSR (crow, col, values) on the diagonal."""
    crows = torch.stack([c for c, _, _ in parts])
    nnz = crows[:, -1]
    shift = torch.cumsum(nnz, 0) - nnz
    crow = torch.cat([(crows[:, :-1] + shift[:, None]).flatten(), nnz.sum().view(1)])
    block = torch.arange(len(parts), device=crow.device).repeat_interleave(nnz) * width
    col = torch.cat([c for _, c, _ in parts]) + block
    values = torch.cat([v for _, _, v in parts])
    n = len(parts) * width
    with _beta_quiet():
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


class Propagation:
    """GCN propagation over a batch of padded graphs: the block-diagonal sparse matrix of their
    normalised adjacencies (about 10% of the U x U entries are edges here), and its transpose, built
    only when a gradient will flow back through it."""

    def __init__(self, parts: list[tuple[Any, Any]], width: int):
        self.parts, self.width = parts, width
        self.a = _block_diagonal([a for a, _ in parts], width)
        self._at: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B*U, H) padded rows -> the same rows, propagated."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            with _beta_quiet():
                return self.a @ x
        if self._at is None:
            self._at = _block_diagonal([at for _, at in self.parts], self.width)
        return _SparseMatmul.apply(self.a, self._at, x)


def _csr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _beta_quiet():
        c = m.to_sparse_csr()
    return c.crow_indices(), c.col_indices(), c.values()


@contextlib.contextmanager
def _beta_quiet() -> Iterator[None]:
    """torch warns that its CSR support is beta; the CSR operations here are building and a product,
    each checked against torch-geometric's numbers (tests/test_agents.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support")
        yield


class AdjacencyCache:
    """The GCN propagation of the graphs seen lately, keyed by their exact edges. A policy meets the
    same few graphs over and over (each step of an episode, each minibatch of a rollout: a model's
    edges never change while it is pruned), so each graph's matrix is built once. A key is an exact
    integer hash of the graph's edge slots, weights' bits and counts (with the padded width, the
    direction setting and the dtype); a hit is confirmed by comparing them. Each entry holds the graph's
    sparse matrix and its transpose; at most `size` entries (a zoo's graphs: tens of models)."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: OrderedDict[tuple[int, int, bool, torch.dtype], tuple[torch.Tensor, Any]] = OrderedDict()
        self._mix: torch.Tensor | None = None

    def _rows(self, p: PaddedEdges) -> torch.Tensor:
        """(B, K) int64: what decides a graph's matrix (counts, edge slots, weight bits), one row per graph."""
        e = p.index.shape[2]
        slots = torch.arange(e, device=p.index.device)[None, :] < p.counts[:, 1:]  # padding may hold anything
        index = p.index.masked_fill(~slots[:, None, :], 0).flatten(1)
        bits = p.attr[..., 0].double().masked_fill(~slots, 0.0).view(torch.int64)  # exact for float32 and 64
        return torch.cat([p.counts, index, bits], 1)

    def __call__(self, p: PaddedEdges, width: int, reverse_edges: bool, dtype: torch.dtype) -> Propagation:
        rows = self._rows(p)
        if self._mix is None or len(self._mix) != rows.shape[1] or self._mix.device != rows.device:
            g = torch.Generator().manual_seed(0)
            self._mix = torch.randint(-(2**62), 2**62, (rows.shape[1],), generator=g).to(rows.device)
        hashes = (rows * self._mix).sum(1).tolist()  # int64 arithmetic wraps: the same rows, the same hash
        keys = [(int(k), width, reverse_edges, dtype) for k in hashes]
        found: dict[int, Any] = {}
        groups: list[list[int]] = []  # each graph not cached, built once however often the batch holds it
        new: dict[tuple[int, int, bool, torch.dtype], list[int]] = {}  # key -> its groups (collisions apart)
        for i, key in enumerate(keys):
            hit = self.entries.get(key)
            if hit is not None and hit[0].device == rows.device and torch.equal(hit[0], rows[i]):
                self.entries.move_to_end(key)
                found[i] = hit[1]
                continue
            same = [k for k in new.get(key, []) if torch.equal(rows[groups[k][0]], rows[i])]
            if same:
                groups[same[0]].append(i)
            else:
                new.setdefault(key, []).append(len(groups))
                groups.append([i])
        if groups:
            pick = torch.tensor([group[0] for group in groups], device=rows.device)
            built = gcn_adjacency(PaddedEdges(p.index[pick], p.attr[pick], p.counts[pick]), width, reverse_edges, dtype)
            for j, group in enumerate(groups):
                value = (_csr(built[j]), _csr(built[j].t()))
                found.update(dict.fromkeys(group, value))
                self.entries[keys[group[0]]] = (rows[group[0]].clone(), value)
                if len(self.entries) > self.size:
                    self.entries.popitem(last=False)
        return Propagation([found[i] for i in range(len(keys))], width)


class GraphPolicyNet(nn.Module):
    def __init__(self, cfg: PolicyConfig, node_dim: int, edge_dim: int, global_dim: int, signals: int = 0):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.adjacency = AdjacencyCache()
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
        self.signal_head = (_mlp(h + 2, h, 1) if cfg.verdict_head else _mlp(h, h, signals)) if signals else None
        self.skip = nn.Linear(node_dim, 1) if cfg.skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        for head in (self.unit_head, self.stop_head, *([self.signal_head] if self.signal_head is not None else [])):
            # near-uniform first policy
            last = head[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.bias)
            last.weight.data.mul_(0.01)

    def _conv(self, conv: nn.Module, h: torch.Tensor, g: GraphBatch, adj: Propagation | None) -> torch.Tensor:
        if self.cfg.gnn == "gcn":
            if adj is None:
                return conv(h, g.edge_index, g.edge_attr[:, 0])
            assert isinstance(conv, GCNConv)
            x = conv.lin(h)
            if _full(g):  # the batch is the padded tensor itself: no scatter into it, no gather back
                out = adj(x)
            else:
                rows = g.batch * g.width + g.pos
                padded = x.new_zeros(g.num_graphs * g.width, x.shape[1])
                padded[rows] = x
                out = adj(padded)[rows]
            return out if conv.bias is None else out + conv.bias
        if self.cfg.gnn == "gat":
            return conv(h, g.edge_index, g.edge_attr)
        return conv(h, g.edge_index)

    def encode(self, g: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(node embeddings (N, H), graph embeddings (B, H))."""
        h = self.inp(g.x)
        dense = FAST and self.cfg.gnn == "gcn" and g.width <= DENSE_MAX
        adj = self.adjacency(g.padded, g.width, g.reverse_edges, h.dtype) if dense else None  # shared by the layers
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
        """(choice logits, STOP logits (B,), values (B,)): the choices are the units (B, U), NEG at
        padding, or in signal mode (the batch has nominees) the signal columns (B, S)."""
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
        if self.skip is not None:
            unit = unit + self.skip(g.x).squeeze(1)
        logits = torch.full((g.num_graphs, g.width), NEG, dtype=unit.dtype, device=unit.device)
        logits[g.batch, g.pos] = unit
        if g.nominees is not None:
            logits = logits.gather(1, g.nominees) + self._signal_terms(g, z)
        return logits, self.stop_head(z).squeeze(1), self.value_head(z).squeeze(1)

    def _signal_terms(self, g: GraphBatch, z: torch.Tensor) -> torch.Tensor:
        """(B, S) each signal column's term of its logit."""
        assert self.signal_head is not None and g.nominees is not None, "a signal-mode net is built with signals > 0"
        if not self.cfg.verdict_head:
            return self.signal_head(z)
        assert g.verdicts is not None, "the verdict head reads the observation's verdicts"
        v = g.verdicts.to(z.dtype)
        s = v.shape[1]
        itself = torch.eye(s, dtype=torch.bool, device=v.device)
        others = v[:, None, :].expand(-1, s, -1).masked_fill(itself, -torch.inf)
        margin = v - others.amax(2) if s > 1 else torch.zeros_like(v)
        per_column = torch.cat([z[:, None, :].expand(-1, s, -1), v[..., None], margin[..., None]], 2)
        return self.signal_head(per_column).squeeze(2)

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
