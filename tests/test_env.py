import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import onp_env  # noqa: F401  (registers the environment)
from onp_env import OnpError, build_artifact, load_artifact, load_config
from onp_env.attacks import build_attack
from onp_env.config import LabConfig
from onp_env.env import ENV_ID, NeuronPruningEnv, PruningTarget
from onp_env.env.signals import DYNAMIC
from onp_env.graph.features import activation_gap
from onp_env.masking import Masks
from onp_env.metrics import accuracy, attack_success_rate, predict
from onp_env.zoo import default_artifact, default_config

from .test_units_masks import UserNet


@pytest.fixture(scope="module")
def art():
    return load_artifact(default_artifact())


@pytest.fixture(scope="module")
def env():
    return gym.make(ENV_ID)


def test_default_model_is_the_shipped_badnets_digits_config():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "configs/attack/badnets-digits.yaml"
    assert default_config().fingerprint() == load_config(LabConfig, shipped).fingerprint()


@pytest.mark.parametrize("mode", ["neuron", "layer", "signal"])
def test_registered_env_passes_both_checkers(mode):
    signal = {"features": ["mnp"], "signal_params": {"mnp": {"suppress_epochs": 2, "mask_epochs": 2}}}
    e = gym.make(ENV_ID, action_mode=mode, **(signal if mode == "signal" else {})).unwrapped
    gym_check_env(e, skip_render_check=True)
    with pytest.warns(UserWarning, match="unconventional shape"):  # graph arrays are 2-D by design
        sb3_check_env(e)


def test_maskable_ppo_runs_a_few_hundred_steps(env):
    torch.manual_seed(0)
    model = MaskablePPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0)
    model.learn(256)
    obs, _ = env.reset(seed=1)
    action, _ = model.predict(obs, action_masks=env.unwrapped.action_masks())
    assert env.unwrapped.action_masks()[int(action)]


def test_random_masked_agent_runs_20_episodes(env):
    rng = np.random.default_rng(0)
    lengths = []
    for ep in range(20):
        _, info = env.reset(seed=ep)
        done, n = False, 0
        while not done:
            action = rng.choice(np.flatnonzero(info["action_mask"]))
            _, reward, term, trunc, info = env.step(action)
            assert np.isfinite(reward) and not info["invalid_action"]
            done, n = term or trunc, n + 1
        lengths.append(n)
    assert max(lengths) <= int(np.ceil(0.3 * 176)) and min(lengths) >= 1


