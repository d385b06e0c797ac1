"""The task suites (onp_env.suite): ids, pinned zoos, the standard evaluation, validation and the report.

Two of the digits suite's eight test models (seconds each) are built once per session into the test
cache (conftest's digits_test_split); the whole split is a `slow` test."""

import json

import gymnasium as gym
import numpy as np
import pytest

from onp_env.cli import main
from onp_env.errors import OnpError
from onp_env.results import append
from onp_env.suite.evaluate import evaluate, read_suite_rows, validate
from onp_env.suite.policies import make_policy, policy_names
from onp_env.suite.report import report_md
from onp_env.suite.spec import SPLITS, SUITES, get_suite
from onp_env.suite.stats import bootstrap_ci, iqm
from onp_env.suite.zoo import ZooMismatchWarning, build_split, manifest_path, read_manifest

from .conftest import DIGITS_TEST_MODELS, ROOT

DIGITS = "onp_env/Digits-v0"
# one worker builds the test split and runs every test that reads it; the others do not wait for it
pytestmark = pytest.mark.xdist_group("digits-v0-test")


@pytest.fixture(scope="module")
def test_env(digits_test_split):
    env = gym.make(DIGITS, split="test", models=DIGITS_TEST_MODELS, progress=False)
    yield env
    env.close()


def test_splits_are_disjoint_and_test_ood_holds_the_held_out_attack_only():
    for spec in SUITES.values():
        labs = {split: spec.labs(split) for split in SPLITS}
        prints = [{lab.fingerprint() for _, lab in labs[s]} for s in SPLITS]
        assert not (prints[0] & prints[1]) and not (prints[0] & prints[2]) and not (prints[1] & prints[2])
        seeds = [{lab.seed for _, lab in labs[s]} for s in SPLITS]
        assert not (seeds[0] & seeds[1]) and not (seeds[1] & seeds[2]) and not (seeds[0] & seeds[2])
        attacks = [{lab.attack.name for _, lab in labs[s]} for s in SPLITS]
        assert spec.held_out_attack not in attacks[0] | attacks[1] and spec.held_out_attack in attacks[2]
        names = [n for s in SPLITS for n, _ in labs[s]]
        assert len(set(names)) == len(names) and names[0] == f"{spec.name}/train/000"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_shipped_manifest_matches_its_recipe(suite):
    data = read_manifest(get_suite(suite))
    assert len(data["models"]) == sum(len(get_suite(suite).labs(s)) for s in SPLITS)


def test_make_a_suite_split_and_pick_a_model_by_its_stable_name(test_env):
    e = test_env.unwrapped
    assert e.names == DIGITS_TEST_MODELS and len(e.suite.labs("test")) == 8
    assert all(m.status in ("identical", "within") for m in e.models)
    obs, info = test_env.reset(seed=0, options={"model": "digits-v0/test/002"})
    assert info["model"] == "digits-v0/test/002" and test_env.observation_space.contains(obs)
    # frozen padding: every split (and so train and test) shares the observation space
    assert obs["nodes"].shape[0] == get_suite("digits-v0").env["max_units"]


@pytest.mark.slow  # the five other models, two of them TrojanNN (about a minute on two cores)
def test_the_whole_test_split_builds_within_its_manifest():
    # in two processes (`onp suite build --workers 2`): the weights must be those of the manifest all the same
    build_split(get_suite("digits-v0"), "test", progress=False, workers=2)
    env = gym.make(DIGITS, split="test", progress=False)
    e = env.unwrapped
    assert e.names == [f"digits-v0/test/{i:03d}" for i in range(8)]
    assert all(m.status in ("identical", "within") for m in e.models)
    env.close()


