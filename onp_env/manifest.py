"""The schema of an artifact's manifest.json, checked on every load: a manifest is untrusted input
(an artifact may come from anyone), so its structure, types, ranges and cross-field consistency are
validated, with the field's path in the error, before anything is built from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from onp_env.config import SEED_LIMIT, LabConfig, TrainConfig, bounded, from_dict, short_repr
from onp_env.errors import OnpError

FORMAT = "onp-env/artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MAX_INDICES = 10_000_000


@dataclass
class DatasetInfo:
    name: str
    shape: list[int]
    num_classes: int = bounded(10, ge=2)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    name: str
    in_shape: list[int]
    num_classes: int
    mean: list[float]
    std: list[float]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitInfo:
    fraction: float = bounded(0.05, gt=0, lt=1)
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    defense_indices: list[int] = field(default_factory=list)


@dataclass
class AttackInfo:
    name: str
    target: int = bounded(0, ge=0)
    mode: str = "all-to-one"
    params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = bounded(0.1, ge=0, le=1)
    clean_label: bool = False
    poison_indices: list[int] = field(default_factory=list)
    cross_indices: list[int] = field(default_factory=list)
    preparation: dict[str, Any] | None = None


@dataclass
class TrainingInfo(TrainConfig):
    seconds: float = bounded(0.0, ge=0)


@dataclass
class Metrics:
    acc: float | None = bounded(None, ge=0, le=1)
    asr: float | None = bounded(None, ge=0, le=1)
    ra: float | None = bounded(None, ge=0, le=1)


@dataclass
class WeightsInfo:
    sha256: str
    file: str = WEIGHTS
    """Always weights.safetensors: kept for artifacts written before the name was fixed."""


@dataclass
class DefenseInfo:
    method: str
    source: str
    pruned_units: list[int]
    masks: dict[str, Any]
    details: dict[str, Any]


@dataclass
class Manifest:
    format: str
    format_version: int
    library_version: str
    name: str
    fingerprint: str
    created: str
    config: dict[str, Any]
    dataset: DatasetInfo
    model: ModelInfo
    split: SplitInfo
    attack: AttackInfo | None
    training: TrainingInfo
    metrics: Metrics
    weights: WeightsInfo
    defense: DefenseInfo | None = None


def _indices(values: list[int], where: str) -> None:
    if len(values) > MAX_INDICES:
        raise OnpError(f"{where} lists {len(values)} indices (at most {MAX_INDICES}): the manifest is corrupt")
    if values and min(values) < 0:
        raise OnpError(f"{where} holds a negative index ({min(values)}): the manifest is corrupt or crafted")
    if len(set(values)) != len(values):
        raise OnpError(f"{where} repeats an index: the manifest is corrupt or crafted")


def _normalisation(mean: list[float], std: list[float], channels: int, where: str) -> None:
    if len(mean) != channels or len(std) != channels:
        raise OnpError(f"{where} mean/std need one value per input channel ({channels}), got {len(mean)} and "
                       f"{len(std)}: the manifest is corrupt; recreate it")  # fmt: skip
    if not all(math.isfinite(v) for v in mean + std) or min(std, default=1) <= 0:
        raise OnpError(f"{where} mean/std must be finite numbers with std > 0, got {mean} / {std}: the manifest "
                       f"is corrupt or crafted; recreate it")  # fmt: skip


def _agree(where: str, key_a: str, a: Any, key_b: str, b: Any) -> None:
    """Two records of one fact in a manifest must agree: a mismatch means it was edited."""
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):  # 1, 1.0 and true differ here
        raise OnpError(f"{where}: {key_a} {short_repr(a)} differs from {key_b} {short_repr(b)}: the manifest is "
                       f"corrupt or crafted; recreate it")  # fmt: skip


def check_manifest(raw: Any, where: str) -> Manifest:
    """The manifest as typed data, or an OnpError naming the first bad field (`where` prefixes it)."""
    if not isinstance(raw, dict):
        raise OnpError(f"{where} must hold a JSON object, got {type(raw).__name__}: not an artifact manifest")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise OnpError(f"{where} is not an {FORMAT} v{FORMAT_VERSION} manifest: recreate it with this onp-env")
    missing = [k for k in ("config", "dataset", "model", "split", "attack", "training", "metrics", "weights")
               if k not in raw]  # fmt: skip
    if missing:
        raise OnpError(f"{where} lacks {', '.join(missing)}: the artifact is incomplete; recreate it")
    m = from_dict(Manifest, raw, where)
    cfg = from_dict(LabConfig, m.config, f"{where}:config")
    if m.weights.file != WEIGHTS:
        raise OnpError(f"{where}:weights.file must be {WEIGHTS!r} (an artifact names no other file): recreate it")
    d, mo = m.dataset, m.model
    if list(mo.in_shape) != list(d.shape) or mo.num_classes != d.num_classes:
        raise OnpError(f"{where}: model input {mo.in_shape} / {mo.num_classes} classes disagree with the dataset's "
                       f"{d.shape} / {d.num_classes}: the manifest is corrupt")  # fmt: skip
    channels = mo.in_shape[0] if mo.in_shape else 0
    _normalisation(mo.mean, mo.std, channels, f"{where}:model")
    if d.mean or d.std:
        _normalisation(d.mean, d.std, channels, f"{where}:dataset")
        if (d.mean, d.std) != (mo.mean, mo.std):
            raise OnpError(f"{where}: model mean/std {mo.mean} / {mo.std} differ from the dataset's {d.mean} / "
                           f"{d.std}: the manifest is corrupt or crafted; recreate it")  # fmt: skip
    if d.class_names and len(d.class_names) != d.num_classes:
        raise OnpError(f"{where}:dataset.class_names lists {len(d.class_names)} names but dataset.num_classes is "
                       f"{d.num_classes}: the manifest is corrupt or crafted; recreate it")  # fmt: skip
    _agree(where, "config.data.name", cfg.data.name, "dataset.name", d.name)
    _agree(where, "config.model.name", cfg.model.name, "model.name", mo.name)
    _agree(where, "config.model.kwargs", cfg.model.kwargs, "model.kwargs", mo.kwargs)
    _agree(where, "config.data.defense_fraction", cfg.data.defense_fraction, "split.fraction", m.split.fraction)
    _agree(where, "config.data.split_seed", cfg.data.split_seed, "split.seed", m.split.seed)
    if (cfg.attack is None) != (m.attack is None):
        said = ("no attack", "an attack") if cfg.attack is None else ("an attack", "none")
        raise OnpError(f"{where}: config.attack names {said[0]} but the manifest's attack records {said[1]}: the "
                       f"manifest is corrupt or crafted; recreate it")  # fmt: skip
    if cfg.attack is not None and m.attack is not None:
        for key in ("name", "target", "mode", "poison_rate"):
            _agree(where, f"config.attack.{key}", getattr(cfg.attack, key), f"attack.{key}", getattr(m.attack, key))
    _indices(m.split.defense_indices, f"{where}:split.defense_indices")
    if not m.split.defense_indices:
        raise OnpError(f"{where}:split.defense_indices is empty: the artifact has no defense set; recreate it")
    if m.attack is not None:
        if m.attack.target >= d.num_classes:
            raise OnpError(f"{where}:attack.target {m.attack.target} is not a class of {d.num_classes}")
        _indices(m.attack.poison_indices, f"{where}:attack.poison_indices")
        _indices(m.attack.cross_indices, f"{where}:attack.cross_indices")
    if m.defense is not None:
        _indices(m.defense.pruned_units, f"{where}:defense.pruned_units")
    return m


def check_indices_fit(values: list[int], size: int, where: str) -> None:
    """Indices read from a manifest must address the dataset they were drawn from."""
    if values and max(values) >= size:
        raise OnpError(f"{where} holds index {max(values)} but the split has {size} images: the manifest does not "
                       f"belong to this dataset")  # fmt: skip