def _unit_activations(model, layout, x):
    modules = dict(model.named_modules())
    acts = {}
    hooks = [
        modules[lay.name].register_forward_hook(lambda m, i, o, n=lay.name: acts.__setitem__(n, o))
        for lay in layout.layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.cat([acts[lay.name].relu().flatten(2).mean((0, 2)) if acts[lay.name].ndim > 2
                      else acts[lay.name].relu().mean(0) for lay in layout.layers])  # fmt: skip


def oracle_pruning(seed: int, units: int = 20) -> dict[str, float]:
    """Defense-set ACC and ASR of the default BadNets model trained with `seed` once its `units` most
    trigger-sensitive units (clean-vs-triggered activation gap) are pruned: the test below, without the env."""
    from onp_env.graph.units import find_units

    art = load_artifact(build_artifact(dataclasses.replace(default_config(), seed=seed), progress=False))
    x, y = art.defense_set()
    layout, _ = find_units(art.model, x[:2])
    gap = _unit_activations(art.model, layout, art.attack.apply(x)) - _unit_activations(art.model, layout, x)
    Masks(art.model, layout).prune(torch.argsort(gap, descending=True)[:units].tolist())
    keep = art.attack.targets(y) != y
    asr = attack_success_rate(predict(art.model, art.attack.apply(x[keep])), y[keep], art.attack.targets(y[keep]))
    return {"acc": accuracy(predict(art.model, x), y), "asr": asr}


def test_oracle_pruning_of_trigger_sensitive_units_removes_the_backdoor(art):
    e = NeuronPruningEnv(artifacts=[str(art.path)], unit_cost=0.002)
    _, info = e.reset(seed=0)
    assert info["asr"] > 0.9
    task = e.task
    x, y = art.defense_set()
    diff = _unit_activations(art.model, task.layout, art.attack.apply(x)) - _unit_activations(art.model, task.layout, x)
    ranking = torch.argsort(diff, descending=True).tolist()
    twin = load_artifact(art.path).model  # independent copy, pruned through the public primitive
    masks = Masks(twin, task.layout)
    keep = art.attack.targets(y) != y
    prev = info
    # Over model seeds 0-19, after 20 units: defense-set ASR 0-11%, accuracy 86-99% (after 12 units
    # ASR was 0-64% and missed this bar on 10 of 20 seeds; benchmarks/results/test_margins.md).
    for unit in ranking[:20]:
        _, reward, _, _, info = e.step(unit)
        masks.prune([unit])
        acc = accuracy(predict(twin, x), y)
        asr = attack_success_rate(predict(twin, art.attack.apply(x[keep])), y[keep], art.attack.targets(y[keep]))
        assert info["acc"] == pytest.approx(acc, abs=1e-6) and info["asr"] == pytest.approx(asr, abs=1e-6)
        assert info["backdoor_score"] == info["asr"]
        expected = (info["acc"] - prev["acc"]) + (prev["asr"] - info["asr"]) - 0.002
        assert reward == pytest.approx(expected, abs=1e-6)
        prev = info
    assert info["asr"] < 0.2 and info["acc"] > 0.8
    saved = e.pruning_state()  # plain data, reloadable into the independent copy's masks
    again = Masks(load_artifact(art.path).model, task.layout)
    again.load_state(saved)
    assert sorted(again.pruned()) == sorted(ranking[:20]) == sorted(masks.pruned())


SHORT_SIGNALS = {"mnp": {"suppress_epochs": 2, "mask_epochs": 2}, "anp": {"iterations": 10},
                 "rnp": {"unlearn_epochs": 2, "recover_epochs": 2},
                 "inversion": {"steps": 40, "images": 64}}  # fmt: skip


@pytest.mark.parametrize(("features", "scale"), [([], "z"), (["dynamic"], "z"), (["dynamic", "mnp", "anp", "rnp"], "z"),
                                               (["inversion", "latent_gap"], "z"),
                                               (["inversion", "latent_gap"], "log-z"),
                                               (["dynamic", "inversion", "latent_gap", "inverted_asr"],
                                                "log-z+model")])  # fmt: skip
def test_observations_hold_nothing_derived_from_the_trigger(art, features, scale):
    x, y = art.defense_set()
    other = build_attack("blended", (1, 8, 8), 10, target=5, params={"alpha": 0.5})
    kw = {"features": features, "signal_params": {k: v for k, v in SHORT_SIGNALS.items() if k in features},
          "signal_scale": scale.split("+")[0], "signal_spans": ["layer", *scale.split("+")[1:]]}  # fmt: skip
    envs = [
        NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle", **kw),
        NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, other)], score="oracle", **kw),
        NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, None)], score="anp", **kw),
    ]
    assert envs[0].observation_space["nodes"].shape[1] == len(envs[0].feature_names)
    if "model" in kw["signal_spans"]:  # one more column per signal, the layer columns where they were
        assert envs[0].feature_names[-4:] == ("signal_inversion_model", "signal_latent_gap_model", *DYNAMIC)
        assert envs[0].global_names[-1] == "inverted_asr_now"  # a global, read after every step
    obs = [e.reset(seed=0)[0] for e in envs]
    for action in [170, 3, 40, 100, 176]:
        for o in obs[1:]:
            assert all(np.array_equal(obs[0][k], o[k]) for k in obs[0])
        obs = [e.step(action)[0] for e in envs]


