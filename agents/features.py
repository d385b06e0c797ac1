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

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


@dataclass
class GraphBatch:
    x: torch.Tensor
    """(N, F) features of the real nodes of every graph, graph after graph."""
    edge_index: torch.Tensor
    """(2, E) into x."""
    edge_attr: torch.Tensor
    """(E, A) edge weight, one-hot type, then the reversed flag when reverse edges are on."""
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


def to_graph_batch(obs: dict[str, torch.Tensor], reverse_edges: bool = True) -> GraphBatch:
    nodes = obs["nodes"]
    b, u, _ = nodes.shape
    counts = obs["counts"].round().long().view(b, 2)
    n, e = counts[:, 0], counts[:, 1]
    node_ok = torch.arange(u, device=nodes.device)[None, :] < n[:, None]
    offsets = torch.cumsum(n, 0) - n
    edges = obs["edge_index"].round().long().view(b, 2, -1)
    edge_ok = torch.arange(edges.shape[2], device=nodes.device)[None, :] < e[:, None]
    edge_index = (edges + offsets[:, None, None]).transpose(0, 1)[:, edge_ok]
    edge_attr = obs["edge_attr"][edge_ok]
    if reverse_edges:
        flag = torch.zeros(len(edge_attr), 1, dtype=edge_attr.dtype, device=edge_attr.device)
        edge_attr = torch.cat([torch.cat([edge_attr, flag], 1), torch.cat([edge_attr, flag + 1], 1)])
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
    return GraphBatch(
        x=nodes[node_ok],
        edge_index=edge_index,
        edge_attr=edge_attr,
        batch=torch.arange(b, device=nodes.device).repeat_interleave(n),
        pos=torch.arange(u, device=nodes.device).expand(b, u)[node_ok],
        focus=obs["focus"][node_ok] > 0.5,
        globals=obs["globals"].view(b, -1),
        num_graphs=b,
        width=u,
    )


class GraphFeatures(BaseFeaturesExtractor):
    """SB3 features extractor returning a GraphBatch (the policy's GNN reads it); it has no weights.
    `features_dim` is the node feature width."""

    def __init__(self, observation_space: gym.spaces.Dict, reverse_edges: bool = True):
        super().__init__(observation_space, features_dim=int(observation_space["nodes"].shape[-1]))  # type: ignore[index]
        self.reverse_edges = reverse_edges

    def forward(self, observations: dict[str, torch.Tensor]) -> GraphBatch:
        return to_graph_batch(observations, self.reverse_edges)
