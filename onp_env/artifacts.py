"""The artifact format: a directory holding `weights.safetensors` and `manifest.json`.

The manifest records everything needed to rebuild the model, the attack and the defense set, the
measured metrics, and the SHA-256 of the weights file, which is checked on every load. Nothing is
unpickled. Writes are atomic: files go to a temporary sibling directory that is renamed into
place, so an interrupted run leaves no half artifact."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from onp_env.attacks import Attack, build_attack
from onp_env.config import LabConfig, from_dict
from onp_env.data import Dataset, load_dataset
from onp_env.errors import OnpError
from onp_env.manifest import WEIGHTS, check_indices_fit, check_manifest
from onp_env.models import Normalize, build_model

MANIFEST = "manifest.json"
DATA_ROOT_ENV = "ONP_DATA_ROOT"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fresh_name(parent: Path, prefix: str, suffix: str, make: Callable[[Path], object]) -> Path:
    """A new entry `parent/prefix<random>suffix` made by `make(path)` (which fails if it exists)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            make(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {parent}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename: readers never see half a file.
    The file is created like any `open(path, "w")`: its mode follows the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fds: list[int] = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    tmp = _fresh_name(path.parent, f".{path.name}.", ".tmp", lambda p: fds.append(os.open(p, flags, 0o666)))
    try:
        with os.fdopen(fds[0], "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_folder(dest: Path) -> Path:
    """A new hidden sibling of `dest` (same file system: renaming it into place is atomic), made
    like a plain mkdir: its mode follows the umask (tempfile.mkdtemp would make it 0700)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _fresh_name(dest.parent, f".{dest.name}.", "", lambda p: p.mkdir(0o777))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written through open(), so its mode follows the umask like every other
    file the project writes (safetensors' own save_file creates it 0600)."""
    path.write_bytes(save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))


def write_artifact(dest: Path, model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write weights + manifest to `dest` atomically; returns `dest`. If another writer got
    there first with a complete artifact, keeps theirs. The folder and files get the modes a plain
    mkdir and open give (the umask decides), so a shared cache stays readable by its group."""
    tmp = staging_folder(dest)
    try:
        save_tensors(model.state_dict(), tmp / WEIGHTS)
        manifest = {**manifest, "weights": {"sha256": sha256_file(tmp / WEIGHTS)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


MAX_MANIFEST_BYTES = 64 << 20
MAX_PARAMETERS = 500_000_000


def regular_file(path: Path, fix: str) -> Path:
    """`path` if it is a regular file, not a symlink, inside its parent folder; else an OnpError."""
    if path.is_symlink() or not path.is_file():
        raise OnpError(f"{path} is missing, a link or not a regular file: {fix}")
    return path


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"the number {text[:40]} overflows to infinity")
    return value


def _no_constant(name: str) -> Any:
    raise _NotFinite(f"{name} is not a number JSON allows")


def loads_finite(data: str | bytes) -> Any:
    """json.loads refusing NaN, Infinity and numbers that overflow to them (ValueError)."""
    return json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)


def read_json(path: Path, limit: int, fix: str) -> Any:
    """A size-capped JSON file (checked before reading): a crafted file cannot exhaust memory. NaN,
    Infinity and numbers that overflow to them are refused: no field of ours may hold them."""
    regular_file(path, fix)
    if path.stat().st_size > limit:
        raise OnpError(f"{path} is larger than {limit} bytes: {fix}")
    data = path.read_bytes()
    try:
        return loads_finite(data)
    except RecursionError:
        raise OnpError(f"{path} nests too deeply to be ours: {fix}") from None
    except ValueError as e:  # bad JSON or UTF-8, NaN/Infinity, an integer beyond Python's digit limit
        first = " ".join(str(e).split())[:200]
        raise OnpError(f"{path} is not valid JSON ({first}): {fix}") from e


def header_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise OnpError(f"{path} is not a readable safetensors file ({e}): the file is corrupt; recreate it") from e


def check_weights_fit(path: Path, skeleton: nn.Module, what: str) -> None:
    """The file's tensors (names, shapes, dtypes) must be exactly those of `skeleton`, a model built
    on the meta device (no memory): checked before any weight is read or any real model built."""
    want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in skeleton.state_dict().items()}
    have = {k: (s, _DTYPES.get(d, d)) for k, (s, d) in header_shapes(path).items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()), key=str)[:2]
        raise OnpError(f"{path} does not fit {what} (e.g. {diff}): the file is corrupt or crafted; recreate it")


_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def read_manifest(path: Path) -> dict[str, Any]:
    """The validated manifest of the artifact folder `path` (see onp_env.manifest)."""
    if not path.is_dir():
        raise OnpError(f"artifact {path} not found: create one with `onp attack --config ...`")
    raw = read_json(path / MANIFEST, MAX_MANIFEST_BYTES, "not an artifact (or an interrupted write); recreate it")
    check_manifest(raw, str(path / MANIFEST))
    return raw


def build_model_from(manifest: dict[str, Any]) -> nn.Module:
    m = manifest["model"]
    return build_model(
        m["name"], tuple(m["in_shape"]), m["num_classes"], tuple(m["mean"]), tuple(m["std"]), **m["kwargs"]
    )


@dataclass
class Artifact:
    """A loaded, verified artifact. `model` is in eval mode."""

    path: Path
    manifest: dict[str, Any]
    model: nn.Module

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.manifest["metrics"]

    @property
    def config(self) -> LabConfig:
        return from_dict(LabConfig, self.manifest["config"], f"{self.path}/{MANIFEST}:config")

    def dataset(self, root: str | None = None) -> Dataset:
        """The dataset it was trained on, from `root`, else $ONP_DATA_ROOT, else the dataset's built-in
        location. The directory recorded in the manifest is never followed: it could point anywhere."""
        d = self.manifest["config"]["data"]
        root = root or os.environ.get(DATA_ROOT_ENV)
        if root is None and d["root"] is not None:
            raise OnpError(
                f"{self.path} was trained on {d['name']} from a directory of your own, and a manifest's paths are not "
                f"followed: pass the dataset directory (onp defend --data-root DIR, or {DATA_ROOT_ENV}=DIR)"
            )
        ds = load_dataset(d["name"], root)
        want = self.manifest["dataset"]
        if list(ds.info.shape) != list(want["shape"]) or ds.info.num_classes != want["num_classes"]:
            raise OnpError(
                f"{self.path} was trained on {d['name']} images shaped {want['shape']} in {want['num_classes']} "
                f"classes, but the {d['name']} found holds {list(ds.info.shape)} in {ds.info.num_classes}: pass the "
                f"dataset it was trained on (onp defend --data-root DIR, or {DATA_ROOT_ENV}=DIR)"
            )
        return ds

    @cached_property
    def attack(self) -> Attack | None:
        a = self.manifest["attack"]
        if a is None:
            return None
        info = self.manifest["model"]
        return build_attack(
            a["name"], tuple(info["in_shape"]), info["num_classes"], a["target"], a["mode"], a["params"]
        )

    def defense_set(self, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean defense images and labels (never trained on, never poisoned)."""
        ds = self.dataset(root)
        indices = self.manifest["split"]["defense_indices"]
        check_indices_fit(indices, len(ds.train_y), f"{self.path / MANIFEST}:split.defense_indices")
        idx = torch.tensor(indices, dtype=torch.long)
        return ds.train_x[idx], ds.train_y[idx]


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact; a crafted one is refused (exit 2 from the CLI) before anything
    is allocated: fixed file names, no links, a schema-checked manifest, the SHA-256, and the
    weights' shapes from the safetensors header against the architecture built on the meta device."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = regular_file(path / WEIGHTS, "the artifact is incomplete; recreate it with `onp attack`")
    if sha256_file(weights) != manifest["weights"]["sha256"]:
        raise OnpError(
            f"{weights} does not match the SHA-256 in its manifest: the artifact is corrupt or was edited; recreate it"
        )
    with torch.device("meta"):
        skeleton = build_model_from(manifest)
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise OnpError(f"{path}: the manifest describes a model of {count:,} parameters (at most {MAX_PARAMETERS:,})")
    check_weights_fit(weights, skeleton, f"architecture {manifest['model']['name']} of its manifest")
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise OnpError(f"{weights} is not a readable safetensors file ({e}): recreate the artifact") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise OnpError(f"{weights} has NaN/inf values in {', '.join(bad[:3])}: the model is broken; retrain it")
    model = build_model_from(manifest)
    model.load_state_dict(state)
    check_buffers(model, manifest["model"], weights)
    model.eval()
    art = Artifact(path, manifest, model)
    try:  # built now, not on first use: a bad trigger must be refused before a defense runs
        attack = art.attack
    except OnpError as e:
        raise OnpError(f"{path / MANIFEST}:attack does not describe a valid attack: {e}") from e
    where, info = f"{path / MANIFEST}:attack", manifest["attack"]
    if attack is not None and attack.clean_label != info["clean_label"]:
        raise OnpError(f"{where}.clean_label is {str(info['clean_label']).lower()} but {attack.name} is "
                       f"{'' if attack.clean_label else 'not '}clean-label: the manifest is corrupt or crafted; "
                       f"recreate it")  # fmt: skip
    if attack is not None and not getattr(attack, "prepared", True):
        raise OnpError(f"{where}.params.pattern is missing: a {attack.name} artifact records its optimised trigger; "
                       f"the manifest is corrupt or crafted, recreate it")  # fmt: skip
    return art


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_buffers(model: nn.Module, info: dict[str, Any], weights: Path) -> None:
    """Buffers the weights file sets must agree with the manifest and be usable: the input
    normalisation (Normalize's mean/std) must be the manifest's model mean/std, with std > 0, and
    every BatchNorm running variance must be >= 0 (else the model outputs NaN)."""
    fix = "the file is corrupt or crafted; recreate the artifact"
    for name, module in model.named_modules():
        if isinstance(module, Normalize):
            mean = torch.tensor(info["mean"], dtype=torch.float32)
            std = torch.tensor(info["std"], dtype=torch.float32)
            if not (torch.allclose(module.mean.flatten(), mean) and torch.allclose(module.std.flatten(), std)):
                raise OnpError(f"{weights}: the input normalisation {name}.mean/std it holds differs from the "
                               f"manifest's model mean/std: {fix}")  # fmt: skip
            if not bool((module.std > 0).all()):
                raise OnpError(f"{weights}: {name}.std has a value <= 0: {fix}")
        var = module.running_var if isinstance(module, BATCH_NORMS) else None
        if var is not None and not bool((var >= 0).all()):
            raise OnpError(f"{weights}: {name}.running_var has a negative variance: {fix}")