def test_the_inverted_trigger_rate_falls_with_the_real_asr_as_the_backdoor_is_pruned(art):
    # the digits BadNets model: its target is named on 20 of 20 model and inversion seeds (test_signals)
    x, y = art.defense_set()
    env = NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle",
                           features=["inversion", "inverted_asr"])  # fmt: skip
    obs, info = env.reset(seed=0)
    start = float(obs["globals"][-1])
    assert env.task.probe_class == art.attack.target and start > 0.9 and info["asr"] > 0.9
    keep = art.attack.targets(y) != y
    gap = activation_gap(art.model, env.task.layout, x[keep], y[keep], art.attack.apply(x[keep]), y[keep])
    for unit in torch.argsort(-gap)[:25].tolist():  # the oracle's order (uses the trigger: this test only)
        obs, _, done, _, info = env.step(unit)
        assert abs(float(obs["globals"][-1]) - info["asr"]) < 0.35
        if done:
            break
    assert float(obs["globals"][-1]) < 0.5 and info["asr"] < 0.6
    assert float(env.reset(seed=0)[0]["globals"][-1]) == start  # a new episode starts from the unpruned rate


def test_the_inverted_rate_reuses_the_inversion_of_the_inversion_column(art, monkeypatch):
    from onp_env.signals import trigger_inversion

    calls = []
    real = trigger_inversion.invert
    monkeypatch.setattr(trigger_inversion, "invert", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(trigger_inversion, "_INVERTED", type(trigger_inversion._INVERTED)())
    x, y = art.defense_set()
    NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, None)], score="anp",
                     features=["inversion", "inverted_asr"], signal_params={"inversion": {"steps": 20}})  # fmt: skip
    assert len(calls) == 1


def test_a_second_environment_on_the_same_model_reuses_its_signals(art, monkeypatch):
    from baselines.mnp import MNP

    calls = []
    real = MNP.plan
    monkeypatch.setattr(MNP, "plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = art.defense_set()
    make = lambda model, epochs=2: NeuronPruningEnv(  # noqa: E731
        targets=[PruningTarget("m", model, x, y, None)],
        score="anp",
        features=["mnp"],
        signal_params={"mnp": {"suppress_epochs": 2, "mask_epochs": epochs}},
    )
    first = make(art.model).reset(seed=0)[0]["nodes"]
    assert np.array_equal(make(art.model).reset(seed=0)[0]["nodes"], first) and len(calls) == 1
    make(art.model, epochs=1)  # other settings
    other = copy.deepcopy(art.model)
    with torch.no_grad():
        other.fc.weight[0, 0] += 1.0
    make(other)  # other weights
    assert len(calls) == 3


def test_candidates_are_the_top_unpruned_units_of_each_signal_column_and_others_are_invalid(art):
    x, y = art.defense_set()
    env = NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle",
                           features=["dynamic", "mnp"], candidates=2,
                           signal_params={"mnp": SHORT_SIGNALS["mnp"]})  # fmt: skip
    env.reset(seed=0)
    column = env.task.signals[:, 0]
    for _ in range(3):
        free = np.flatnonzero(~env.pruned[: env.num_units])
        top = set(free[np.argsort(-column[free].numpy(), kind="stable")][:2].tolist())
        mask = env.action_masks()
        assert set(np.flatnonzero(mask[:-1]).tolist()) == top and mask[-1]
        outside = int(next(u for u in free if u not in top))
        _, reward, done, _, info = env.step(outside)
        assert info["invalid_action"] and not env.pruned[outside] and reward < 0 and not done
        env.step(min(top))
        assert env.pruned[min(top)]


def test_signal_mode_prunes_the_chosen_columns_top_unpruned_unit_and_masks_a_column_without_evidence(art):
    x, y = art.defense_set()
    gated = {**SHORT_SIGNALS["inversion"], "gate": 1000.0}  # the verdict never passes: no unit evidence
    env = NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle",
                           action_mode="signal", features=["dynamic", "mnp", "latent_gap", "inversion"],
                           signal_params={"mnp": SHORT_SIGNALS["mnp"], "inversion": gated})  # fmt: skip
    assert env.action_space == gym.spaces.Discrete(4) and env.stop_action == 3
    obs, _ = env.reset(seed=0)
    assert env.action_masks().tolist() == [True, True, False, True]
    for k in (0, 1, 0, 1):
        column = env.task.signals[:, k].numpy()
        free = np.flatnonzero(~env.pruned[: env.num_units])
        top = int(free[np.argmax(column[free])])
        assert obs["nominees"][k] == top and env.unit_choices()[top] and env.action_for(top) in (0, 1)
        obs, reward, _, _, info = env.step(k)
        assert info["units"] == [top] and env.pruned[top] and not info["invalid_action"]
    pruned = env.pruned.copy()
    _, reward, done, _, info = env.step(2)
    assert info["invalid_action"] and reward < 0 and not done and (env.pruned == pruned).all()
    with pytest.raises(OnpError, match=r"signal-mode action must be an integer in 0\.\.3 \(3 is STOP\)"):
        env.step(4)
    assert env.step(3)[2]


