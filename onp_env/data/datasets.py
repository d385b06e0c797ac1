"""Dataset registry. Every loader returns images as float32 tensors in [0, 1] shaped (N, C, H, W);
normalisation is recorded in the metadata and applied inside the model, so triggers live in pixel
space and no dataset is ever copied or downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onp_env.data import sources
from onp_env.errors import OnpError

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]
    """(channels, height, width)"""
    num_classes: int
    mean: tuple[float, ...]
    """Per-channel mean of the training images, used by the model's input normalisation."""
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _to_tensors(x: np.ndarray, y: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    return xt.contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))


def _digits(root: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)
    y = d.target.astype(np.int64)
    # scikit-learn ships no train/test split: a fixed, stratified 80/20 split (seed 0) stands in.
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(0.2 * len(idx))]] = True
    return x[~test], y[~test], x[test], y[test], 16.0


def _idx_dataset(default: Path | None, env_var: str, how_to_get: str):
    def load(root: str | None):
        where = Path(root) if root else Path(os.environ.get(env_var, "") or (default or ""))
        if not str(where) or not where.is_dir():
            shown = str(where) if str(where) else "(none given)"
            raise OnpError(f"dataset directory {shown} not found: {how_to_get}")
        tx, ty = sources.read_idx_pair(where, "train")
        vx, vy = sources.read_idx_pair(where, "t10k")
        return tx, ty, vx, vy, 255.0

    return load


def _cifar10(root: str | None):
    where = Path(root or os.environ.get("ONP_CIFAR10_DIR", ""))
    if not root and not os.environ.get("ONP_CIFAR10_DIR"):
        raise OnpError(
            "cifar10 needs its directory: pass data.root=DIR (or set ONP_CIFAR10_DIR) pointing at "
            "the extracted 'cifar-10-batches-py' (or '-bin') folder from the CIFAR-10 site"
        )
    tx, ty, vx, vy = sources.read_cifar10(where)
    return tx, ty, vx, vy, 255.0


_FMNIST_HELP = (
    "install the Debian package (apt-get install dataset-fashion-mnist) or pass data.root=DIR "
    "with the four idx files (train-images-idx3-ubyte[.gz], ...)"
)
_MNIST_HELP = "pass data.root=DIR (or set ONP_MNIST_DIR) with the four MNIST idx files"

_FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_DIGIT_CLASSES = tuple(str(i) for i in range(10))

DATASETS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "digits": (_digits, _DIGIT_CLASSES),
    "fashion-mnist": (_idx_dataset(FASHION_MNIST_DEBIAN, "ONP_FASHION_MNIST_DIR", _FMNIST_HELP), _FASHION_CLASSES),
    "mnist": (_idx_dataset(None, "ONP_MNIST_DIR", _MNIST_HELP), _DIGIT_CLASSES),
    "cifar10": (_cifar10, _CIFAR_CLASSES),
}

_CACHE: dict[tuple[str, str | None], Dataset] = {}


def load_dataset(name: str, root: str | None = None) -> Dataset:
    """Load a registered dataset. Results are cached in memory per (name, root)."""
    if name not in DATASETS:
        raise OnpError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    key = (name, root)
    if key not in _CACHE:
        loader, classes = DATASETS[name]
        tx, ty, vx, vy, scale = loader(root)
        train_x, train_y = _to_tensors(tx, ty, scale)
        test_x, test_y = _to_tensors(vx, vy, scale)
        dims = (0, 2, 3)
        info = DatasetInfo(
            name=name,
            shape=tuple(train_x.shape[1:]),  # type: ignore[arg-type]
            num_classes=len(classes),
            mean=tuple(round(float(v), 6) for v in train_x.mean(dims)),
            std=tuple(round(float(v), 6) for v in train_x.std(dims)),
            class_names=classes,
        )
        _CACHE[key] = Dataset(info, train_x, train_y, test_x, test_y)
    return _CACHE[key]