def test_evaluate_validate_and_report_on_digits(test_env, tmp_path):
    out = tmp_path / "rows.jsonl"
    models = DIGITS_TEST_MODELS
    rows = []
    for name in ("stop", "random", "oracle", "mnp"):
        rows += evaluate(make_policy(name, seed=0), "digits-v0", "test", name=name, models=models, out=out,
                         env=test_env, progress=False)  # fmt: skip
    assert [r["model"] for r in rows[:2]] == models
    stop = [r for r in rows if r["policy"] == "stop"]
    assert all(r["return"] == 0.0 and r["actions"] == [176] and r["pruned"] == 0 for r in stop)
    oracle = [r for r in rows if r["policy"] == "oracle"]
    assert all(r["return"] > 0 and r["asr_after"] < r["asr_before"] for r in oracle)
    assert read_suite_rows(out) == json.loads(json.dumps(rows))
    assert validate(read_suite_rows(out), progress=False) == len(rows)
    text = report_md(rows, "test machine")
    line = next(ln for ln in text.splitlines() if ln.startswith("| oracle |"))
    assert "| 1.000 [1.000, 1.000] |" in line
    assert next(ln for ln in text.splitlines() if ln.startswith("| stop |")).count("0.000") == 3


def test_a_row_that_does_not_replay_is_refused_with_its_model(test_env, tmp_path):
    (row,) = evaluate(make_policy("oracle"), "digits-v0", "test", name="oracle", models=["digits-v0/test/002"],
                      env=test_env, progress=False)  # fmt: skip
    for field, value, match in (("return", row["return"] + 0.5, "return replays as"),
                                ("actions", row["actions"][:-1], "actions end before the episode"),
                                ("model", "digits-v0/test/999", "no such model")):  # fmt: skip
        with pytest.raises(OnpError, match=match):
            validate([{**row, field: value}], progress=False)
    with pytest.raises(OnpError, match="made on other weights"):
        validate([{**row, "weights_sha256": "0" * 64}], progress=False)
    with pytest.raises(OnpError, match="other env settings"):
        validate([{**row, "env": {**row["env"], "budget": 0.9}}], progress=False)
    with pytest.raises(OnpError, match="other env settings"):
        validate([{**row, "env": {**row["env"], "signal_scale": "log-z"}}], progress=False)
    with pytest.raises(OnpError, match="signal_scale"):
        validate([{**row, "env": {**row["env"], "signal_scale": "cube"}}], progress=False)
    # rows made before a setting existed replay under its default, which keeps their observations
    older = {k: v for k, v in row["env"].items() if k not in ("signal_scale", "signal_spans")}
    assert validate([{**row, "env": older}], progress=False) == 1
    edits = [({"return": "high"}, "field 'return' must be a finite number"),
             ({"steps": row["steps"] + 1}, "actions for"),
             ({"train_steps": [1]}, "field 'train_steps' must be an integer"),
             ({"model": "digits-v0/train/000"}, "which is not of digits-v0/test"),
             ({"model": "digits-v0/test/099"}, "no model 'digits-v0/test/099'"),
             ({"suite": "digits-v9", "model": "digits-v9/test/001"}, "row 1: unknown suite")]  # fmt: skip
    for n, (edit, message) in enumerate(edits):
        path = tmp_path / f"rows{n}.jsonl"
        append(path, {**row, **edit})
        with pytest.raises(OnpError, match=message):
            read_suite_rows(path)
    twice = tmp_path / "twice.jsonl"
    append(twice, row)
    append(twice, row)
    with pytest.raises(OnpError, match="a second row of oracle"):
        read_suite_rows(twice)
    assert main(["suite", "validate", str(tmp_path / "missing.jsonl")]) == 2


def test_a_policy_choosing_a_masked_action_is_refused(test_env):
    class PruneZeroTwice:
        def act(self, env, obs, info):
            return 0

    with pytest.raises(OnpError, match="action 0 at step 1 is masked"):
        evaluate(PruneZeroTwice(), "digits-v0", "test", name="bad", models=["digits-v0/test/000"], env=test_env,
                 progress=False)  # fmt: skip