def test_follow_verdict_opens_only_the_column_of_the_larger_verdict(art):
    x, y = art.defense_set()
    env = NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle",
                           action_mode="signal", follow="verdict", features=["mnp", "latent_gap", "inversion"],
                           signal_params={k: SHORT_SIGNALS[k] for k in ("mnp", "inversion")})  # fmt: skip
    obs, _ = env.reset(seed=0)
    assert obs["verdicts"][0] == 0 and obs["verdicts"][1] != obs["verdicts"][2]  # mnp has no verdict
    followed = 1 + int(np.argmax(obs["verdicts"][1:]))
    for _ in range(3):
        mask = env.action_masks()
        assert mask.tolist() == [k in (followed, env.stop_action) for k in range(4)]
        assert np.flatnonzero(env.unit_choices()).tolist() == [obs["nominees"][followed]]
        assert env.action_for(int(obs["nominees"][followed])) == followed
        obs, _, _, _, info = env.step(followed)
        assert info["units"] and not info["invalid_action"]
    assert env.step(0)[4]["invalid_action"]  # mnp nominates a unit, but it is not the verdict's column


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"action_mode": "neuron", "features": ["inversion"]}, "follow verdict needs action_mode signal"),
        ({"action_mode": "signal", "features": ["mnp"]}, "a signal with a verdict"),
        ({"action_mode": "signal", "features": ["inversion"], "follow": "best"}, "unknown follow 'best'"),
    ],
)
def test_follow_verdict_needs_signal_mode_and_a_verdict(overrides, message):
    with pytest.raises(OnpError, match=message):
        NeuronPruningEnv(**{"follow": "verdict", **overrides})


def test_signal_mode_needs_a_signal_column():
    with pytest.raises(OnpError, match=r"action_mode signal needs a signal feature set"):
        NeuronPruningEnv(action_mode="signal", features=["dynamic"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"features": ["dynamic"]},
        {"features": ["mnp"], "action_mode": "layer"},
        {"features": ["mnp"], "action_mode": "signal"},
    ],
)
def test_candidates_need_a_signal_column_and_neuron_mode(overrides):
    with pytest.raises(OnpError, match=r"candidates needs action_mode neuron and a signal feature set"):
        NeuronPruningEnv(candidates=1, **overrides)


def test_prunable_last_opens_only_the_last_unit_layer_and_leaves_the_observation_alone(art):
    x, y = art.defense_set()
    envs = [NeuronPruningEnv(targets=[PruningTarget("m", art.model, x, y, art.attack)], score="oracle", prunable=p)
            for p in ("all", "last")]  # fmt: skip
    (everywhere, _), (last_only, _) = (env.reset(seed=0) for env in envs)
    assert all(np.array_equal(everywhere[k], last_only[k]) for k in everywhere)
    env = envs[1]
    lay = env.task.layout.layers[-1]
    mask = env.action_masks()
    assert np.flatnonzero(mask[:-1]).tolist() == list(range(lay.offset, lay.offset + lay.size)) and mask[-1]
    _, reward, done, _, info = env.step(0)  # a unit of the first layer: refused, nothing pruned
    assert info["invalid_action"] and not env.pruned.any() and reward < 0 and not done
    _, _, _, _, info = env.step(lay.offset + 1)
    assert info["units"] == [lay.offset + 1] and not env.action_masks()[lay.offset + 1]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prunable": "first"}, "unknown prunable 'first'"),
    ({"prunable": "last", "action_mode": "layer"}, "prunable last needs action_mode neuron"),
    ({"prunable": "last", "group": True}, "prunable last cannot hold with group: true"),
])  # fmt: skip
def test_prunable_is_all_or_last_and_neuron_mode_only(overrides, message):
    with pytest.raises(OnpError, match=message):
        NeuronPruningEnv(**overrides)


