"""The features module of the graph policy: the environment's padded Dict observation, batched by
Stable-Baselines3, becomes one graph batch for torch-geometric, without a Python loop over units
or graphs.

SB3 turns every observation array into float32: counts and edge indices are rounded back to
integers here. Padded nodes (beyond counts[0]) and padded edges (beyond counts[1]) are dropped;
node i of graph b becomes node offset_b + i of the batch. With `reverse_edges`, every edge also
appears reversed, flagged in an extra attribute column, so that messages flow both with and against
the data flow (a unit then hears from the layers it feeds, the classifier side included)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


@dataclass
class PaddedEdges:
    """The observation's edges as it pads them, one row per graph (integers restored)."""

    index: torch.Tensor
    """(B, 2, E) source and target unit of each edge slot, within its graph."""
    attr: torch.Tensor
    """(B, E, A) edge weight, then the one-hot type."""
    counts: torch.Tensor
    """(B, 2) real units and real edges of each graph."""


@dataclass
class GraphBatch:
    x: torch.Tensor
    """(N, F) features of the real nodes of every graph, graph after graph."""
    batch: torch.Tensor
    """(N,) graph of each node."""
    pos: torch.Tensor
    """(N,) index of each node in its padded observation row."""
    focus: torch.Tensor
    """(N,) bool: the units the current step acts on."""
    globals: torch.Tensor
    """(B, G) the environment's global features."""
    num_graphs: int
    width: int
    """U, the padded number of units of the observation."""
    padded: PaddedEdges
    """The edges as observed: the dense GCN path reads them (and caches per graph) without the flat lists."""
    reverse_edges: bool
    nominees: torch.Tensor | None = None
    """(B, S) signal action mode: the unit each signal column would prune now, within its graph."""
    verdicts: torch.Tensor | None = None
    """(B, S) signal action mode: the anomaly index of each column's signal (0 without a verdict)."""

    @cached_property
    def _edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.padded
        n, e = p.counts[:, 0], p.counts[:, 1]
        offsets = torch.cumsum(n, 0) - n
        edge_ok = torch.arange(p.index.shape[2], device=p.index.device)[None, :] < e[:, None]
        edge_index = (p.index + offsets[:, None, None]).transpose(0, 1)[:, edge_ok]
        edge_attr = p.attr[edge_ok]
        if self.reverse_edges:
            flag = torch.zeros(len(edge_attr), 1, dtype=edge_attr.dtype, device=edge_attr.device)
            edge_attr = torch.cat([torch.cat([edge_attr, flag], 1), torch.cat([edge_attr, flag + 1], 1)])
            edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
        return edge_index, edge_attr

    @property
    def edge_index(self) -> torch.Tensor:
        """(2, E) into x, built on first use (the dense GCN path never needs it)."""
        return self._edges[0]

    @property
    def edge_attr(self) -> torch.Tensor:
        """(E, A) edge weight, one-hot type, then the reversed flag when reverse edges are on."""
        return self._edges[1]


def to_graph_batch(obs: dict[str, torch.Tensor], reverse_edges: bool = True) -> GraphBatch:
    nodes = obs["nodes"]
    b, u, _ = nodes.shape
    counts = obs["counts"].round().long().view(b, 2)
    n = counts[:, 0]
    node_ok = torch.arange(u, device=nodes.device)[None, :] < n[:, None]
    edges = obs["edge_index"].round().long().view(b, 2, -1)
    full = bool((n == u).all())  # every graph fills the width: reshapes, no boolean gathers
    rows = torch.arange(u, device=nodes.device)
    return GraphBatch(
        x=nodes.reshape(b * u, -1) if full else nodes[node_ok],
        batch=torch.arange(b, device=nodes.device).repeat_interleave(u if full else n),
        pos=rows.repeat(b) if full else rows.expand(b, u)[node_ok],
        focus=(obs["focus"].reshape(b * u) if full else obs["focus"][node_ok]) > 0.5,
        globals=obs["globals"].view(b, -1),
        num_graphs=b,
        width=u,
        padded=PaddedEdges(edges, obs["edge_attr"].view(b, edges.shape[2], -1), counts),
        reverse_edges=reverse_edges,
        nominees=obs["nominees"].round().long().view(b, -1) if "nominees" in obs else None,
        verdicts=obs["verdicts"].view(b, -1) if "verdicts" in obs else None,
    )


class GraphFeatures(BaseFeaturesExtractor):
    """SB3 features extractor returning a GraphBatch (the policy's GNN reads it); it has no weights.
    `features_dim` is the node feature width."""

    def __init__(self, observation_space: gym.spaces.Dict, reverse_edges: bool = True):
        super().__init__(observation_space, features_dim=int(observation_space["nodes"].shape[-1]))  # type: ignore[index]
        self.reverse_edges = reverse_edges

    def forward(self, observations: dict[str, torch.Tensor]) -> GraphBatch:
        return to_graph_batch(observations, self.reverse_edges)
