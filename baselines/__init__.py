"""Heuristic pruning defenses on one interface (baselines.common.Defense), usable as full defenses
(`defend_artifact`, `onp defend`) and as policies in NeuronPruningEnv (`BaselinePolicy`)."""

from __future__ import annotations

from typing import Any

from baselines.anp import ANP
from baselines.bnp import BNP
from baselines.clp import CLP
from baselines.common import BaselinePolicy, Defense, DefenseResult, run_policy
from baselines.controls import Magnitude, Random
from baselines.fine_pruning import FinePruning
from baselines.mnp import MNP
from baselines.nc import NC
from baselines.rnp import RNP
from baselines.verdict import Verdict
from onp_env.registry import defense_class

DEFENSES: dict[str, type[Defense]] = {
    d.name: d for d in (MNP, ANP, RNP, BNP, FinePruning, CLP, NC, Verdict, Magnitude, Random)
}
"""The heuristic baselines of this package (all registered in onp_env.registry, with the learned one)."""


def build_defense(name: str, **params: Any) -> Defense:
    """Any registered defense (onp_env.registry), heuristic or learned, by name."""
    return defense_class(name)(**params)


__all__ = ["DEFENSES", "BaselinePolicy", "Defense", "DefenseResult", "build_defense", "run_policy"]