def test_same_seed_same_episode_and_cache_changes_no_number(art, tmp_path):
    base = default_config()  # a second zoo model: 3 epochs suffice, its numbers only have to repeat
    second_cfg = dataclasses.replace(base, name="second", seed=1, train=dataclasses.replace(base.train, epochs=3))
    second = build_artifact(second_cfg, tmp_path, progress=False)
    zoo = [str(art.path), str(second)]

    def episode(cache, seed):
        e = NeuronPruningEnv(artifacts=zoo, cache=cache)
        out = [e.reset(seed=seed)[1]["model"]]
        for a in [5, 60, 150, 20]:
            _, reward, _, _, info = e.step(a)
            out.append((reward, info["acc"], info["asr"]))
        return out

    assert episode(True, 3) == episode(True, 3) == episode(False, 3)
    assert {episode(True, s)[0] for s in range(8)} == {"badnets-digits", "second"}  # chosen with np_random
    assert NeuronPruningEnv(artifacts=zoo).reset(options={"model": "second"})[1]["model"] == "second"


@pytest.mark.parametrize("score", ["oracle", "anp"])
def test_later_resets_restore_the_first_ones_pass_exactly(score):
    def episodes(restore):
        e = NeuronPruningEnv(features=["dynamic"], score=score, eval_images=128)
        rng, out = np.random.default_rng(0), []
        for k in range(4):
            if not restore:
                e.task._start = None  # the full pass on every reset: the reference
            obs, info = e.reset(seed=k)
            out.append((obs, info["acc"], info["asr"]))
            for _ in range(6):
                obs, reward, done, _, info = e.step(int(rng.choice(np.flatnonzero(e.action_masks()[:-1]))))
                out.append((obs, reward, info["acc"], info["asr"]))
                if done:
                    break
        return out

    fast, reference = episodes(True), episodes(False)
    assert len(fast) == len(reference)
    for a, b in zip(fast, reference, strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, dict):
                assert all(np.array_equal(x[k], y[k]) for k in x)
            else:
                assert x == y


def test_invalid_actions_are_penalised_no_ops():
    e = NeuronPruningEnv(max_units=200)
    e.reset(seed=0)
    e.step(7)
    for bad in (7, 190):  # already pruned; padding beyond the model's 176 units
        _, reward, term, _, info = e.step(bad)
        assert info["invalid_action"] and reward == -e.cfg.invalid_penalty and not term and info["pruned"] == 1
        assert not e.action_masks()[bad]
    assert e.action_masks()[200]  # STOP
    _, _, term, _, info = e.step(200)
    assert term and info["stopped"]


def test_layer_mode_takes_one_step_per_layer():
    e = NeuronPruningEnv(action_mode="layer", budget=1.0, max_acc_drop=1.0)
    obs, info = e.reset(seed=0)
    assert e.action_space.n == 128 and info["action_mask"].shape == (256,)
    assert obs["focus"][:16].all() and not obs["focus"][16:].any()
    steps, term = 0, False
    while not term:
        bits = np.zeros(128, np.int8)
        bits[:2] = 1
        obs, _, term, _, info = e.step(bits)
        steps += 1
    assert steps == 3 and info["pruned"] == 6


def test_group_mode_prunes_coupled_residual_channels_together(art):
    from onp_env.models import build_model

    torch.manual_seed(0)
    x, y = art.defense_set()
    model = build_model("preact_resnet18", (1, 8, 8), 10, width=0.125).eval()
    e = NeuronPruningEnv(targets=[PruningTarget("resnet", model, x, y)], score="anp", group=True)
    e.reset(seed=0)
    group = e.task.layout.groups[0]
    first = e.task.layout.by_name[group[0]].offset + 2
    _, _, _, _, info = e.step(first)
    assert info["units"] == [e.task.layout.by_name[name].offset + 2 for name in group]


