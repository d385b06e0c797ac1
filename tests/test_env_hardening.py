"""The environment refuses bad settings, options and actions with one clear error, and every episode
ends: the step limit truncates a policy that keeps taking invalid actions (issue 9)."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from torch import nn

import onp_env  # noqa: F401  (registers the environment)
from onp_env import OnpError
from onp_env.config import from_dict, load_config
from onp_env.env import ENV_ID, EnvConfig, NeuronPruningEnv, PruningTarget
from onp_env.env.core import STEP_MARGIN

from .test_units_masks import UserNet


class TwoLayerNet(nn.Module):
    """Two prunable layers (6 channels, 5 hidden units), so layer mode takes two steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.hidden(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))))


def _target(name="m", model=None):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 10, 10)
    return PruningTarget(name, model or UserNet(), x, torch.arange(16) % 4)


def _env(model=None, **kw):
    """A user model with no trigger: score none needs no training, so each env builds in milliseconds."""
    return NeuronPruningEnv(targets=[_target(model=model)], **{"score": "none", "max_acc_drop": 1.0, **kw})


BAD_SETTINGS = [
    ({"eval_images": 0}, "eval_images must be >= 1"),
    ({"eval_images": -5}, "eval_images must be >= 1"),
    ({"budget": -0.1}, "budget must be > 0 and <= 1"),
    ({"budget": 0}, "budget must be > 0 and <= 1"),
    ({"budget": 1.5}, "budget must be > 0 and <= 1"),
    ({"max_acc_drop": 0.0}, "max_acc_drop must be > 0 and <= 1"),
    ({"edge_k": 0}, "edge_k must be >= 1"),
    ({"k_intra": 0}, "k_intra must be >= 1"),
    ({"tau": 1.5}, "tau must be >= -1 and <= 1"),
    ({"unit_cost": -0.001}, "unit_cost must be >= 0"),
    ({"invalid_penalty": -1}, "invalid_penalty must be >= 0"),
    ({"drop_penalty": -1.0}, "drop_penalty must be >= 0"),
    ({"max_units": 0}, "max_units must be >= 1"),
    ({"max_edges": -3}, "max_edges must be >= 1"),
    ({"action_mode": "swap"}, "unknown action_mode 'swap'.*neuron, layer"),
    ({"semantics": "both"}, "unknown semantics 'both'.*zero, gamma"),
    ({"score": "magic"}, "unknown score 'magic'.*oracle"),
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"budget": math.nan}, "budget must be a finite number"),
    ({"unit_cost": math.inf}, "unit_cost must be a finite number"),
    ({"eval_images": "ten"}, "eval_images must be int"),
    ({"features": ["nope"]}, "unknown feature set"),
]


class TestSettings:
    @pytest.mark.parametrize(("bad", "message"), BAD_SETTINGS)
    def test_the_env_refuses_a_bad_setting_before_loading_anything(self, bad, message):
        with pytest.raises(OnpError, match=message):
            NeuronPruningEnv(targets=[_target()], **{"score": "none", **bad})

    @pytest.mark.parametrize(("bad", "message"), BAD_SETTINGS)
    def test_validate_catches_it_in_a_config_built_in_python(self, bad, message):
        with pytest.raises(OnpError, match=message):
            EnvConfig(**bad).validate()

    @pytest.mark.parametrize(("key", "value"), [("eval_images", 0), ("budget", 2.0), ("k_intra", -1), ("tau", -3)])
    def test_loaders_check_the_same_ranges(self, key, value):
        with pytest.raises(OnpError, match=f"env config.{key} must be"):
            from_dict(EnvConfig, {key: value}, "env config")

    def test_an_agent_config_checks_its_env_section(self):
        from agents.config import AgentConfig

        with pytest.raises(OnpError, match="env.budget must be > 0"):
            load_config(AgentConfig, None, ["env.budget=-0.5"])

    def test_good_settings_pass_and_come_back_normalised(self):
        cfg = EnvConfig(budget=1, tau=-1, edge_k=1, k_intra=1, eval_images=1, max_units=7).validate()
        assert cfg.budget == 1.0 and isinstance(cfg.budget, float) and cfg.max_units == 7
        assert EnvConfig().validate() == EnvConfig()

    def test_eval_images_one_gives_finite_observations_and_rewards(self):
        e = _env(eval_images=1)
        obs, _ = e.reset(seed=0)
        _, reward, *_ = e.step(0)
        assert np.isfinite(reward) and all(np.isfinite(v).all() for v in obs.values())

    @pytest.mark.parametrize("limit", [0, -1, 2.5, True, "9"])
    def test_a_bad_step_limit_is_refused(self, limit):
        with pytest.raises(OnpError, match="step_limit must be a whole number"):
            _env(step_limit=limit)


