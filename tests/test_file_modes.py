"""Every writer of the project makes its folders and files as a plain mkdir and open would: the
umask decides the mode, so a shared cache or results folder stays readable by the group the user
chose (README, "Files and folders it writes"). Temporary names never stay behind."""

import os
import stat
from pathlib import Path

import pytest
import torch

from agents.config import load_agent_config
from agents.train import train_agent
from onp_env.bench.config import BenchConfig, check
from onp_env.bench.run import run_bench, unpack
from onp_env.config import from_dict
from onp_env.defend import defend_artifact
from onp_env.results import append, end_last_line

ROOT = Path(__file__).resolve().parents[1]
UMASK = 0o007  # neither the usual 022 nor what tempfile gives (0700 folders, 0600 files)


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def assert_modes_follow_the_umask(folder: Path, umask: int) -> None:
    entries = [folder, *folder.rglob("*")]
    assert len(entries) > 1
    for p in entries:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        got = stat.S_IMODE(p.lstat().st_mode)
        assert got == want, f"{p.relative_to(folder.parent)} is {got:o}, the umask gives {want:o}"
        assert not p.name.endswith(".tmp") and ".tmp." not in p.name


def test_a_trained_agents_run_folder_and_agent(tmp_path, umask):
    tiny = ["zoo.base.model.kwargs={channels: [8, 8], hidden: 16}", "zoo.base.train.epochs=3", "zoo.seeds=[1]",
            "ppo.total_steps=128", "ppo.n_steps=64", "ppo.n_epochs=1", "imitation.episodes=1", "imitation.epochs=1",
            "checkpoint_every=64"]  # fmt: skip
    agent = train_agent(
        load_agent_config(str(ROOT / "configs/agent/digits.yaml"), tiny), tmp_path / "run", progress=False
    )
    assert (agent / "policy.safetensors").is_file()
    assert_modes_follow_the_umask(tmp_path / "run", umask)


def test_a_defended_artifact(tiny_artifact, tmp_path, umask):
    out, _ = defend_artifact(tiny_artifact, "magnitude", {"ratio": 0.1}, tmp_path / "defended")
    assert (out / "report.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["defended"]
    assert_modes_follow_the_umask(out, umask)


def test_a_bench_folder_its_plots_and_the_shipped_copies(tmp_path, umask):
    grid = {"name": "tiny", "models": [{"name": "small_cnn", "kwargs": {"channels": [8, 8], "hidden": 16}}],
            "train": {"epochs": 3}, "seeds": [101], "defenses": [{"name": "magnitude"}]}  # fmt: skip
    cfg = from_dict(BenchConfig, grid, "tiny")
    check(cfg)
    run_bench(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "plots").is_dir()
    results = tmp_path / "b" / "results.jsonl"
    results.write_text(results.read_text()[:-3])  # a crash mid-append: the repair keeps the file's mode
    os.chmod(results, 0o666 & ~umask)
    end_last_line(results)
    append(tmp_path / "b" / "new.jsonl", {"key": "x"})
    unpack({"weights.safetensors": b"x", "sub/manifest.json": b"{}"}, tmp_path / "b" / "shipped")
    assert_modes_follow_the_umask(tmp_path / "b", umask)


def test_a_lab_artifact(tmp_path, umask):
    from onp_env import build_artifact

    from .conftest import tiny_config

    torch.manual_seed(0)
    build_artifact(tiny_config("train.epochs=1"), tmp_path / "zoo", progress=False)
    assert_modes_follow_the_umask(tmp_path / "zoo", umask)
