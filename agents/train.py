"""`onp train-agent`: a GNN pruning policy trained with MaskablePPO on shadow models.

Read top to bottom, `train_agent` does:
1. check the config and the output folder (before anything expensive);
2. build the shadow zoo (attacks x seeds) through the lab's artifact cache, and on it the class
   reference of the signals that name a suspected class;
3. make the environments (oracle reward: the shadow models' triggers are known);
4. optionally warm-start the policy by cloning the oracle expert, then DAgger (agents.expert);
5. run PPO with a progress bar, CSV/TensorBoard logs and an atomic checkpoint every
   `checkpoint_every` steps; `resume=True` continues from the last checkpoint (step counter,
   optimizer state and all);
6. save the deployable agent (agents.io: safetensors + JSON, no pickle).

Run folder: config.json, checkpoint.zip (SB3's zip, for resuming *this* run only: it holds
cloudpickled objects), seconds.json (training time up to the checkpoint), logs/ (progress.csv,
TensorBoard events), imitation.json, agent/."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from tqdm.auto import tqdm

from agents.config import AgentConfig, validate
from agents.expert import imitate
from agents.io import save_agent
from agents.policy import GraphMaskablePolicy
from onp_env.artifacts import load_artifact, write_text_atomic
from onp_env.config import LabConfig, from_dict, to_dict
from onp_env.devices import resolve_device
from onp_env.env import EnvConfig, NeuronPruningEnv
from onp_env.env.signals import with_reference
from onp_env.errors import OnpError
from onp_env.zoo import build_artifact

CONFIG, CHECKPOINT, AGENT, SECONDS = "config.json", "checkpoint.zip", "agent", "seconds.json"


def zoo_configs(cfg: AgentConfig) -> list[LabConfig]:
    """One LabConfig per shadow model: base x attacks x seeds, or a suite's train split."""
    if cfg.zoo.suite is not None:
        from onp_env.suite.spec import get_suite

        return [lab for _, lab in get_suite(cfg.zoo.suite).labs("train")]
    out = []
    for attack in cfg.attack_configs():
        for seed in cfg.zoo.seeds:
            name = f"{cfg.name}-shadow-{attack.key}-s{seed}"
            out.append(dataclasses.replace(cfg.zoo.base, name=name, seed=seed, attack=attack))
    return out


def build_zoo(cfg: AgentConfig, cache: str | Path | None = None, progress: bool = True) -> list[str]:
    """Artifact directories of the shadow models (trained on first use, then cached)."""
    labs = zoo_configs(cfg)
    return [str(build_artifact(lab, cache, progress)) for lab in tqdm(labs, desc="shadow models", disable=not progress)]


def trained_on(artifact: str) -> dict[str, Any]:
    """The data the shadow models share (a signal reference holds only for it): name, input shape, classes."""
    info = load_artifact(artifact).manifest["dataset"]
    return {"name": info["name"], "shape": list(info["shape"]), "classes": info["num_classes"]}


def _make_env(env_cfg: EnvConfig) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        torch.set_num_threads(1)
        return Monitor(NeuronPruningEnv(env_cfg), info_keywords=("acc", "asr", "pruned"))

    return make


