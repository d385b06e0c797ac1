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


def _digits(where: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
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


def _embedded(root: str | None) -> None:
    return None


def _idx_folder(default: Path | None, env_var: str, how_to_get: str) -> Callable[[str | None], Path]:
    def locate(root: str | None) -> Path:
        where = Path(root) if root else Path(os.environ.get(env_var, "") or (default or ""))
        if not str(where) or not where.is_dir():
            shown = str(where) if str(where) else "(none given)"
            raise OnpError(f"dataset directory {shown} not found: {how_to_get}")
        return where

    return locate


def _read_idx(where: Path | None):
    assert where is not None
    tx, ty = sources.read_idx_pair(where, "train")
    vx, vy = sources.read_idx_pair(where, "t10k")
    return tx, ty, vx, vy, 255.0


def _cifar10_folder(root: str | None) -> Path:
    if not root and not os.environ.get("ONP_CIFAR10_DIR"):
        raise OnpError(
            "cifar10 needs its directory: pass data.root=DIR (or set ONP_CIFAR10_DIR) pointing at "
            "the extracted 'cifar-10-batches-py' (or '-bin') folder from the CIFAR-10 site"
        )
    return Path(root or os.environ["ONP_CIFAR10_DIR"])


def _read_cifar10(where: Path | None):
    assert where is not None
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


@dataclass(frozen=True)
class Source:
    locate: Callable[[str | None], Path | None]
    """Where the data lies for a `data.root` (None: the default place); raises OnpError if absent."""
    read: Callable[[Path | None], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]]
    """(train x, train y, test x, test y, pixel scale) from that place."""
    classes: tuple[str, ...]


DATASETS: dict[str, Source] = {
    "digits": Source(_embedded, _digits, _DIGIT_CLASSES),
    "fashion-mnist": Source(
        _idx_folder(FASHION_MNIST_DEBIAN, "ONP_FASHION_MNIST_DIR", _FMNIST_HELP), _read_idx, _FASHION_CLASSES
    ),
    "mnist": Source(_idx_folder(None, "ONP_MNIST_DIR", _MNIST_HELP), _read_idx, _DIGIT_CLASSES),
    "cifar10": Source(_cifar10_folder, _read_cifar10, _CIFAR_CLASSES),
}

# Keyed by the folder the data was read from, not by the `root` asked for: with no root, the folder
# comes from an environment variable or the default place, and those can change within a process.
_CACHE: dict[tuple[str, str | None], Dataset] = {}


def load_dataset(name: str, root: str | None = None) -> Dataset:
    """Load a registered dataset. Results are cached in memory per (name, folder read)."""
    if name not in DATASETS:
        raise OnpError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    source = DATASETS[name]
    where = source.locate(root)
    key = (name, str(where.resolve()) if where else None)
    if key not in _CACHE:
        classes = source.classes
        tx, ty, vx, vy, scale = source.read(where)
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