def test_a_users_model_and_defense_tensors_work_without_an_artifact():
    torch.manual_seed(0)
    x, y = torch.rand(40, 3, 10, 10), torch.arange(40) % 4
    e = NeuronPruningEnv(targets=[PruningTarget("mine", UserNet(), x, y)], score="unlearn",
                         score_kwargs={"batch_size": 8})  # fmt: skip
    obs, info = e.reset(seed=0)
    assert obs["counts"][0] == 6 and "asr" not in info
    _, _, _, _, info = e.step(0)
    assert info["pruned"] == 1


def _user(model=None, x=None, y=None):
    x = torch.rand(8, 3, 10, 10) if x is None else x
    return PruningTarget("m", model or UserNet(), x, torch.zeros(len(x), dtype=torch.long) if y is None else y)


@pytest.mark.parametrize(
    ("target", "overrides", "message"),
    [
        (lambda: _user(UserNet(torch.nn.LayerNorm([6, 8, 8]))), {}, "unsupported layer 'extra' of type LayerNorm"),
        (lambda: _user(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(300, 4))), {}, "no prunable units"),
        (lambda: _user(x=torch.rand(0, 3, 10, 10)), {}, "defense set is empty"),
        (lambda: _user(y=torch.arange(8)), {}, "mismatched class counts"),
        (lambda: _user(x=torch.rand(8, 1, 10, 10)), {}, "do not fit the model"),
        (lambda: _user(), {"score": "oracle"}, "needs the model's trigger"),
        (lambda: _user(), {"action_mode": "swap"}, "unknown action_mode"),
        (lambda: _user(), {"signal_scale": "cube"}, "unknown signal_scale 'cube'.*choose one of z, log-z"),
        (lambda: _user(), {"signal_spans": []}, r"signal_spans \[\] must list each of layer, model at most once"),
        (lambda: _user(), {"signal_spans": ["model", "model"]}, "signal_spans"),
        (lambda: _user(), {"signal_spans": ["net"]}, "signal_spans"),
        (lambda: _user(), {"features": ["inverted_asr"]}, "inverted_asr reads the inversion's trigger: add inversion"),
        (
            lambda: _user(),
            {"features": ["inversion", "inverted_asr"], "signal_params": {"inverted_asr": {"steps": 5}}},
            "inverted_asr takes no signal_params",
        ),
        (lambda: _user(), {"score_kwargs": {"steps": 3}}, "bad score_kwargs for anp"),
    ],
)
def test_bad_targets_and_settings_are_clear_errors(target, overrides, message):
    with pytest.raises(OnpError, match=message):
        NeuronPruningEnv(targets=[target()], **{"score": "anp", **overrides})


def test_nan_weights_are_refused():
    net = UserNet()
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(OnpError, match="NaN/inf values in conv.weight"):
        NeuronPruningEnv(targets=[_user(net)], score="anp")


def test_dynamic_features_are_the_pruned_models_clean_activations(art):
    e = NeuronPruningEnv(features=["dynamic"])
    obs, _ = e.reset(seed=0)
    layout, x = e.task.layout, e.task.clean.x

    def stats(units):
        model = load_artifact(art.path).model
        acts = {}
        modules = dict(model.named_modules())
        with Masks(model, layout) as masks, torch.no_grad():
            for lay in layout.layers:  # registered after the mask hooks: sees masked outputs
                modules[lay.name].register_forward_hook(lambda m, i, o, n=lay.name: acts.__setitem__(n, o))
            masks.prune(units)
            model(x)
        out = {}
        for lay in layout.layers:
            a = acts[lay.name].relu().transpose(0, 1).flatten(1)  # (units, images x positions)
            out[lay.name] = torch.stack([a.mean(1), a.std(1, unbiased=False)], 1)
        return out

    base = stats([])
    for a in (150, 20, 2):
        obs, *_ = e.step(a)
    now = stats([150, 20, 2])
    cols = [e.feature_names.index("act_mean_now"), e.feature_names.index("act_std_now")]
    for lay in layout.layers:
        mu, sd = base[lay.name].mean(0), base[lay.name].std(0, unbiased=False).clamp_min(1e-6)
        expected = ((now[lay.name] - mu) / sd).clamp(-10, 10)
        got = torch.as_tensor(obs["nodes"][lay.offset : lay.offset + lay.size][:, cols])
        assert torch.allclose(got, expected, atol=1e-4), lay.name
    assert obs["nodes"][2, cols[0]] < obs["nodes"][3, cols[0]]  # the pruned unit reads silent


