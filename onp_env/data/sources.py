"""Readers for on-disk dataset formats. Nothing here unpickles arbitrary objects."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from onp_env.errors import OnpError

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped), validating its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise OnpError(f"{path} is not an idx file (bad magic number): re-extract the dataset")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise OnpError(f"{path} is truncated or corrupt (size does not match its header)")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise OnpError(f"{root} has no {stem}[.gz]: put the dataset's four idx files there")


def read_idx_pair(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(_find(root, f"{split}-images-idx3-ubyte"))
    y = read_idx(_find(root, f"{split}-labels-idx1-ubyte"))
    if len(x) != len(y):
        raise OnpError(f"{root}: {split} images and labels differ in count ({len(x)} vs {len(y)})")
    return x, y


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists, dicts and bytes: CIFAR-10's python batches
    need nothing else, and refusing every other global means a hostile file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise OnpError(f"refusing to load {module}.{name} from a CIFAR-10 batch: not a data file")
        return super().find_class(module, name)


def _cifar_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
    except OnpError:
        raise
    except Exception as e:
        raise OnpError(f"{path} is not a CIFAR-10 python batch ({e}): re-extract the archive") from e
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels)


def _cifar_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise OnpError(f"{path} is not a CIFAR-10 binary batch: re-extract the archive")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def read_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not root.is_dir():
        raise OnpError(f"cifar10 directory {root} not found: extract cifar-10-python.tar.gz there")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if (root / "data_batch_1").is_file():
        read = _cifar_py_batch
    elif (root / "data_batch_1.bin").is_file():
        names, read = [n + ".bin" for n in names], _cifar_bin_batch
    else:
        raise OnpError(
            f"{root} holds no CIFAR-10 batches (data_batch_1 ... test_batch): point data.root at the extracted folder"
        )
    parts = [read(root / n) for n in names]
    tx = np.concatenate([p[0] for p in parts[:5]])
    ty = np.concatenate([p[1] for p in parts[:5]])
    return tx, ty, parts[5][0], parts[5][1]
