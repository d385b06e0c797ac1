import pytest
import torch

from onp_env import OnpError, build_artifact, load_artifact
from onp_env.training import augment, reestimate_batchnorm

from .conftest import tiny_config


def test_crop_shifts_each_image_by_at_most_two_pixels_and_flip_mirrors():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    out = augment(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 1)
    rows, cols = torch.nonzero(out[:, 0])[:, 1], torch.nonzero(out[:, 0])[:, 2]
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5  # per-image shifts, not one per batch
    flipped = augment(x, "crop-flip", torch.Generator().manual_seed(0))
    assert torch.all(flipped.sum((1, 2, 3)) == 1)
    assert torch.equal(augment(x, "none", torch.Generator()), x)


@pytest.mark.parametrize(
    "model",
    ["vgg", "preact_resnet18"],
)
def test_other_architectures_build_artifacts_that_reload(model, tmp_path):
    kwargs = "{width: 0.125}" if model == "preact_resnet18" else "{cfg: [8, M, 8, M], hidden: 16}"
    cfg = tiny_config(f"model.name={model}", f"model.kwargs={kwargs}", "train.epochs=1", "train.augment=crop")
    art = load_artifact(build_artifact(cfg, tmp_path, progress=False))
    assert art.manifest["model"]["name"] == model
    assert art.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_bad_training_settings_are_named(tmp_path):
    with pytest.raises(OnpError, match="unknown augment 'rotate'"):
        build_artifact(tiny_config("train.augment=rotate"), tmp_path, progress=False)
    with pytest.raises(OnpError, match="epochs must be >= 1"):
        build_artifact(tiny_config("train.epochs=0"), tmp_path, progress=False)


def test_device_selection(tmp_path, monkeypatch):
    """Without a GPU (whatever this machine has), auto is the CPU and trains the same weights, and a GPU
    that is not there is refused before training."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = load_artifact(build_artifact(tiny_config("seed=5"), tmp_path, progress=False))
    auto = load_artifact(build_artifact(tiny_config("seed=5", "train.device=auto"), tmp_path, progress=False))
    pairs = zip(cpu.model.state_dict().values(), auto.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(OnpError, match="torch sees no GPU"):
        build_artifact(tiny_config("train.device=cuda"), tmp_path, progress=False)
    assert cpu.config.fingerprint() != auto.config.fingerprint()  # where it trained is part of the result


def test_reestimate_batchnorm_takes_the_images_statistics_under_the_models_hooks_and_changes_no_weight():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
                                torch.nn.BatchNorm1d(4))  # fmt: skip
    model[1].register_forward_hook(lambda m, i, out: out * torch.tensor([0.0, 1.0, 1.0, 1.0]))  # a mask: unit 0 cut
    x = torch.randn(96, 3, generator=g) * 3 + 1
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    with torch.no_grad():
        first = model[0](x)
        second = model[:4].train()(x)  # one batch: what the second layer sees while the first re-estimates
    reestimate_batchnorm(model.eval(), x, batch_size=len(x))
    assert not model.training and model[1].momentum == model[4].momentum == 0.1
    assert torch.allclose(model[1].running_mean, first.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, first.var(0), atol=1e-4)
    assert torch.allclose(model[4].running_mean, second.mean(0), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    before = model[1].running_mean.clone()
    reestimate_batchnorm(model, x[:32], only="4")  # the named layers only
    assert torch.equal(model[1].running_mean, before) and not torch.allclose(model[4].running_mean, second.mean(0))
