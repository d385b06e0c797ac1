"""Policies the suite evaluates, by name: `stop` and `random` here, the others from the packages above
the lab through the entry-point group `onp_env.policies` (the heuristics from baselines, the oracle
expert and trained agents from agents), so that `onp suite evaluate --policy mnp` finds them while the
lab imports neither.

A policy is an object with `act(env, obs, info) -> action` and, optionally, `start(env)`, called after
every reset (a heuristic plans there), and `requires(env_settings)`, which refuses a suite it cannot
act in (a trained agent, another suite's features) before its env is built. An entry point names a
factory `make(name, params, seed)`."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

import numpy as np

from onp_env.errors import OnpError

GROUP = "onp_env.policies"


class Policy(Protocol):
    def act(self, env: Any, obs: dict[str, np.ndarray], info: dict[str, Any]) -> Any: ...


class Stop:
    """STOP at once: the floor of the normalised score (0)."""

    def act(self, env: Any, obs: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        return env.unwrapped.max_units


class RandomValid:
    """A uniformly random unpruned unit at each step, never STOP: the episode ends at the budget or
    the accuracy limit. Seeded per episode from `seed` and the model's name."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def start(self, env: Any) -> None:
        import zlib

        self.rng = np.random.default_rng([self.seed, zlib.crc32(env.unwrapped.task.name.encode())])

    def act(self, env: Any, obs: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        mask = info["action_mask"][:-1]
        free = np.flatnonzero(mask)
        return int(self.rng.choice(free)) if len(free) else env.unwrapped.max_units


def _stop(name: str, params: dict[str, Any], seed: int) -> Policy:
    return Stop()


def _random(name: str, params: dict[str, Any], seed: int) -> Policy:
    return RandomValid(seed)


BUILTIN = {"stop": _stop, "random": _random}


@cache
def _entries() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def policy_names() -> list[str]:
    return sorted({*BUILTIN, *_entries()})


def make_policy(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Policy:
    """The policy called `name` (see policy_names()), built with `params` and `seed`."""
    if name in BUILTIN:
        return BUILTIN[name](name, params or {}, seed)
    entries = _entries()
    if name not in entries:
        raise OnpError(f"unknown policy '{name}': choose one of {', '.join(policy_names())}")
    return entries[name].load()(name, params or {}, seed)
