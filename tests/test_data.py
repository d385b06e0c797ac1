import os
import pickle

import pytest
import torch

from onp_env import OnpError
from onp_env.data import defense_split, load_dataset
from onp_env.data.sources import read_cifar10, read_idx

from .conftest import FASHION_MNIST, fake_cifar10, fake_idx_dataset, needs_fashion_mnist


def test_digits_is_embedded_and_in_unit_range():
    d = load_dataset("digits")
    assert d.info.shape == (1, 8, 8) and d.info.num_classes == 10
    assert d.train_x.shape[1:] == (1, 8, 8) and d.train_x.dtype == torch.float32
    assert d.train_x.min() >= 0 and d.train_x.max() <= 1
    assert len(d.train_x) + len(d.test_x) == 1797
    assert set(d.test_y.tolist()) == set(range(10))
    assert d.info.mean[0] == pytest.approx(d.train_x.mean().item(), abs=1e-5)


def test_defense_split_is_stratified_seeded_and_disjoint():
    y = load_dataset("digits").train_y
    a = defense_split(y, 0.05, seed=3)
    b = defense_split(y, 0.05, seed=3)
    c = defense_split(y, 0.05, seed=4)
    assert torch.equal(a.defense_idx, b.defense_idx)
    assert not torch.equal(a.defense_idx, c.defense_idx)
    assert len(set(a.defense_idx.tolist()) & set(a.train_idx.tolist())) == 0
    assert len(a.defense_idx) + len(a.train_idx) == len(y)
    for cls in range(10):
        n = int((y == cls).sum())
        assert int((y[a.defense_idx] == cls).sum()) == round(0.05 * n)


def test_defense_fraction_that_empties_a_class_is_an_error():
    y = torch.tensor([0] * 100 + [1] * 5)
    with pytest.raises(OnpError, match="leaves class 1 with no defense image"):
        defense_split(y, 0.05, seed=0)
    with pytest.raises(OnpError, match=r"must be in \(0, 1\)"):
        defense_split(y, 1.5, seed=0)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(OnpError, match="unknown dataset 'imagenet'.*digits"):
        load_dataset("imagenet")


def test_missing_dataset_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(OnpError, match="not found: install the Debian package"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(OnpError, match="data.root"):
        load_dataset("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(OnpError, match="cifar10 needs its directory"):
        load_dataset("cifar10")


def test_idx_directory_loads_as_mnist(tmp_path):
    d = load_dataset("mnist", str(fake_idx_dataset(tmp_path, size=(5, 6))))
    assert d.train_x.shape == (30, 1, 5, 6) and d.test_y.tolist() == list(range(10))
    assert d.train_x.max() <= 1


def test_the_cache_follows_the_folder_an_environment_variable_names(tmp_path, monkeypatch):
    monkeypatch.setenv("ONP_MNIST_DIR", str(fake_idx_dataset(tmp_path / "a", size=(5, 6))))
    assert load_dataset("mnist").info.shape == (1, 5, 6)
    monkeypatch.setenv("ONP_MNIST_DIR", str(fake_idx_dataset(tmp_path / "b", size=(7, 7))))
    assert load_dataset("mnist").info.shape == (1, 7, 7)  # not the first folder's, cached under root None


def test_corrupt_idx_file_is_an_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(OnpError, match="truncated or corrupt"):
        read_idx(tmp_path / "bad")
    (tmp_path / "bad2").write_bytes(b"PK\x03\x04")
    with pytest.raises(OnpError, match="bad magic"):
        read_idx(tmp_path / "bad2")


def test_cifar10_python_batches_without_unsafe_unpickling(tmp_path):
    fake_cifar10(tmp_path)
    d = load_dataset("cifar10", str(tmp_path))
    assert d.train_x.shape == (20, 3, 32, 32) and d.info.num_classes == 10

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(OnpError, match="refusing to load"):
        read_cifar10(tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion-mnist", FASHION_MNIST)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train_y).tolist() == [6000] * 10
    assert d.info.class_names[9] == "ankle-boot"