class TestResetOptions:
    @pytest.fixture(scope="class")
    @classmethod
    def zoo(cls):
        return NeuronPruningEnv(targets=[_target("a"), _target("b")], score="none")

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"model": 5}, r"model=5 is not a model of the zoo.*0\.\.1"),
            ({"model": -1}, "model=-1 is not a model of the zoo"),
            ({"model": True}, "model=True is not a model of the zoo"),
            ({"model": 1.0}, "model=1.0 is not a model of the zoo"),
            ({"model": "0"}, "unknown model '0': the zoo has a, b"),
            ({"modle": 0}, "unknown reset option.*modle"),
        ],
    )
    def test_bad_options_are_clear_errors(self, zoo, options, message):
        with pytest.raises(OnpError, match=message):
            zoo.reset(seed=0, options=options)

    @pytest.mark.parametrize(("choice", "name"), [(0, "a"), (np.int64(1), "b"), ("b", "b"), (None, None)])
    def test_indices_and_names_pick_that_model(self, zoo, choice, name):
        _, info = zoo.reset(seed=0, options={"model": choice})
        assert info["model"] == (name or info["model"]) and info["model"] in ("a", "b")


class TestActions:
    @pytest.mark.parametrize(
        "action", [-1, 7, True, np.bool_(True), torch.tensor(True), 1.5, "3", np.array([1, 2]), np.float64(2.0)]
    )
    def test_neuron_mode_refuses_what_is_not_in_its_discrete_space(self, action):
        e = _env()  # 6 units: 0..5 units, 6 STOP
        e.reset(seed=0)
        with pytest.raises(OnpError, match=r"integer in 0\.\.6 \(6 is STOP\)"):
            e.step(action)
        assert e.steps == 0 and not e.pruned.any()  # the refused action changed nothing

    @pytest.mark.parametrize("action", [2, np.int64(2), np.array(2), np.array([2]), torch.tensor(2)])
    def test_neuron_mode_takes_integers_as_policies_return_them(self, action):
        e = _env()
        e.reset(seed=0)
        assert e.step(action)[4]["units"] == [2]

    @pytest.mark.parametrize(
        "action",
        [np.zeros(3, np.int8), np.zeros(7, np.int8), np.zeros((1, 6), np.int8), np.full(6, 2), np.array(["1"] * 6)],
    )
    def test_layer_mode_refuses_a_wrong_length_or_non_binary_action(self, action):
        e = _env(TwoLayerNet(), action_mode="layer")
        e.reset(seed=0)
        with pytest.raises(OnpError, match="layer-mode action must be 6 bits of 0/1"):
            e.step(action)
        assert e.layer_step == 0 and e.steps == 0

    def test_layer_mode_takes_bool_int_and_float_bits(self):
        e = _env(TwoLayerNet(), action_mode="layer", budget=1.0)
        e.reset(seed=0)
        _, _, term, _, info = e.step(np.array([1, 0, 0, 0, 0, 0], bool))
        assert info["units"] == [0] and not term
        _, _, term, _, info = e.step(np.array([0, 1, 0, 0, 0, 1.0]))  # bit 5 lies beyond the 5-unit layer: ignored
        assert info["units"] == [7] and term


