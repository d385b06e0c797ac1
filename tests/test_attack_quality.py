"""The shipped digits configs must keep producing working backdoors (the issue's bar)."""

from pathlib import Path

import pytest

from onp_env import build_artifact, load_artifact, load_config
from onp_env.config import LabConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "attack"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("digits-zoo")


def _build(name, zoo):
    return load_artifact(build_artifact(load_config(LabConfig, CONFIGS / f"{name}-digits.yaml"), zoo, progress=False))


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "trojannn"])
def test_digits_attack_reaches_90_asr_within_3_points_of_clean(attack, zoo):
    clean = _build("clean", zoo).metrics["acc"]
    m = _build(attack, zoo).metrics
    assert m["asr"] >= 0.90
    assert m["acc"] >= clean - 0.03
