"""The graph policy for sb3-contrib's MaskablePPO: agents.features turns observations into a
graph batch, agents.gnn.GraphPolicyNet gives unit logits, STOP logit and value.

neuron mode (Discrete(U + 1)): a masked categorical over the units and STOP; signal mode
(Discrete(S + 1)): over the signal columns and STOP. layer mode
(MultiBinary(L)): one Bernoulli per unit of the focused layer. Stable-Baselines3 has no graph
support of its own; this class replaces its MLP extractor and heads, nothing else."""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import BaseModel

from agents.features import GraphBatch, GraphFeatures
from agents.gnn import GraphPolicyNet, PolicyConfig


class GraphMaskablePolicy(MaskableActorCriticPolicy):
    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Space, lr_schedule: Any,
                 policy: dict[str, Any] | None = None, **kwargs: Any):  # fmt: skip
        self.policy_cfg = PolicyConfig(**(policy or {}))
        kwargs.setdefault("ortho_init", False)  # GraphPolicyNet initialises its own heads
        extractor = {"reverse_edges": self.policy_cfg.reverse_edges}
        super().__init__(observation_space, action_space, lr_schedule, features_extractor_class=GraphFeatures,
                         features_extractor_kwargs=extractor, **kwargs)  # fmt: skip

    def _build(self, lr_schedule: Any) -> None:
        self.net = build_net(self.policy_cfg, self.observation_space)  # type: ignore[arg-type]
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "policy": vars(self.policy_cfg)}

    def _heads(self, obs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        g: GraphBatch = BaseModel.extract_features(self, obs, self.features_extractor)  # type: ignore[assignment]
        unit, stop, value = self.net(g)
        if isinstance(self.action_space, spaces.Discrete):
            logits = self.net.neuron_logits(unit, stop)
        else:
            logits = self.net.layer_logits(unit, g, int(self.action_space.n))  # type: ignore[attr-defined]
        return logits, value[:, None]

    def _distribution(self, logits: torch.Tensor, action_masks: Any) -> MaskableDistribution:
        dist = self.action_dist.proba_distribution(action_logits=logits)
        if action_masks is not None:
            dist.apply_masking(action_masks)
        return dist

    def forward(self, obs: Any, deterministic: bool = False, action_masks: Any = None):
        logits, values = self._heads(obs)
        dist = self._distribution(logits, action_masks)
        actions = dist.get_actions(deterministic=deterministic)
        log_prob = dist.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob  # type: ignore[misc]

    def evaluate_actions(self, obs: Any, actions: torch.Tensor, action_masks: Any = None):
        logits, values = self._heads(obs)
        dist = self._distribution(logits, action_masks)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: Any, action_masks: Any = None) -> MaskableDistribution:
        return self._distribution(self._heads(obs)[0], action_masks)

    def predict_values(self, obs: Any) -> torch.Tensor:
        return self._heads(obs)[1]


def build_net(cfg: PolicyConfig, observation_space: spaces.Dict) -> GraphPolicyNet:
    """The network for observations of `observation_space` (only feature widths matter, not sizes)."""
    node_dim = int(observation_space["nodes"].shape[-1])  # type: ignore[index]
    edge_dim = int(observation_space["edge_attr"].shape[-1]) + int(cfg.reverse_edges)  # type: ignore[index]
    global_dim = int(observation_space["globals"].shape[-1])  # type: ignore[index]
    signals = int(observation_space["nominees"].shape[-1]) if "nominees" in observation_space.spaces else 0  # type: ignore[index]
    return GraphPolicyNet(cfg, node_dim, edge_dim, global_dim, signals)