def test_bad_names_get_one_line(test_env, capsys):
    with pytest.raises(OnpError, match="unknown suite 'digits-v9'.*onp suite list"):
        get_suite("digits-v9")
    with pytest.raises(OnpError, match="unknown split 'validation'"):
        gym.make(DIGITS, split="validation")
    with pytest.raises(OnpError, match="unexpected keyword argument 'budget': it freezes its settings"):
        gym.make(DIGITS, split="test", budget=0.5)
    with pytest.raises(OnpError, match="'digits-v0/train/000' is not in digits-v0/test"):
        evaluate(make_policy("stop"), "digits-v0", "test", name="stop", models=["digits-v0/train/000"],
                 env=test_env, progress=False)  # fmt: skip
    with pytest.raises(OnpError, match="'digits-v0/test/007' is not in digits-v0/test: the env given holds"):
        evaluate(make_policy("stop"), "digits-v0", "test", name="stop", models=["digits-v0/test/007"],
                 env=test_env, progress=False)  # fmt: skip
    with pytest.raises(OnpError, match="no model 'digits-v0/test/099' in digits-v0/test"):
        gym.make(DIGITS, split="test", models=["digits-v0/test/099"])
    assert main(["suite", "evaluate", "digits-v0", "--split", "test", "--policy", "nope", "--out", "r.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown policy 'nope'" in err[0] and "oracle" in err[0]
    with pytest.raises(SystemExit) as exit_:
        main(["suite", "build", "digits-v0", "--workers", "0"])
    assert exit_.value.code == 2 and "workers must be between 1 and 256" in capsys.readouterr().err
    with pytest.raises(OnpError, match="workers must be a whole number >= 1"):
        build_split(get_suite("digits-v0"), "test", progress=False, workers=True)


def test_a_tampered_manifest_is_refused_before_anything_is_built(tmp_path):
    spec = get_suite("digits-v0")
    data = json.loads(manifest_path(spec).read_text())
    data["models"][3]["fingerprint"] = "0" * 16
    bad = tmp_path / "digits-v0.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(OnpError, match="does not match the recipe's digits-v0/train/003.*was edited"):
        read_manifest(spec, bad)
    data = json.loads(manifest_path(spec).read_text())
    data["models"][0]["acc"] = 7
    bad.write_text(json.dumps(data))
    with pytest.raises(OnpError, match=r"acc must be a number in \[0, 1\]"):
        build_split(spec, "test", tmp_path / "cache", progress=False, manifest=bad)
    assert not (tmp_path / "cache").exists()
    data = json.loads(manifest_path(spec).read_text())
    data["models"][5]["attack"]["target"] = (data["models"][5]["attack"]["target"] + 1) % 10
    bad.write_text(json.dumps(data))
    with pytest.raises(OnpError, match="digits-v0/train/005.attack is not the recipe's"):
        read_manifest(spec, bad)


def test_a_model_outside_the_manifest_tolerance_warns(tmp_path):
    spec = get_suite("digits-v0")
    data = json.loads(manifest_path(spec).read_text())
    entry = next(m for m in data["models"] if m["name"] == "digits-v0/test/000")
    entry["acc"], entry["sha256"] = max(0.0, entry["acc"] - 0.2), "f" * 64
    edited = tmp_path / "digits-v0.json"
    edited.write_text(json.dumps(data))
    with pytest.warns(ZooMismatchWarning, match="digits-v0/test/000 built here has ACC"):
        models = build_split(spec, "test", None, progress=False, manifest=edited, names=DIGITS_TEST_MODELS[:2])
    assert models[0].status == "outside" and models[1].status != "outside"


def test_policies_are_found_by_name():
    assert {"stop", "random", "oracle", "onp", "mnp", "anp", "nc", "verdict"} <= set(policy_names())
    with pytest.raises(OnpError, match="seed cannot be a parameter"):
        make_policy("mnp", {"seed": 3})


def test_iqm_is_rliables_and_the_interval_covers_it():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (1, 5, 8, 13):
        x = rng.normal(size=n)
        assert iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25))
    scores = [rng.normal(i / 10, 0.1, size=3) for i in range(10)]
    lo, hi = bootstrap_ci(scores, reps=300)
    assert lo < iqm(np.concatenate(scores)) < hi
    assert bootstrap_ci(scores, reps=300) == (lo, hi)  # seeded


def test_suite_list_prints_every_suite(capsys):
    assert main(["suite", "list"]) == 0
    out = capsys.readouterr().out
    assert all(s.gym_id in out for s in SUITES.values())
    assert main(["suite", "list", "digits-v0", "--split", "test-ood"]) == 0
    assert "digits-v0/test-ood/000" in capsys.readouterr().out


