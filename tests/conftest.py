import gzip
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from onp_env import build_artifact, load_config
from onp_env.config import LabConfig
from onp_env.data.datasets import FASHION_MNIST_DEBIAN
from onp_env.env import signals as env_signals

# The embedded default model is trained on first use into the cache: keep tests out of ~/.cache and
# out of a cache the user's own ONP_CACHE names (its artifacts may come from another version).
# A folder below the session's own: `onp defend` without --out writes beside the cache. The
# pytest-xdist workers inherit the controller's folder, so each model trains once per run
# (build_artifact's lock), not once per worker.
_OWN_ROOT = "ONP_TEST_SESSION" not in os.environ
if _OWN_ROOT:
    os.environ["ONP_TEST_SESSION"] = tempfile.mkdtemp(prefix="onp-test-")
CACHE = Path(os.environ["ONP_TEST_SESSION"]) / "artifacts"
os.environ["ONP_CACHE"] = str(CACHE)
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = os.environ.get("ONP_FASHION_MNIST_DIR") or str(FASHION_MNIST_DEBIAN)
"""Where the optional Fashion-MNIST lies, read once here: tests run without the user's ONP_* variables."""
needs_fashion_mnist = pytest.mark.skipif(
    # .ci/run installs the package and sets this: there, missing data is a failure, not a skip
    not Path(FASHION_MNIST).is_dir() and not os.environ.get("ONP_TEST_REQUIRE_DATA"),
    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or set ONP_FASHION_MNIST_DIR=DIR)",
)


@pytest.fixture(autouse=True)
def _no_ambient_state(tmp_path, monkeypatch):
    """Every test starts in an empty directory of its own, with none of the user's ONP_* variables:
    what a test reads, it names (ROOT / "configs" ..., or chdir to ROOT where a shipped config holds
    paths relative to the repository), and nothing it writes lands in the checkout. Signal results
    are not reused from an earlier test."""
    for name in [v for v in os.environ if v.startswith("ONP_") and v not in ("ONP_CACHE", "ONP_TEST_SESSION")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # signals are computed afresh in every test: no test passes because an earlier one ran
    monkeypatch.setattr(env_signals, "_RESULTS", type(env_signals._RESULTS)())


def _seed(item: pytest.Item, offset: int) -> None:
    """torch's global generator, seeded per test phase as pytest-randomly seeds random and numpy
    (its --randomly-seed plus the test's id), so a test that draws from it replays with that seed."""
    base = item.config.getoption("randomly_seed", default=None)
    base = base if isinstance(base, int) else 0  # -p no:randomly: a fixed seed per test
    torch.manual_seed((base + zlib.crc32(item.nodeid.encode()) + offset) % 2**32)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_ROOT:  # the controller, after every worker has finished
        shutil.rmtree(CACHE.parent, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    _seed(item, -1)


def pytest_runtest_call(item: pytest.Item) -> None:
    _seed(item, 0)


def tiny_config(*overrides: str) -> LabConfig:
    """A digits BadNets config that trains in well under a second."""
    return load_config(
        LabConfig, None, ["name=tiny", "train.epochs=3", "model.kwargs={channels: [8, 8], hidden: 16}", *overrides]
    )


DIGITS_TEST_MODELS = ["digits-v0/test/000", "digits-v0/test/002"]
"""The models of digits-v0's test split the default tests use: two of its eight, neither of them TrojanNN
(whose trigger is optimised on a clean model first); the whole split is a `slow` test."""


@pytest.fixture(scope="session")
def digits_test_split():
    """DIGITS_TEST_MODELS, built once per session into the test cache, in this process: the other
    pytest-xdist worker keeps the second core busy (the slow whole-split test builds with two)."""
    from onp_env.suite.spec import get_suite
    from onp_env.suite.zoo import build_split

    return build_split(get_suite("digits-v0"), "test", CACHE, progress=False, names=DIGITS_TEST_MODELS)


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


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_idx_dataset(folder: Path, train: int = 30, test: int = 10, size: tuple[int, int] = (28, 28)) -> Path:
    """An idx folder (the MNIST / Fashion-MNIST layout) of random images, labels cycling 0-9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, *size)), gz=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return folder
