"""The oracle expert and behaviour cloning (the optional warm start of PPO).

The expert may use the trigger (shadow models only); the student never sees it: it learns from the
environment's ordinary, trigger-free observations paired with the expert's actions.

Expert: rank units by their clean-vs-triggered activation gap on the defense set (mean activation on
triggered images minus on clean ones, in units of the clean standard deviation); at every step,
try the `candidates` highest-ranked unpruned units and prune the one with the best one-step oracle
reward (accuracy kept plus ASR removed); when no candidate improves the reward by more than a unit's
cost, prune the top-ranked one (a redundantly encoded backdoor falls only after several cuts).
STOP once the ASR on triggered defense images is at most `stop_asr`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.config import ImitationConfig
from onp_env.env import NeuronPruningEnv
from onp_env.graph import features


def activation_gap(env: NeuronPruningEnv) -> torch.Tensor:
    """(units,) standardised activation gap of the current task's model (uses the trigger)."""
    task = env.task
    assert task.attack is not None, "the oracle expert needs the shadow model's trigger"
    x, y = task.defense
    keep = task.attack.targets(y) != y
    return features.activation_gap(task.source_model, task.layout, x, y, task.attack.apply(x[keep]), y[keep])


def _trial_reward(env: NeuronPruningEnv, unit: int) -> float:
    """The oracle reward of pruning `unit` now; the masks and caches are restored afterwards."""
    task, cfg = env.task, env.cfg
    lay, c = task.layout.locate(unit)
    task.masks.prune([unit])
    acc, _, score = task.measure([lay.name])
    task.masks.values[lay.name][c] = 1.0
    task.measure([lay.name])
    return cfg.alpha * (acc - env.acc) + cfg.beta * (env.score - score) - cfg.unit_cost


class OracleExpert:
    def __init__(self, cfg: ImitationConfig):
        self.cfg = cfg
        self.rank: list[int] = []

    def start(self, env: NeuronPruningEnv) -> None:
        self.rank = torch.argsort(-activation_gap(env), stable=True).tolist()

    def act(self, env: NeuronPruningEnv) -> int:
        if env.asr is not None and env.asr <= self.cfg.stop_asr:
            return env.max_units
        free = [u for u in self.rank if not env.pruned[u]][: self.cfg.candidates]
        if not free:
            return env.max_units
        rewards = [_trial_reward(env, u) for u in free]
        best = int(np.argmax(rewards))
        return free[best] if rewards[best] > env.cfg.unit_cost else free[0]


class OraclePolicy:
    """The oracle expert as an onp_env.suite policy (the ceiling of its normalised score)."""

    def __init__(self, cfg: ImitationConfig):
        self.expert = OracleExpert(cfg)

    def start(self, env: Any) -> None:
        self.expert.start(env.unwrapped)

    def act(self, env: Any, obs: Any = None, info: Any = None) -> int:
        return self.expert.act(env.unwrapped)


def oracle_policy(name: str, params: dict[str, Any], seed: int) -> OraclePolicy:
    """Entry point of group onp_env.policies: `params` are ImitationConfig's (candidates, stop_asr)."""
    from onp_env.config import from_dict

    return OraclePolicy(from_dict(ImitationConfig, params, "oracle policy params"))


Episode = tuple[list[dict], list[int], list[np.ndarray], dict]


def run_expert(env: NeuronPruningEnv, expert: OracleExpert, seed: int, options: dict[str, Any],
               noise: float = 0.0, rng: np.random.Generator | None = None) -> Episode:  # fmt: skip
    """One episode: (observations, expert actions, action masks, last info). With `noise`, the step
    taken is sometimes a random valid unit, while the label stays the expert's choice."""
    obs, info = env.reset(seed=seed, options=options)
    expert.start(env)
    observations, actions, masks = [], [], []
    done = False
    while not done:
        a = expert.act(env)
        observations.append(obs)
        actions.append(a)
        masks.append(env.action_masks())
        taken = a
        if noise and rng is not None and a != env.max_units and rng.random() < noise:
            taken = int(rng.choice(np.flatnonzero(env.action_masks()[:-1])))
        obs, _, term, trunc, info = env.step(taken)
        done = term or trunc
    return observations, actions, masks, info


def targets(actions: list[int], n_actions: int, kind: str) -> list[np.ndarray]:
    """One boolean row per step over the actions (units, STOP last) that count as the expert's: its
    own action (next), or every unit it prunes from this step on (remaining; all still valid, since
    pruning only ever removes actions)."""
    stop, out = n_actions - 1, []
    for t, a in enumerate(actions):
        row = np.zeros(n_actions, dtype=bool)
        row[a] = True
        if kind == "remaining" and a != stop:
            row[[u for u in actions[t:] if u != stop]] = True
        out.append(row)
    return out


def collect(env: NeuronPruningEnv, cfg: ImitationConfig, seed: int, progress: bool = True):
    """Expert episodes on every model of the env's zoo: (observations, target rows, action masks)."""
    expert, rng = OracleExpert(cfg), np.random.default_rng(seed)
    data: tuple[list, list, list] = ([], [], [])
    jobs = [(name, k) for name in env.names for k in range(cfg.episodes)]
    for i, (name, k) in enumerate(tqdm(jobs, desc="expert episodes", disable=not progress, leave=False)):
        o, a, m, _ = run_expert(env, expert, seed + i, {"model": name}, cfg.noise if k else 0.0, rng)
        data[0].extend(o)
        data[1].extend(targets(a, env.max_units + 1, cfg.target))
        data[2].extend(m)
    return data


def clone(policy: Any, data: tuple[list, list, list], cfg: ImitationConfig, seed: int,
          progress: bool = True) -> list[float]:  # fmt: skip
    """Behaviour cloning of (observations, target rows, masks) into an agents.policy.GraphMaskablePolicy:
    maximise the log of the masked policy's total probability on each step's target actions (with
    one target, its log-likelihood). Returns the mean loss per epoch."""
    observations, rows, masks = data
    obs = {k: torch.as_tensor(np.stack([o[k] for o in observations])).float() for k in observations[0]}
    target = torch.as_tensor(np.stack(rows))
    mask = torch.as_tensor(np.stack(masks))
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    policy.set_training_mode(True)
    for _ in tqdm(range(cfg.epochs), desc="behaviour cloning", disable=not progress, leave=False):
        total = 0.0
        for idx in torch.randperm(len(target), generator=g).split(cfg.batch_size):
            batch = {k: v[idx].to(policy.device) for k, v in obs.items()}
            log_p = policy.get_distribution(batch, mask[idx].numpy()).distribution.logits  # normalised
            hit = target[idx].to(log_p.device)
            loss = -torch.logsumexp(log_p.masked_fill(~hit, float("-inf")), 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(target))
    policy.set_training_mode(False)
    return losses