def test_the_cleanrl_style_example_learns_for_a_few_hundred_steps_and_evaluates(test_env):
    import runpy

    example = runpy.run_path(str(ROOT / "docs" / "examples" / "masked_ppo.py"))
    args = example["Args"](split="test", models=DIGITS_TEST_MODELS, total_timesteps=256, num_envs=2, num_steps=32,
                           seed=3)  # fmt: skip
    agent, returns = example["train"](args)
    assert returns and all(np.isfinite(returns))
    rows = evaluate(example["Greedy"](agent), "digits-v0", "test", name="example", models=["digits-v0/test/000"],
                    env=test_env, progress=False)  # fmt: skip
    assert validate(rows, progress=False) == 1


def test_an_agent_config_trains_on_the_suites_train_split_in_its_env():
    from agents.config import load_agent_config
    from agents.train import zoo_configs

    cfg = load_agent_config(str(ROOT / "configs" / "agent" / "digits-v0.yaml"), [])
    train = [lab.fingerprint() for _, lab in get_suite("digits-v0").labs("train")]
    assert [lab.fingerprint() for lab in zoo_configs(cfg)] == train
    with pytest.raises(OnpError, match="frozen settings; set budget: 0.3"):
        load_agent_config(str(ROOT / "configs" / "agent" / "digits-v0.yaml"), ["env.budget=0.5"])
    with pytest.raises(OnpError, match="frozen settings; set alpha: 1.0"):  # a default the suite keeps, too
        load_agent_config(str(ROOT / "configs" / "agent" / "digits-v0.yaml"), ["env.alpha=2"])
    with pytest.raises(OnpError, match="unknown suite"):
        load_agent_config(str(ROOT / "configs" / "agent" / "digits-v0.yaml"), ["zoo.suite=digits-v7"])
    fm = load_agent_config(str(ROOT / "configs" / "agent" / "fashion-mnist-v0.yaml"), [])
    assert len(zoo_configs(fm)) == len(get_suite("fashion-mnist-v0").labs("train"))
    with pytest.raises(OnpError, match="without a class reference: set signal_reference: false"):
        load_agent_config(str(ROOT / "configs" / "agent" / "fashion-mnist-v0.yaml"), ["signal_reference=true"])


def test_torchrl_gymenv_with_its_action_mask_transform(test_env):
    """TorchRL (in the dev extras) wraps a suite id; the mask comes from info, its ActionMask transform
    applies it, and its own spec checker passes."""
    pytest.importorskip("torchrl")
    import torch
    from torchrl.data import Binary
    from torchrl.envs import GymEnv, TransformedEnv
    from torchrl.envs.libs.gym import default_info_dict_reader
    from torchrl.envs.transforms import ActionMask
    from torchrl.envs.utils import check_env_specs

    env = GymEnv(DIGITS, split="test", models=DIGITS_TEST_MODELS, progress=False)
    n = env.action_spec.space.n
    env.set_info_dict_reader(
        default_info_dict_reader(["action_mask"], spec={"action_mask": Binary(n, dtype=torch.bool)})
    )
    env = TransformedEnv(env, ActionMask())
    torch.manual_seed(0)
    check_env_specs(env)
    rollout = env.rollout(12)
    chosen = rollout["action"].argmax(-1)
    assert rollout["action_mask"].gather(-1, chosen[:, None]).all()  # every random action was a valid one
    env.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_make_vec_and_check_env_on_a_suite_id(mode, test_env):
    from stable_baselines3.common.env_checker import check_env

    check_env(test_env.unwrapped, warn=False)
    envs = gym.make_vec(DIGITS, num_envs=2, vectorization_mode=mode, split="test", models=DIGITS_TEST_MODELS,
                        progress=False)  # fmt: skip
    try:
        obs, _ = envs.reset(seed=[0, 1])
        assert obs["nodes"].shape[0] == 2
        masks = np.stack(envs.call("action_masks"))
        obs, reward, *_ = envs.step(np.array([int(np.flatnonzero(m)[0]) for m in masks]))
        assert reward.shape == (2,) and envs.observation_space.contains(obs)
    finally:
        envs.close()


def test_an_agent_of_other_features_is_refused_before_the_suite_is_built(tmp_path, capsys):
    code = main(["suite", "evaluate", "digits-v0", "--split", "train", "--policy", "onp", "--out", "r.jsonl",
                 "--cache", str(tmp_path / "empty")])  # fmt: skip
    assert code == 2 and "trained in another env (features" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # nothing was built
