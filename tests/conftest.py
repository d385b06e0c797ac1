import os
import tempfile

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


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return build_artifact(tiny_config(), tmp_path_factory.mktemp("zoo"), progress=False)
