"""The shipped digits configs must keep producing working backdoors (the issue's bar)."""

from pathlib import Path

import pytest

from onp_env import build_artifact, load_artifact, load_config
from onp_env.config import LabConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "attack"


def _build(name):
    """Through the test session's cache: the BadNets config is the embedded default other tests train."""
    return load_artifact(build_artifact(load_config(LabConfig, CONFIGS / f"{name}-digits.yaml"), progress=False))


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "trojannn"])
def test_digits_attack_reaches_90_asr_within_3_points_of_clean(attack):
    clean = _build("clean").metrics["acc"]
    m = _build(attack).metrics
    assert m["asr"] >= 0.90
    assert m["acc"] >= clean - 0.03
