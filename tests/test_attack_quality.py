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


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "trojannn"])
def test_digits_attack_reaches_90_asr_within_3_points_of_clean(attack):
    # Over model seeds 0-19 (benchmarks/results/test_margins.md): ASR and accuracy lost per attack
    # lie in the ranges of MARGINS below; the bar is the issue's, checked at seed 0.
    m = attack_quality(attack)
    assert m["asr"] >= 0.90
    assert m["acc_lost"] <= 0.03
