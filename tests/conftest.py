import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# The embedded default model is trained on first use into the cache: keep tests out of ~/.cache.
os.environ.setdefault("ONP_CACHE", tempfile.mkdtemp(prefix="onp-test-cache-"))

from onp_env import build_artifact, load_config
from onp_env.config import LabConfig

torch.set_num_threads(1)


def tiny_config(*overrides: str) -> LabConfig:
    """A digits BadNets config that trains in well under a second."""
    return load_config(
        LabConfig, None, ["name=tiny", "train.epochs=3", "model.kwargs={channels: [8, 8], hidden: 16}", *overrides]
    )


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any defense starts working."""
    from baselines.common import Defense

    def ran(*args, **kwargs):
        pytest.fail("the defense ran before its inputs were checked")

    monkeypatch.setattr(Defense, "run", ran)
    monkeypatch.setattr(Defense, "plan", ran)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return build_artifact(tiny_config(), tmp_path_factory.mktemp("zoo"), progress=False)


def fake_cifar10(folder: Path) -> Path:
    """A CIFAR-10 folder of python batches holding 4 images each (labels 1-4)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder
