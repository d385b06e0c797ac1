"""The shipped digits configs must keep producing working backdoors (the issue's bar)."""

from pathlib import Path

import pytest

from onp_env import build_artifact, load_artifact, load_config
from onp_env.config import LabConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "attack"


def _build(name, seed=0):
    """Through the test session's cache: the BadNets config at seed 0 is the embedded default other tests train."""
    cfg = load_config(LabConfig, CONFIGS / f"{name}-digits.yaml", [f"seed={seed}"])
    return load_artifact(build_artifact(cfg, progress=False))


def attack_quality(attack: str, seed: int = 0) -> dict[str, float]:
    """The attacked model's ASR and its clean accuracy lost against the clean model of the same seed."""
    m = _build(attack, seed).metrics
    return {"asr": m["asr"], "acc_lost": _build("clean", seed).metrics["acc"] - m["acc"]}


# The ASR each attack reaches at every one of model seeds 0-19 (benchmarks/results/test_margins.md):
# badnets 99.7-100%, blended 99.4-100%, wanet 96.6-100%, trojannn 67.5-100% (seeds 2, 10 and 12 stay at
# 67-74%: its trigger, optimised on a reference model, does not always take). Accuracy lost against
# the clean model of the same seed: -1.1 to +1.4 points for all four.
MIN_ASR = {"badnets": 0.90, "blended": 0.90, "wanet": 0.90, "trojannn": 0.60}


# BadNets' model is the embedded default every other test trains anyway; the other three cost a model
# each (TrojanNN two, its trigger optimised on a clean model first): slow. tests/test_attacks.py checks
# each trigger, tests/test_zoo.py's tiny TrojanNN that its trigger raises its neuron.
@pytest.mark.parametrize("attack", [a if a == "badnets" else pytest.param(a, marks=pytest.mark.slow) for a in MIN_ASR])
def test_digits_attack_backdoors_the_model_within_3_points_of_clean(attack):
    m = attack_quality(attack)
    assert m["asr"] >= MIN_ASR[attack]
    assert m["acc_lost"] <= 0.03