def test_dense_oracle_reward_is_the_target_confidence_and_changes_no_observation(art):
    asr_env = NeuronPruningEnv(artifacts=[str(art.path)])
    dense = NeuronPruningEnv(artifacts=[str(art.path)], score_kwargs={"kind": "confidence"})
    (o1, i1), (o2, i2) = asr_env.reset(seed=0), dense.reset(seed=0)
    assert all(np.array_equal(o1[k], o2[k]) for k in o1)
    t = dense.task
    logits = t.triggered.logits(None)
    expected = logits.softmax(1).gather(1, t.trigger_targets[:, None]).mean().item()
    assert i2["backdoor_score"] == pytest.approx(expected) and 0 < expected <= 1 and i2["asr"] == i1["asr"]
    for a in [5, 60, 150]:
        s1, s2 = asr_env.step(a), dense.step(a)
        assert all(np.array_equal(s1[0][k], s2[0][k]) for k in s1[0])
    with pytest.raises(OnpError, match="kind: asr or confidence"):
        NeuronPruningEnv(artifacts=[str(art.path)], score_kwargs={"kind": "logit"})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_make_vec_batches_the_dict_observation(mode):
    envs = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode=mode)
    try:
        obs, _ = envs.reset(seed=[0, 1])
        assert all(v.shape[0] == 2 for v in obs.values()) and set(obs) == set(envs.single_observation_space.spaces)
        for _ in range(3):
            masks = np.stack(envs.call("action_masks"))
            actions = np.array([int(np.flatnonzero(m)[0]) for m in masks])
            obs, reward, term, trunc, _ = envs.step(actions)
            assert reward.shape == (2,) and envs.observation_space.contains(obs)
    finally:
        envs.close()


def test_an_evaluator_pass_lets_go_of_what_no_later_node_reads():
    import weakref

    from onp_env.env.evaluator import Evaluator, without_inplace
    from onp_env.graph.units import find_units

    torch.manual_seed(0)
    model = without_inplace(UserNet()).eval()
    x = torch.rand(8, 3, 10, 10)
    layout, gm = find_units(model, x[:2])
    seen: dict[str, weakref.ref] = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: weakref.ref(o)}))
             for name in ("conv", "bn")]  # fmt: skip
    alive_at_head = []
    hooks.append(model.head.register_forward_hook(lambda *_: alive_at_head.append(seen["bn"]() is not None)))
    with Masks(model, layout) as masks:
        ev, reference = Evaluator(gm, x, ["bn"]), Evaluator(gm, x, ["bn"], cache=False)
        first = ev.logits()
        # the conv output feeds the unit layer: the cache keeps it for the next pass; the unit layer's own output
        # is read by the ReLU alone, so by the time the head runs nothing holds it
        assert any(v is seen["conv"]() for v in ev.values.values()) and alive_at_head == [False]
        masks.prune([layout.by_name["bn"].offset + 1])
        assert torch.equal(ev.logits(["bn"]), reference.logits()) and not torch.equal(first, ev.last)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("semantics", ["zero", "gamma"])