class TestEpisodeEnd:
    def test_stepping_before_reset_is_reset_needed(self):
        with pytest.raises(ResetNeeded, match="call env.reset"):
            _env().step(0)

    def test_stepping_after_stop_is_reset_needed_until_reset(self):
        e = _env()
        e.reset(seed=0)
        assert e.step(6)[2]
        with pytest.raises(ResetNeeded):
            e.step(0)
        e.reset(seed=1)
        assert e.step(0)[4]["units"] == [0]

    def test_stepping_after_the_budget_ends_it_is_reset_needed(self):
        e = _env(budget=0.3)  # 6 units: the second prune reaches 0.3 * 6
        e.reset(seed=0)
        assert not e.step(0)[2] and e.step(1)[2]
        with pytest.raises(ResetNeeded):
            e.step(2)

    def test_layer_mode_after_its_last_layer_is_reset_needed_not_an_index_error(self):
        e = _env(TwoLayerNet(), action_mode="layer", budget=1.0)
        e.reset(seed=0)
        zeros = np.zeros(6, np.int8)
        assert not e.step(zeros)[2] and e.step(zeros)[2]
        with pytest.raises(ResetNeeded):
            e.step(zeros)

    def test_stepping_after_truncation_is_reset_needed(self):
        e = _env(step_limit=3)
        e.reset(seed=0)
        ends = [e.step(5)[2:4] for _ in range(3)]  # prunes unit 5, then repeats it: invalid
        assert ends == [(False, False), (False, False), (False, True)]
        with pytest.raises(ResetNeeded):
            e.step(0)


def _run_invalid(env, action, cap=50_000):
    """Repeat one action until the episode ends; (steps taken, terminated, truncated)."""
    env.reset(seed=0)
    for n in range(1, cap + 1):
        _, reward, term, trunc, info = env.step(action)
        assert info["invalid_action"] and reward == -env.unwrapped.cfg.invalid_penalty
        if term or trunc:
            return n, term, trunc
    raise AssertionError(f"{cap} invalid actions did not end the episode")


class TestStepLimit:
    @pytest.mark.parametrize(("budget", "units"), [(0.3, 2), (0.5, 3), (1.0, 6)])
    def test_the_derived_limit_is_twice_the_budgets_units_plus_a_margin(self, budget, units):
        e = _env(budget=budget)
        assert e.step_limit == 2 * units + STEP_MARGIN

    def test_repeated_invalid_actions_are_truncated_at_the_limit(self):
        e = _env(max_units=10)  # 7..9 are padding: invalid, never terminal
        assert _run_invalid(e, 8) == (e.step_limit, False, True)

    def test_repeating_a_pruned_unit_is_truncated_too(self):
        e = _env()
        e.reset(seed=0)
        e.step(0)
        for n in range(2, e.step_limit + 1):
            _, _, term, trunc, info = e.step(0)
            assert info["invalid_action"] and not term and trunc == (n == e.step_limit)

    def test_an_explicit_step_limit_replaces_the_derived_one(self):
        assert _run_invalid(_env(max_units=10, step_limit=5), 9) == (5, False, True)
        assert _env(step_limit=1000).step_limit == 1000

    def test_a_masked_policy_never_meets_the_limit(self):
        e = _env(budget=1.0)
        rng = np.random.default_rng(0)
        for ep in range(5):
            _, info = e.reset(seed=ep)
            done = False
            while not done:
                _, _, term, trunc, info = e.step(rng.choice(np.flatnonzero(info["action_mask"][:-1])))
                assert not trunc
                done = term
            assert info["pruned"] == 6 and e.steps < e.step_limit

    def test_the_registered_env_ends_too(self):
        e = gym.make(ENV_ID, targets=[_target()], score="none", max_units=10)
        assert e.spec.max_episode_steps is None  # no TimeLimit: the env's own limit applies
        n, term, trunc = _run_invalid(e, 9)
        assert trunc and not term and n == e.unwrapped.step_limit == 2 * math.ceil(0.3 * 6) + STEP_MARGIN
