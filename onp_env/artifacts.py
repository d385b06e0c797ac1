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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from onp_env.attacks import Attack, build_attack
from onp_env.config import LabConfig, from_dict
from onp_env.data import Dataset, load_dataset
from onp_env.errors import OnpError
from onp_env.models import build_model

FORMAT = "onp-env/artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


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
        manifest = {**manifest, "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)}}
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


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise OnpError(f"artifact {path} not found: create one with `onp attack --config ...`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise OnpError(f"{path} has no {MANIFEST}: not an artifact (or an interrupted write); recreate it") from None
    except json.JSONDecodeError as e:
        raise OnpError(f"{path / MANIFEST} is corrupt ({e.msg}): recreate the artifact with `onp attack`") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise OnpError(
            f"{path} is not an {FORMAT} v{FORMAT_VERSION} artifact: recreate it with this version of onp-env"
        )
    return manifest


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
        """The dataset it was trained on (`root` overrides the directory recorded at training)."""
        d = self.manifest["config"]["data"]
        return load_dataset(d["name"], root or d["root"])

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
        idx = torch.tensor(self.manifest["split"]["defense_indices"], dtype=torch.long)
        return ds.train_x[idx], ds.train_y[idx]


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / manifest["weights"]["file"]
    if not weights.is_file():
        raise OnpError(f"{weights} is missing: the artifact is incomplete; recreate it with `onp attack`")
    if sha256_file(weights) != manifest["weights"]["sha256"]:
        raise OnpError(
            f"{weights} does not match the SHA-256 in its manifest: the artifact is corrupt or was edited; recreate it"
        )
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise OnpError(f"{weights} is not a readable safetensors file ({e}): recreate the artifact") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise OnpError(f"{weights} has NaN/inf values in {', '.join(bad[:3])}: the model is broken; retrain it")
    model = build_model_from(manifest)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise OnpError(f"{weights} does not fit architecture {manifest['model']['name']}: {first}") from e
    model.eval()
    return Artifact(path, manifest, model)