def test_an_evaluator_reruns_only_the_hooks_of_a_linear_unit_layer_whose_inputs_did_not_change(semantics):
    """A Linear unit layer's output before its mask is kept (a tenth of its inputs' size): pruning its own units
    runs its mask on it, not its matmul. Logits equal a full pass each time."""
    from onp_env.env.evaluator import Evaluator, without_inplace
    from onp_env.graph.units import find_units

    from .test_signals import Head

    torch.manual_seed(0)
    model = without_inplace(Head(40, 4, 3)).eval()
    for q in (model.fc.weight, model.fc.bias, model.classifier.weight):
        torch.nn.init.normal_(q)
    x = torch.rand(16, 40)
    layout, gm = find_units(model, x[:2])
    calls = []
    forward = model.fc.forward
    model.fc.forward = lambda *a: calls.append(1) or forward(*a)
    fc = layout.by_name["fc"].offset
    with Masks(model, layout, semantics) as masks:
        ev, reference = Evaluator(gm, x, ["fc"]), Evaluator(gm, x, ["fc"], cache=False)
        first = ev.logits()
        for units in ([fc + 1], [fc + 3]):
            masks.prune(units)
            assert torch.equal(ev.logits(["fc"]), reference.logits()) and not torch.equal(ev.last, first)
        assert len(calls) == 1 + 2  # the first pass, then the reference's two
        masks.restore([fc + 1, fc + 3])
        assert torch.equal(ev.logits(["fc"]), first)
        ev.x = x + 1.0  # a full pass (changed None) runs the layer on what it reads now
        assert torch.equal(ev.logits(), Evaluator(gm, x + 1.0, ["fc"], cache=False).logits()) and len(calls) == 5
        # a module with a pre-hook is called as it is, and its kept output let go
        handle = model.fc.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
        masks.prune([fc + 2])
        assert torch.equal(ev.logits(["fc"]), Evaluator(gm, x + 1.0, ["fc"], cache=False).logits())
        assert not ev.raw
        handle.remove()


def _resnet_with_defense_statistics(n: int = 64):
    """A tiny PreAct ResNet whose BatchNorm statistics are those of its n defense images (one batch), so that
    re-estimating every layer after a cut changes only those below it: the reference for bn_stats."""
    from onp_env.models import build_model
    from onp_env.training import reestimate_batchnorm

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    torch.manual_seed(0)
    model = build_model("preact_resnet18", (1, 8, 8), 10, width=0.125)
    return reestimate_batchnorm(model, x, batch_size=n), x, y


@pytest.mark.parametrize("cache", [True, False])
def test_reestimated_bn_stats_read_each_cut_as_the_model_with_its_statistics_reestimated(cache):
    from onp_env.training import reestimate_batchnorm

    model, x, y = _resnet_with_defense_statistics()
    start = copy.deepcopy(model.state_dict())
    kw = {"score": "none", "cache": cache, "eval_images": len(x), "budget": 1.0, "max_acc_drop": 1.0}
    envs = {s: NeuronPruningEnv(targets=[PruningTarget("r", model, x, y)], bn_stats=s, **kw)
            for s in ("kept", "reestimated")}  # fmt: skip
    layout = envs["kept"].task.layout
    cut = [layout.layers[1].offset + 1, layout.layers[3].offset, layout.layers[3].offset + 2]  # two layers, early
    logits = {}
    for s, env in envs.items():
        env.reset(seed=0)
        for u in cut:
            env.step(u)
        logits[s] = env.task.clean.last
    expected = copy.deepcopy(model)
    with Masks(expected, layout) as masks:
        masks.prune(cut)
        with torch.no_grad():
            stale = expected.eval()(envs["kept"].task.clean.x)
        reestimate_batchnorm(expected, x, batch_size=len(x))
        with torch.no_grad():
            fresh = expected(envs["reestimated"].task.clean.x)
    assert torch.allclose(logits["kept"], stale, atol=1e-5)
    # the reference re-estimates every layer at once, normalising those above the cut with their batch's biased
    # variance as it goes; the env keeps their statistics (the images' unbiased ones): 2e-3 apart here
    assert torch.allclose(logits["reestimated"], fresh, atol=1e-2)
    assert (logits["kept"] - fresh).abs().max() > 0.5  # the cut shifted the statistics below it this much
    env = envs["reestimated"]
    env.reset(seed=0)  # each episode starts from the statistics the model was trained with
    now = env.task.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in start.items())
    with torch.no_grad():
        assert torch.equal(env.task.clean.last, model.eval()(env.task.clean.x))


def test_bn_stats_is_kept_or_reestimated():
    with pytest.raises(OnpError, match="unknown bn_stats 'fresh'"):
        NeuronPruningEnv(bn_stats="fresh")