class Progress(BaseCallback):
    """A tqdm bar over environment steps, and `save` (an atomic checkpoint) every `every` steps."""

    def __init__(self, total: int, every: int, save: Callable[[], None], show: bool):
        super().__init__()
        self.total, self.every, self.save, self.show = total, every, save, show
        self.last_saved = 0

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, initial=self.model.num_timesteps, desc="ppo", unit="step",
                        disable=not self.show)  # fmt: skip
        self.last_saved = self.model.num_timesteps

    def _on_step(self) -> bool:
        self.bar.update(self.model.num_timesteps - self.bar.n)
        if self.model.num_timesteps - self.last_saved >= self.every:
            self.save()
            self.last_saved = self.model.num_timesteps
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def save_checkpoint(model: BaseAlgorithm, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def _check_out(cfg: AgentConfig, out: Path, resume: bool) -> bool:
    """Whether the run resumes from a checkpoint; refuses to mix two configs in one folder."""
    if out.exists() and not out.is_dir():
        raise OnpError(f"{out} is a file: --out must be a directory")
    saved = out / CONFIG
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise OnpError(f"{out} is not empty: pass --resume to continue that run, or another --out")
        return False
    if not saved.is_file():
        raise OnpError(f"{out} holds no run to resume (no {CONFIG}): start it without --resume")
    try:  # through the schema: a field added since the run started takes its default, as it did then
        before = to_dict(from_dict(AgentConfig, json.loads(saved.read_text()), str(saved)))
    except (json.JSONDecodeError, UnicodeDecodeError, OnpError):
        before = None
    if before != to_dict(cfg):
        raise OnpError(f"the config differs from the one {out} was started with: resume with the same config and --set")
    if (out / AGENT).exists():
        raise OnpError(f"{out} is finished ({out / AGENT} exists): nothing to resume")
    return (out / CHECKPOINT).is_file()


def _seconds_spent(out: Path) -> float:
    """Training seconds up to the checkpoint being resumed (0 when unknown: it only feeds reports)."""
    try:
        seconds = float(json.loads((out / SECONDS).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    return seconds if 0 <= seconds < float("inf") else 0.0


def train_agent(cfg: AgentConfig, out: str | Path, resume: bool = False, cache: str | Path | None = None,
                progress: bool = True) -> Path:  # fmt: skip
    """Train an agent into the run folder `out`; returns the deployable agent's directory."""
    # 1. checks
    validate(cfg)
    out = Path(out)
    has_checkpoint = _check_out(cfg, out, resume)
    device = resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / CONFIG, json.dumps(to_dict(cfg), indent=1))
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    spent = _seconds_spent(out) if has_checkpoint else 0.0

    def checkpoint() -> None:
        """The SB3 zip, then the seconds spent so far: a resumed run reports its whole training time."""
        save_checkpoint(model, out / CHECKPOINT)
        write_text_atomic(out / SECONDS, json.dumps({"seconds": spent + time.perf_counter() - start}))

    # 2. shadow models
    artifacts = build_zoo(cfg, cache, progress)
    signal_params = cfg.env.signal_params
    if cfg.signal_reference:
        signal_params = with_reference(cfg.env.features, signal_params, artifacts, cfg.env.device, progress)
    deployed = dataclasses.replace(cfg.env, signal_params=signal_params)
    env_cfg = dataclasses.replace(deployed, artifacts=artifacts, score="oracle")

    # 3. environments
    fns = [_make_env(env_cfg)] * cfg.n_envs
    vec: VecEnv = SubprocVecEnv(fns, start_method="spawn") if cfg.vec_env == "subproc" else DummyVecEnv(fns)
    formats = ["csv"]
    try:
        import tensorboard  # noqa: F401

        formats.append("tensorboard")
    except ImportError:
        pass
    logger = configure(str(out / "logs"), formats)
    p = cfg.ppo
    try:
        if has_checkpoint:
            model = MaskablePPO.load(out / CHECKPOINT, env=vec, device=device)
        else:
            model = MaskablePPO(
                GraphMaskablePolicy, vec, learning_rate=p.lr, n_steps=p.n_steps, batch_size=p.batch_size,
                n_epochs=p.n_epochs, gamma=p.gamma, gae_lambda=p.gae_lambda, clip_range=p.clip_range,
                ent_coef=p.ent_coef, vf_coef=p.vf_coef, max_grad_norm=p.max_grad_norm, seed=cfg.seed,
                device=device, policy_kwargs={"policy": to_dict(cfg.policy)},
            )  # fmt: skip
            # 4. warm start
            if cfg.imitation.episodes:
                summary = imitate(NeuronPruningEnv(env_cfg), model.policy, cfg.imitation, cfg.seed, progress)
                write_text_atomic(out / "imitation.json", json.dumps(summary))
            checkpoint()
        model.set_logger(logger)

        # 5. PPO
        remaining = max(p.total_steps - model.num_timesteps, 0)
        if remaining:
            callback = Progress(p.total_steps, cfg.checkpoint_every, checkpoint, progress)
            model.learn(remaining, callback=callback, reset_num_timesteps=False)
            checkpoint()
    finally:
        vec.close()

    # 6. the deployable agent
    training = {
        "steps": int(model.num_timesteps), "seed": cfg.seed, "shadow_models": [Path(a).name for a in artifacts],
        "imitation_episodes": cfg.imitation.episodes, "seconds": round(spent + time.perf_counter() - start, 1),
        "data": trained_on(artifacts[0]),
    }  # fmt: skip
    policy = model.policy
    assert isinstance(policy, GraphMaskablePolicy)
    return save_agent(out / AGENT, policy.net, policy.policy_cfg, deployed, training)
