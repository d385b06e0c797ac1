"""Device selection end to end (`device`: cpu, cuda, cuda:N or auto): an explicit `cpu` changes no
number, a GPU that is not there is one clear error before any work, and, where torch sees a GPU,
every defense, the environment and the learned policy give the CPU's results on it."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from agents.defense import ONP
from agents.gnn import PolicyConfig
from agents.io import save_agent
from agents.policy import build_net
from baselines import DEFENSES
from onp_env import OnpError, load_artifact
from onp_env.bench.config import BenchConfig, check
from onp_env.cli import main
from onp_env.config import from_dict
from onp_env.defend import defend_artifact
from onp_env.devices import device_of
from onp_env.env import EnvConfig, NeuronPruningEnv

from .conftest import ROOT
from .test_baselines import QUICK

GPU = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU that torch sees: a GPU machine with a CUDA build of torch"
)


@pytest.fixture
def no_gpu(monkeypatch):
    """As on a machine without a GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _defend(art, method, tmp_path, **run):
    out = tmp_path / f"{method}-{'-'.join(map(str, run.values())) or 'default'}"
    _, report = defend_artifact(art, method, {**QUICK.get(method, {}), **run}, out)
    return load_artifact(out).manifest["defense"]["pruned_units"], report


def _agent(tmp_path, art, action_mode="neuron"):
    """An untrained policy saved as an agent: deploys like a trained one, at no training cost."""
    cfg = EnvConfig(action_mode=action_mode)
    env = NeuronPruningEnv(cfg, artifacts=[str(art)])
    torch.manual_seed(0)
    net = build_net(PolicyConfig(), env.observation_space)
    return save_agent(tmp_path / f"agent-{action_mode}", net, PolicyConfig(), env.cfg, {"steps": 0})


