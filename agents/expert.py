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

import weakref
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.config import ImitationConfig
from onp_env.env import NeuronPruningEnv
from onp_env.env.core import Task
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
    lay, _ = task.layout.locate(unit)
    task.masks.prune([unit])
    acc, _, score = task.measure([lay.name])
    task.masks.restore([unit])
    task.measure([lay.name])
    return cfg.alpha * (acc - env.acc) + cfg.beta * (env.score - score) - cfg.unit_cost


class OracleExpert:
    def __init__(self, cfg: ImitationConfig):
        self.cfg = cfg
        self.rank: list[int] = []
        self.ranks: weakref.WeakKeyDictionary[Task, list[int]] = weakref.WeakKeyDictionary()
        """Each task's ranking, made once: its source model never changes."""

    def start(self, env: NeuronPruningEnv) -> None:
        if env.task not in self.ranks:
            self.ranks[env.task] = torch.argsort(-activation_gap(env), stable=True).tolist()
        self.rank = self.ranks[env.task]

    def act(self, env: NeuronPruningEnv) -> int:
        if env.asr is not None and env.asr <= self.cfg.stop_asr:
            return env.stop_action
        valid = env.unit_choices()  # the unpruned units, or the signals' nominees (candidates, signal mode)
        free = [u for u in self.rank if valid[u]][: self.cfg.candidates]
        if not free:
            return env.stop_action
        rewards = [_trial_reward(env, u) for u in free]
        best = int(np.argmax(rewards))
        return env.action_for(free[best] if rewards[best] > env.cfg.unit_cost else free[0])


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
    return expert_from(env, expert, obs, info, noise, rng)


def expert_from(env: NeuronPruningEnv, expert: OracleExpert, obs: dict, info: dict, noise: float = 0.0,
                rng: np.random.Generator | None = None) -> Episode:  # fmt: skip
    """The expert's episode from the env's current state (`obs`, `info`) to its end."""
    observations, actions, masks = [], [], []
    done = False
    while not done:
        a = expert.act(env)
        observations.append(obs)
        actions.append(a)
        masks.append(env.action_masks())
        taken = a
        if noise and rng is not None and a != env.stop_action and rng.random() < noise:
            taken = int(rng.choice(np.flatnonzero(env.action_masks()[:-1])))
        obs, _, term, trunc, info = env.step(taken)
        done = term or trunc
    return observations, actions, masks, info


@torch.no_grad()
def student_action(policy: Any, obs: dict, mask: np.ndarray) -> int:
    """The policy's most likely valid action (as `onp defend` takes it)."""
    batch = {k: torch.as_tensor(v).float()[None].to(policy.device) for k, v in obs.items()}
    return int(policy.get_distribution(batch, mask[None]).distribution.logits.argmax())


def run_dagger(env: NeuronPruningEnv, expert: OracleExpert, policy: Any, seed: int, options: dict[str, Any],
               rng: np.random.Generator) -> Episode:  # fmt: skip
    """One DAgger episode, the student rolling in and the expert rolling out: the student runs the
    model to its own end; a hand-over state is drawn from its path (its last state, where it chose
    STOP, with probability 1/2, else one uniformly before it); the student's path is replayed to
    that state and the expert takes over. Returns the expert's part: states the student reaches,
    labelled with what the expert does from them (an early STOP of the student's is labelled with
    the units it left, a late one's cuts with STOP)."""
    obs, info = env.reset(seed=seed, options=options)
    path, done = [], False
    while not done:
        a = student_action(policy, obs, env.action_masks())
        if a == env.stop_action:
            break
        path.append(a)
        obs, _, term, trunc, info = env.step(a)
        done = term or trunc
    if done:  # the budget or the accuracy limit ended it: its last state cannot be labelled
        stop = int(rng.integers(len(path)))
    else:
        stop = len(path) if rng.random() < 0.5 or not path else int(rng.integers(len(path)))
    obs, info = env.reset(seed=seed, options=options)
    expert.start(env)
    for a in path[:stop]:
        obs, _, _, _, info = env.step(a)
    return expert_from(env, expert, obs, info)


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


def signal_targets(actions: list[int], nominees: list[np.ndarray], masks: list[np.ndarray],
                   kind: str) -> list[np.ndarray]:  # fmt: skip
    """targets() for the signal action mode: one boolean row per step over the signal columns (STOP
    last) whose nominee is a unit the expert prunes: the one it prunes at this step (next; several
    columns may nominate it), or any it prunes from this step on (remaining)."""
    stop = len(masks[0]) - 1
    pruned = [int(n[a]) for a, n in zip(actions, nominees, strict=True) if a != stop]
    out = []
    for t, (a, n, m) in enumerate(zip(actions, nominees, masks, strict=True)):
        row = np.zeros(stop + 1, dtype=bool)
        row[a] = True
        if a != stop:
            done = sum(b != stop for b in actions[:t])
            wanted = pruned[done : done + 1] if kind == "next" else pruned[done:]
            row[:stop] |= m[:stop] & np.isin(n, wanted)
        out.append(row)
    return out


def collect(env: NeuronPruningEnv, cfg: ImitationConfig, seed: int, progress: bool = True,
            policy: Any = None) -> tuple[list, list, list]:  # fmt: skip
    """Expert episodes on every model of the env's zoo: (observations, target rows, action masks).
    With a `policy`, DAgger episodes instead (run_dagger: the student rolls in, the expert out)."""
    expert, rng = OracleExpert(cfg), np.random.default_rng(seed)
    data: tuple[list, list, list] = ([], [], [])
    jobs = [(name, k) for name in env.names for k in range(cfg.episodes)]
    desc = "expert episodes" if policy is None else "dagger episodes"
    for i, (name, k) in enumerate(tqdm(jobs, desc=desc, disable=not progress, leave=False)):
        if policy is None:
            o, a, m, _ = run_expert(env, expert, seed + i, {"model": name}, cfg.noise if k else 0.0, rng)
        else:
            o, a, m, _ = run_dagger(env, expert, policy, seed + i, {"model": name}, rng)
        data[0].extend(o)
        if env.cfg.action_mode == "signal":
            data[1].extend(signal_targets(a, [x["nominees"] for x in o], m, cfg.target))
        else:
            data[1].extend(targets(a, env.stop_action + 1, cfg.target))
        data[2].extend(m)
    return data


def imitate(env: NeuronPruningEnv, policy: Any, cfg: ImitationConfig, seed: int,
            progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Behaviour cloning of the expert's episodes, then `cfg.dagger_rounds` rounds of DAgger (Ross,
    Gordon, Bagnell, AISTATS 2011): each adds labelled episodes from the states the current student
    reaches and clones again on everything gathered. Returns the samples and losses of each round."""
    data = collect(env, cfg, seed, progress)
    rounds = [{"samples": len(data[1]), "losses": clone(policy, data, cfg, seed, progress)}]
    for r in range(1, cfg.dagger_rounds + 1):
        more = collect(env, cfg, seed + 100_003 * r, progress, policy=policy)
        data = (data[0] + more[0], data[1] + more[1], data[2] + more[2])
        rounds.append({"samples": len(data[1]), "losses": clone(policy, data, cfg, seed + r, progress)})
    return {"samples": len(data[1]), "losses": rounds[0]["losses"], "rounds": rounds}


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
