"""The seeded sampler of attack settings (onp_env.attacks.sampler) and the shadow zoos built from it."""

import dataclasses

import pytest

from agents.config import load_agent_config, validate
from agents.train import zoo_configs
from onp_env import OnpError
from onp_env.attacks import build_attack
from onp_env.attacks.sampler import CLEAN_LABEL, SamplerConfig, check_sampler, sample_attacks
from onp_env.config import from_dict

from .test_agents import CONFIG


def test_draws_repeat_for_a_seed_and_stay_in_their_ranges():
    cfg = SamplerConfig(count=40, seed=3, all_to_all=0.3)
    draws = sample_attacks(cfg, 10)
    assert draws == sample_attacks(cfg, 10) and draws != sample_attacks(dataclasses.replace(cfg, seed=4), 10)
    assert len({a.key for a in draws}) == 40 and [a.name for a in draws[:5]] == cfg.attacks
    assert len({a.target for a in draws}) > 5  # not one target for all
    assert {a.mode for a in draws} == {"all-to-one", "all-to-all"}
    assert all(a.mode == "all-to-one" for a in draws if a.name in CLEAN_LABEL)
    for a in draws:
        rates = cfg.clean_label_rate if a.name in CLEAN_LABEL else cfg.poison_rate
        assert rates[0] <= a.poison_rate <= rates[1]
        if a.name in ("badnets", "trojannn"):
            assert cfg.patch_size[0] <= a.params["patch_size"] <= cfg.patch_size[1]
            assert a.params["position"] in cfg.positions
        if a.name == "blended":
            assert cfg.alpha[0] <= a.params["alpha"] <= cfg.alpha[1]
        if a.name == "wanet":
            assert cfg.warp[0] <= a.params["s"] <= cfg.warp[1]
        build_attack(a.name, (1, 28, 28), 10, a.target, a.mode, a.params)  # every draw is a valid attack
    patterns = [a.params["pattern_seed"] for a in draws if a.name == "blended"]
    assert len(set(patterns)) == len(patterns)  # each blend its own pattern


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attacks": ["badnets", "nope"]}, "attacks must list some of"),
        ({"positions": []}, "positions must list"),
        ({"alpha": [0.3, 0.1]}, "low <= high"),
        ({"warp": [0.5]}, r"\[low, high\]"),
    ],
)
def test_bad_sampler_settings_name_the_fix(change, message):
    with pytest.raises(OnpError, match=message):
        check_sampler(dataclasses.replace(SamplerConfig(), **change), "zoo.sample")
    with pytest.raises(OnpError, match="count must be >= 1"):
        from_dict(SamplerConfig, {"count": 0}, "zoo.sample")


def test_a_sampled_zoo_names_each_shadow_model_by_its_label():
    cfg = load_agent_config(CONFIG, ["zoo.attacks=[]", "zoo.seeds=[1]", "zoo.sample={count: 6, seed: 1}"])
    validate(cfg)
    labs = zoo_configs(cfg)
    assert [lab.name for lab in labs] == [f"{cfg.name}-shadow-{a.key}-s1" for a in sample_attacks(cfg.zoo.sample, 10)]
    assert len({lab.fingerprint() for lab in labs}) == 6
    with pytest.raises(OnpError, match="own label"):
        validate(load_agent_config(CONFIG, ["zoo.attacks=[{name: badnets}, {name: badnets}]"]))
    with pytest.raises(OnpError, match="must not be empty"):
        validate(load_agent_config(CONFIG, ["zoo.attacks=[]"]))


def test_leaving_one_attack_out_keeps_the_other_draws():
    sets = ["zoo.attacks=[{name: blended}]", "zoo.seeds=[1]", "zoo.sample={count: 10, seed: 2}"]
    full = load_agent_config(CONFIG, sets).attack_configs()
    fold = load_agent_config(CONFIG, [*sets, "zoo.exclude=[blended]"]).attack_configs()
    assert fold == [a for a in full if a.name != "blended"] and len(fold) == 8
