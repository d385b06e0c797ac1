"""Training and caching backdoored-model artifacts: `build_artifact(config)` trains once per
config fingerprint and returns the cached directory on every later call."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from filelock import FileLock

import onp_env
from onp_env.artifacts import MANIFEST, load_artifact, write_artifact
from onp_env.attacks import ATTACKS, PoisonedSet, build_attack, choose_poison
from onp_env.config import LabConfig, to_dict
from onp_env.data import defense_split, load_dataset
from onp_env.devices import resolve_device
from onp_env.errors import OnpError
from onp_env.manifest import FORMAT, FORMAT_VERSION
from onp_env.metrics import evaluate
from onp_env.models import build_model
from onp_env.training import AUGMENTS, torch_threads, train


def cache_dir() -> Path:
    """Where artifacts go by default: $ONP_CACHE, else ~/.cache/onp-env/artifacts."""
    return Path(os.environ.get("ONP_CACHE") or Path.home() / ".cache" / "onp-env" / "artifacts")


def find_cached(cfg: LabConfig, out: Path) -> Path | None:
    for p in sorted(out.glob(f"*-{cfg.fingerprint()}")):
        if (p / MANIFEST).is_file():
            return p
    return None


def reference_config(cfg: LabConfig) -> LabConfig | None:
    """The clean model of the same config that `cfg`'s trigger is optimised on (TrojanNN), itself a
    cached artifact; None for attacks that need none."""
    if cfg.attack is None or cfg.attack.name not in ATTACKS or not ATTACKS[cfg.attack.name].needs_reference_model:
        return None
    return dataclasses.replace(cfg, name=f"{cfg.name}-reference", attack=None)


def build_artifact(cfg: LabConfig, out: str | Path | None = None, progress: bool = True) -> Path:
    """Path of the artifact for `cfg` under `out`, training it first unless it is cached."""
    out = Path(out) if out is not None else cache_dir()
    if cfg.train.augment not in AUGMENTS:  # before the reference model a TrojanNN trigger needs
        raise OnpError(f"unknown augment '{cfg.train.augment}': choose one of {', '.join(AUGMENTS)}")
    resolve_device(cfg.train.device)
    try:  # before any training: a bad output folder must not cost minutes to discover
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnpError(f"cannot use {out} as the artifact folder ({e.strerror}): pass another --out DIR") from e
    cached = find_cached(cfg, out)
    if cached is None:
        # another process training the same config (a bench worker, a parallel test run): wait for its
        # artifact instead of training it twice; a cache that only holds finished artifacts needs no lock
        locks = out / ".locks"
        try:
            locks.mkdir(exist_ok=True)
        except OSError as e:
            raise OnpError(f"cannot write to the artifact folder {out} ({e.strerror}): pass another --out DIR") from e
        with FileLock(locks / f"{cfg.fingerprint()}.lock"):
            cached = find_cached(cfg, out) or _train_artifact(cfg, out, progress)
    load_artifact(cached)  # verifies the weights hash: a corrupt cache entry is an error
    return cached


def _train_artifact(cfg: LabConfig, out: Path, progress: bool) -> Path:
    ds = load_dataset(cfg.data.name, cfg.data.root)
    info = ds.info
    split = defense_split(ds.train_y, cfg.data.defense_fraction, cfg.data.split_seed)
    x, y = ds.train_x[split.train_idx], ds.train_y[split.train_idx]
    attack, report = None, None
    if cfg.attack is not None:
        a = cfg.attack
        attack = build_attack(a.name, info.shape, info.num_classes, a.target, a.mode, a.params)
        poison, cross = choose_poison(attack, y, a.poison_rate, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, info.shape, info.num_classes, info.mean, info.std, **cfg.model.kwargs)

    seconds = 0.0
    ref_cfg = reference_config(cfg)
    if attack is not None and ref_cfg is not None:
        ref = load_artifact(build_artifact(ref_cfg, out, progress))
        start = time.perf_counter()
        with torch_threads(cfg.train.threads):
            report = attack.prepare(ref.model, x)
        seconds += ref.manifest["training"]["seconds"] + time.perf_counter() - start
        model.load_state_dict(ref.model.state_dict())

    data = PoisonedSet(x, y, attack, *((poison, cross) if attack is not None else ()))
    seconds += train(model, data, cfg.train, cfg.seed, desc=cfg.name, progress=progress)
    with torch_threads(cfg.train.threads):
        metrics = evaluate(model, ds.test_x, ds.test_y, attack)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": onp_env.__version__,
        "name": cfg.name,
        "fingerprint": cfg.fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "dataset": dataclasses.asdict(info),
        "model": {
            "name": cfg.model.name,
            "kwargs": cfg.model.kwargs,
            "in_shape": list(info.shape),
            "num_classes": info.num_classes,
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "split": {
            "fraction": cfg.data.defense_fraction,
            "seed": cfg.data.split_seed,
            "defense_indices": split.defense_idx.tolist(),
        },
        "attack": None
        if attack is None
        else {
            **attack.describe(),
            "poison_rate": cfg.attack.poison_rate,  # type: ignore[union-attr]
            "clean_label": attack.clean_label,
            # indices into the dataset's training split, not into the non-defense subset
            "poison_indices": split.train_idx[poison].tolist(),
            "cross_indices": split.train_idx[cross].tolist(),
            "preparation": report,
        },
        "training": {**to_dict(cfg.train), "seconds": round(seconds, 2)},
        "metrics": {k: (None if v is None else round(v, 6)) for k, v in metrics.items()},
    }
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name).strip("-") or "model"
    return write_artifact(out / f"{slug}-{cfg.fingerprint()}", model, manifest)


def default_config() -> LabConfig:
    """The embedded default model: configs/attack/badnets-digits.yaml (a test keeps them equal)."""
    from onp_env.config import load_config

    return load_config(
        LabConfig,
        None,
        [
            "name=badnets-digits",
            "data={name: digits, defense_fraction: 0.05}",
            "model={name: small_cnn}",
            "train={epochs: 30, batch_size: 64, lr: 0.05, threads: 1}",
            "attack={name: badnets, target: 0, poison_rate: 0.1, "
            "params: {patch_size: 2, position: bottom-right, pattern: checker}}",
        ],
    )


def default_artifact(progress: bool = False) -> Path:
    """The embedded digits BadNets model, trained on first use (seconds) and cached."""
    return build_artifact(default_config(), progress=progress)
