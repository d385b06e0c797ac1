"""Masked PPO on an onp-env task suite, in one file, CleanRL style: read it top to bottom.

    python docs/examples/masked_ppo.py --total-timesteps 4096 --seed 1

The policy scores every unit with one small MLP over that unit's features (and the episode's globals),
and STOP with another over the mean of all units: it needs no graph library, and its size does not
depend on the model's. Invalid actions (padding slots, pruned units) get a logit of -inf, from the
env's action mask. Only the train split is used for learning; the test split is scored at the end
with the suite's standard evaluation (onp_env.suite.evaluate), as a paper would report it.
PPO itself follows CleanRL's ppo.py (Huang et al., "The 37 Implementation Details of PPO", 2022)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

import onp_env  # noqa: F401  (registers the suites' ids)


@dataclass
class Args:
    env_id: str = "onp_env/Digits-v0"
    """A suite id (onp_env.suite)."""
    split: str = "train"
    """The split learned from: train for any reported score (the smoke test uses test, built already)."""
    models: list[str] | None = None
    """Only these models of the split (stable names such as digits-v0/train/003); None: every one."""
    seed: int = 1
    """Seeds python, numpy, torch and the environments."""
    total_timesteps: int = 2048
    """Environment steps over all envs."""
    num_envs: int = 2
    """Synchronous vector envs."""
    num_steps: int = 64
    """Steps per env per rollout."""
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    """Width of the unit, STOP and value MLPs."""
    evaluate_split: str = "test"
    """Split scored after training ('' to skip)."""


class Agent(nn.Module):
    def __init__(self, node_features: int, globals_: int, hidden: int):
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(node_features + globals_, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.stop = nn.Sequential(nn.Linear(node_features + globals_, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.value = nn.Sequential(nn.Linear(node_features + globals_, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def _inputs(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nodes, valid, glob = obs["nodes"], obs["valid"], obs["globals"]  # (B, U, F), (B, U), (B, G)
        per_unit = torch.cat([nodes, glob[:, None].expand(-1, nodes.shape[1], -1)], -1)
        pooled = (per_unit * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        return per_unit, pooled

    def get_value(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.value(self._inputs(obs)[1]).squeeze(-1)

    def get_action_and_value(self, obs, mask, action=None):
        per_unit, pooled = self._inputs(obs)
        logits = torch.cat([self.unit(per_unit).squeeze(-1), self.stop(pooled)], -1)  # STOP is the last action
        dist = Categorical(logits=logits.masked_fill(~mask, -1e9))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(pooled).squeeze(-1)


def to_tensors(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(obs[k], dtype=torch.float32) for k in ("nodes", "valid", "globals")}


def masks_of(envs: gym.vector.VectorEnv) -> torch.Tensor:
    return torch.as_tensor(np.stack(envs.call("action_masks")))


def train(args: Args) -> tuple[Agent, list[float]]:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    envs = gym.make_vec(args.env_id, num_envs=args.num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                        split=args.split, models=args.models, progress=False)  # fmt: skip
    space = envs.single_observation_space
    agent = Agent(space["nodes"].shape[1], space["globals"].shape[0], args.hidden)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    n_actions = envs.single_action_space.n
    obs_buf = {k: torch.zeros((args.num_steps, args.num_envs, *space[k].shape)) for k in ("nodes", "valid", "globals")}
    mask_buf = torch.zeros((args.num_steps, args.num_envs, n_actions), dtype=torch.bool)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros((args.num_steps, args.num_envs)) for _ in range(4))

    episode_returns: list[float] = []
    running = np.zeros(args.num_envs)
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs_t, next_mask = to_tensors(next_obs), masks_of(envs)
    next_done = torch.zeros(args.num_envs)
    start = time.time()
    for update in range(max(1, args.total_timesteps // batch_size)):
        # 1. rollout
        for step in range(args.num_steps):
            for k in obs_buf:
                obs_buf[k][step] = next_obs_t[k]
            mask_buf[step], dones[step] = next_mask, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs_t, next_mask)
            actions[step], logprobs[step], values[step] = action, logprob, value
            next_obs, reward, term, trunc, _ = envs.step(action.numpy())
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            running += reward
            finished = np.logical_or(term, trunc)
            for i in np.flatnonzero(finished):  # same-step autoreset: next_obs already starts a new episode
                episode_returns.append(float(running[i]))
                running[i] = 0.0
            next_obs_t, next_mask = to_tensors(next_obs), masks_of(envs)
            next_done = torch.as_tensor(finished, dtype=torch.float32)

        # 2. advantages (GAE)
        with torch.no_grad():
            next_value = agent.get_value(next_obs_t)
            advantages = torch.zeros_like(rewards)
            last = torch.zeros(args.num_envs)
            for t in reversed(range(args.num_steps)):
                not_done = 1.0 - (next_done if t == args.num_steps - 1 else dones[t + 1])
                following = next_value if t == args.num_steps - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * following * not_done - values[t]
                last = delta + args.gamma * args.gae_lambda * not_done * last
                advantages[t] = last
            returns = advantages + values

        # 3. PPO update on the flattened batch
        flat = {k: v.reshape(batch_size, *v.shape[2:]) for k, v in obs_buf.items()}
        b_mask, b_actions = mask_buf.reshape(batch_size, -1), actions.reshape(-1)
        b_logprobs, b_adv, b_returns = logprobs.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
        order = np.arange(batch_size)
        for _ in range(args.update_epochs):
            np.random.shuffle(order)
            for s in range(0, batch_size, minibatch_size):
                mb = order[s : s + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                    {k: v[mb] for k, v in flat.items()}, b_mask[mb], b_actions[mb]
                )
                ratio = (newlogprob - b_logprobs[mb]).exp()
                adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
        recent = np.mean(episode_returns[-10:]) if episode_returns else float("nan")
        steps = (update + 1) * batch_size
        print(f"update {update + 1}: {steps} steps, {steps / (time.time() - start):.0f} steps/s, "
              f"mean return of the last 10 episodes {recent:.3f}")  # fmt: skip
    envs.close()
    return agent, episode_returns


class Greedy:
    """The trained agent as a policy of onp_env.suite.evaluate: its most likely valid action."""

    def __init__(self, agent: Agent):
        self.agent = agent

    @torch.no_grad()
    def act(self, env, obs, info):
        o = {k: v[None] for k, v in to_tensors(obs).items()}
        mask = torch.as_tensor(info["action_mask"])[None]
        per_unit, pooled = self.agent._inputs(o)
        logits = torch.cat([self.agent.unit(per_unit).squeeze(-1), self.agent.stop(pooled)], -1)
        return int(logits.masked_fill(~mask, -torch.inf).argmax())


def parse_args() -> Args:
    """--field-name value for every field of Args (CleanRL uses tyro; plain argparse needs no install)."""
    import argparse
    import dataclasses

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Args):
        kind = {"nargs": "+", "type": str} if f.name == "models" else {"type": type(f.default)}
        p.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **kind)
    return Args(**vars(p.parse_args()))


if __name__ == "__main__":
    args = parse_args()
    agent, _ = train(args)
    if args.evaluate_split:
        from onp_env.suite.evaluate import evaluate
        from onp_env.suite.spec import get_suite

        suite = get_suite(args.env_id).name
        rows = evaluate(Greedy(agent), suite, args.evaluate_split, name="cleanrl-masked-ppo", seed=args.seed)
        print(f"{args.evaluate_split}: mean return {np.mean([r['return'] for r in rows]):.3f}, mean DER "
              f"{100 * np.mean([r['der'] for r in rows]):.1f}%")  # fmt: skip