def test_device_of_a_module():
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(nn.ReLU()) == torch.device("cpu")  # nothing to hold: the CPU
    assert device_of(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only


@pytest.mark.parametrize("method", ["magnitude", "clp", "anp", "fp"])
def test_an_explicit_cpu_changes_no_number(tiny_artifact, tmp_path, method):
    units, report = _defend(tiny_artifact, method, tmp_path)
    units_cpu, report_cpu = _defend(tiny_artifact, method, tmp_path, device="cpu")
    assert units == units_cpu
    for key in ("acc", "asr", "ra", "der", "before", "finetuned"):
        assert report.get(key) == report_cpu.get(key)


def test_the_learned_defense_on_an_explicit_cpu_prunes_the_same_units(tiny_artifact, tmp_path):
    art = load_artifact(tiny_artifact)
    agent = _agent(tmp_path, tiny_artifact)
    default = ONP(agent=str(agent)).run(art.model, *art.defense_set())
    cpu = ONP(agent=str(agent), device="cpu").run(art.model, *art.defense_set())
    assert default.pruned == cpu.pruned and torch.equal(default.scores, cpu.scores)


def test_defend_refuses_a_missing_gpu_before_the_defense_runs(tiny_artifact, tmp_path, no_gpu, no_work):
    with pytest.raises(OnpError, match="device cuda requested but torch sees no GPU: use device cpu or auto"):
        defend_artifact(tiny_artifact, "magnitude", {"device": "cuda"}, tmp_path / "out")
    with pytest.raises(OnpError, match="unknown device 'gpu'"):
        defend_artifact(tiny_artifact, "magnitude", {"device": "gpu"}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_defend_on_a_missing_gpu_exits_2_with_one_line(tiny_artifact, tmp_path, no_gpu, no_work, capsys):
    args = ["defend", "--method", "magnitude", "--artifact", str(tiny_artifact), "--set", "device=cuda",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("onp: error: device cuda requested but torch sees no GPU") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_env_agent_and_bench_configs_refuse_a_missing_gpu(no_gpu, monkeypatch):
    from agents.config import load_agent_config

    with pytest.raises(OnpError, match="torch sees no GPU"):
        EnvConfig(device="cuda").validate()
    monkeypatch.setattr("onp_env.zoo.default_artifact", lambda: pytest.fail("a model was loaded before the check"))
    with pytest.raises(OnpError, match="device cuda:0 requested but torch sees no GPU"):
        NeuronPruningEnv(device="cuda:0")
    assert EnvConfig(device="auto").validate().device == "auto"  # auto is the CPU here
    for key in ("device", "env.device"):
        with pytest.raises(OnpError, match="torch sees no GPU"):
            load_agent_config(str(ROOT / "configs" / "agent" / "digits.yaml"), [f"{key}=cuda"])
    grid = {"models": [{"name": "small_cnn"}], "defenses": [{"name": "magnitude", "params": {"device": "cuda"}}]}
    with pytest.raises(OnpError, match="torch sees no GPU"):
        check(from_dict(BenchConfig, grid, "grid"))


@GPU
@pytest.mark.parametrize("method", sorted(DEFENSES))
def test_every_baseline_gives_the_cpus_units_and_metrics_on_a_gpu(tiny_artifact, tmp_path, method):
    units_cpu, cpu = _defend(tiny_artifact, method, tmp_path, device="cpu")
    units_gpu, gpu = _defend(tiny_artifact, method, tmp_path, device="cuda")
    assert units_gpu == units_cpu
    for key in ("acc", "asr", "ra", "der"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-3)
    assert ("finetuned" in gpu) == ("finetuned" in cpu)
    for key in ("acc", "asr", "ra") if "finetuned" in cpu else ():
        assert gpu["finetuned"][key] == pytest.approx(cpu["finetuned"][key], abs=1e-3)


@GPU
def test_a_defense_hands_back_cpu_models_and_scores_from_a_gpu(tiny_artifact):
    art = load_artifact(tiny_artifact)
    result = DEFENSES["fp"](device="cuda", **QUICK["fp"]).run(art.model, *art.defense_set())
    assert result.finetuned is not None
    assert device_of(result.model) == device_of(result.finetuned) == result.scores.device == torch.device("cpu")
    assert device_of(art.model) == torch.device("cpu")  # the caller's model is never moved


@GPU
@pytest.mark.parametrize("score", ["oracle", "unlearn", "anp"])
def test_an_env_episode_on_a_gpu_observes_what_the_cpu_does(tiny_artifact, score):
    settings = {"artifacts": [str(tiny_artifact)], "score": score, "features": ["dynamic", "mnp"],
                "signal_params": {"mnp": {"suppress_epochs": 2, "mask_epochs": 2}}}  # fmt: skip
    episodes = []
    for device in ("cpu", "cuda"):
        env = NeuronPruningEnv(settings, device=device)
        obs, info = env.reset(seed=0)
        steps = [(obs, info)]
        for action in (0, 5, 9, env.max_units):
            obs, reward, terminated, truncated, info = env.step(action)
            steps.append((obs, {**info, "reward": reward}))
            if terminated or truncated:
                break
        episodes.append(steps)
    for (obs_cpu, info_cpu), (obs_gpu, info_gpu) in zip(*episodes, strict=True):
        for key in obs_cpu:
            assert isinstance(obs_gpu[key], np.ndarray)
            np.testing.assert_allclose(obs_gpu[key], obs_cpu[key], atol=1e-3, err_msg=key)
        for key in ("acc", "asr", "backdoor_score", "reward"):
            if key in info_cpu:
                assert info_gpu[key] == pytest.approx(info_cpu[key], abs=1e-3)


@GPU
@pytest.mark.parametrize("action_mode", ["neuron", "layer"])
def test_the_learned_defense_deploys_on_a_gpu(tiny_artifact, tmp_path, action_mode):
    art = load_artifact(tiny_artifact)
    agent = _agent(tmp_path, tiny_artifact, action_mode)
    cpu = ONP(agent=str(agent), device="cpu").run(art.model, *art.defense_set())
    gpu_defense = ONP(agent=str(agent), device="cuda")
    assert device_of(gpu_defense.agent.net).type == "cuda" and gpu_defense.agent.env.device == "cuda"
    gpu = gpu_defense.run(art.model, *art.defense_set())
    assert gpu.pruned == cpu.pruned and device_of(gpu.model) == torch.device("cpu")
    out = tmp_path / "onp"
    _, report = defend_artifact(tiny_artifact, "onp", {"agent": str(agent), "device": "cuda"}, out)
    assert json.loads((out / "report.json").read_text())["pruned"] == report["pruned"] == len(cpu.pruned)
