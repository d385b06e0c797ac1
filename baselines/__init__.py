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
from baselines.rnp import RNP
from onp_env.errors import OnpError

DEFENSES: dict[str, type[Defense]] = {d.name: d for d in (MNP, ANP, RNP, BNP, FinePruning, CLP, Magnitude, Random)}


def build_defense(name: str, **params: Any) -> Defense:
    if name not in DEFENSES:
        raise OnpError(f"unknown defense '{name}': choose one of {', '.join(DEFENSES)}")
    return DEFENSES[name](**params)


__all__ = ["DEFENSES", "BaselinePolicy", "Defense", "DefenseResult", "build_defense", "run_policy"]
