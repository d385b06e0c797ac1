"""The artifact format: a directory holding `weights.safetensors` and `manifest.json`.

The manifest records everything needed to rebuild the model, the attack and the defense set, the
measured metrics, and the SHA-256 of the weights file, which is checked on every load. Nothing is
unpickled. Writes are atomic: files go to a temporary sibling directory that is renamed into
place, so an interrupted run leaves no half artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from onp_env.attacks import Attack, build_attack
from onp_env.config import LabConfig, from_dict
from onp_env.data import Dataset, load_dataset
from onp_env.errors import OnpError
from onp_env.manifest import WEIGHTS, check_indices_fit, check_manifest
from onp_env.models import build_model

MANIFEST = "manifest.json"
DATA_ROOT_ENV = "ONP_DATA_ROOT"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def write_artifact(dest: Path, model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write weights + manifest to `dest` atomically; returns `dest`. If another writer got
    there first with a complete artifact, keeps theirs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
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


def read_json(path: Path, limit: int, fix: str) -> Any:
    """A size-capped JSON file (checked before reading): a crafted file cannot exhaust memory."""
    regular_file(path, fix)
    if path.stat().st_size > limit:
        raise OnpError(f"{path} is larger than {limit} bytes: {fix}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OnpError(f"{path} is not valid JSON ({e}): {fix}") from e


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
        return load_dataset(d["name"], root)

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
    model.eval()
    return Artifact(path, manifest, model)
