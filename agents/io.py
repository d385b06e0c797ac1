"""The deployable agent: a directory with `policy.safetensors` (the GraphPolicyNet weights) and
`agent.json` (policy, environment and feature config, training summary, SHA-256 of the weights).

Loading unpickles nothing and treats the directory as hostile input: fixed file names (the JSON
names no path), no symlinks, a size cap on the JSON, the config validated against its schema and
bounds, the SHA-256 checked, and the tensor shapes in the safetensors header compared with the
network the config describes (built on the meta device, which allocates nothing) before any weight
is read. The SB3 zip of a training run is for resuming that run only: it holds cloudpickled
objects and must never be loaded from someone else."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import onp_env
from agents.config import check_policy
from agents.gnn import GraphPolicyNet, PolicyConfig
from agents.policy import build_net
from onp_env.artifacts import (
    check_weights_fit,
    read_json,
    regular_file,
    save_tensors,
    sha256_file,
    staging_folder,
)
from onp_env.config import from_dict, to_dict
from onp_env.env import GLOBALS, EnvConfig
from onp_env.env.signals import feature_names, global_names, signal_settings
from onp_env.errors import OnpError
from onp_env.graph.build import EDGE_TYPES
from onp_env.graph.features import FEATURES

FORMAT, FORMAT_VERSION = "onp-env/agent", 1
WEIGHTS, CONFIG = "policy.safetensors", "agent.json"
MAX_JSON_BYTES = 1 << 20


@dataclass
class Agent:
    path: Path | None
    net: GraphPolicyNet
    policy: PolicyConfig
    env: EnvConfig
    """The environment settings the policy was trained with (artifacts empty, score none)."""
    meta: dict[str, Any]


def deploy_env_config(env: EnvConfig) -> EnvConfig:
    """The training env's settings for deployment: no zoo, no padding sizes, no backdoor score, and
    the CPU (where it deploys is the deploying defense's choice, not the training machine's)."""
    return dataclasses.replace(env, artifacts=[], max_units=None, max_edges=None, score="none", score_kwargs={},
                               track_asr=False, device="cpu")  # fmt: skip


def save_agent(dest: Path, net: GraphPolicyNet, policy: PolicyConfig, env: EnvConfig, training: dict[str, Any]) -> Path:
    """Write the agent directory atomically (temporary sibling + rename); refuses to overwrite."""
    if dest.exists():
        raise OnpError(f"{dest} already exists: pass another output or remove it")
    tmp = staging_folder(dest)
    try:
        save_tensors(net.state_dict(), tmp / WEIGHTS)
        env_cfg = deploy_env_config(env)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": onp_env.__version__,
            "policy": to_dict(policy), "env": to_dict(env_cfg),
            "feature_names": list(feature_names(FEATURES, env_cfg.features, env_cfg.signal_spans)),
            "globals": list(global_names(GLOBALS, env_cfg.features)),
            "edge_types": list(EDGE_TYPES), "training": training, "sha256": sha256_file(tmp / WEIGHTS),
            "signal_settings": signal_settings(env_cfg.features, env_cfg.signal_params),
        }  # fmt: skip
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_agent(path: str | Path) -> Agent:
    root = Path(path)
    if not root.is_dir():
        raise OnpError(f"agent {root} not found: train one with `onp train-agent --config configs/agent/digits.yaml`")
    cfg_file = root / CONFIG
    meta = read_json(cfg_file, MAX_JSON_BYTES, "not an agent directory (train one with `onp train-agent`)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise OnpError(f"{root} is not an {FORMAT} v{FORMAT_VERSION} directory: retrain it with this onp-env")
    for key, kind in (("policy", dict), ("env", dict), ("feature_names", list), ("globals", list),
                      ("edge_types", list), ("sha256", str)):  # fmt: skip
        if not isinstance(meta.get(key), kind):
            raise OnpError(f"{cfg_file}: '{key}' is missing or not a {kind.__name__}: the agent config is corrupt")
    policy = from_dict(PolicyConfig, meta["policy"], f"{cfg_file}:policy")
    check_policy(policy)
    env = EnvConfig.load(meta["env"], f"{cfg_file}:env")  # every field and combination, as the env checks them
    expected = list(feature_names(FEATURES, env.features, env.signal_spans))
    glob = list(global_names(GLOBALS, env.features))
    if meta["feature_names"] != expected or meta["globals"] != glob or meta["edge_types"] != list(EDGE_TYPES):
        raise OnpError(
            f"{root}: the agent's observation features {meta['feature_names']} and globals {meta['globals']} do "
            f"not match this onp-env's {expected} and {glob}: retrain the agent with this version"
        )
    if "signal_settings" in meta:  # agents saved before 2026-12-05 did not record them
        check_signal_settings(root, meta["signal_settings"], env)
    weights = regular_file(root / WEIGHTS, "the agent is incomplete; retrain it")
    if sha256_file(weights) != meta["sha256"]:
        raise OnpError(f"{weights} does not match the SHA-256 in {CONFIG}: the agent is corrupt or was edited")
    with torch.device("meta"):
        skeleton = _net(policy, env)
    check_weights_fit(weights, skeleton, f"the policy described in {CONFIG}")
    net = _net(policy, env)
    state = load_file(str(weights))
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise OnpError(f"{weights} has NaN/inf weights: the agent is broken; retrain it")
    net.load_state_dict(state)
    return Agent(root, net.eval(), policy, env, meta)


def check_signal_settings(root: Path, trained: Any, env: EnvConfig) -> None:
    """Refuse an agent whose signals this onp-env computes with other settings than those it was trained with (a
    default changed since, or an edited agent.json): its observations would not be those the policy learnt from."""
    here = json.loads(json.dumps(signal_settings(env.features, env.signal_params)))
    if trained == here:
        return
    if not isinstance(trained, dict) or not all(isinstance(v, dict) for v in trained.values()):
        raise OnpError(f"{root / CONFIG}: 'signal_settings' is not a mapping of mappings: the agent config is corrupt")
    name = next(n for n in sorted(set(here) | set(trained)) if here.get(n) != trained.get(n))
    was, now = trained.get(name, {}), here.get(name, {})
    keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]

    def said(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={d.get(k)!r}" for k in keys)

    raise OnpError(f"{root}: the agent was trained with signal {name} at {said(was)}; this onp-env computes it at "
                   f"{said(now)}: retrain the agent with this onp-env (onp train-agent), or use the one it was trained "
                   "with")  # fmt: skip


def _net(policy: PolicyConfig, env: EnvConfig) -> GraphPolicyNet:
    from gymnasium import spaces

    names = feature_names(FEATURES, env.features, env.signal_spans)
    space = spaces.Dict({
        "nodes": spaces.Box(-1, 1, (1, len(names))), "edge_attr": spaces.Box(0, 1, (1, 1 + len(EDGE_TYPES))),
        "globals": spaces.Box(-1, 1, (len(global_names(GLOBALS, env.features)),)),
    })  # fmt: skip
    if env.action_mode == "signal":  # one choice per signal column (NeuronPruningEnv's nominees)
        space["nominees"] = spaces.Box(0, 1, (sum(n.startswith("signal_") for n in names),))
    return build_net(policy, space)
