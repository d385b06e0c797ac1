import pytest
import torch
from torch import nn

from onp_env import OnpError
from onp_env.graph.units import find_units
from onp_env.models import MODELS, build_model
from onp_env.models.layers import MaxPool2x2


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 5, 7)])
def test_every_model_takes_any_input_and_class_count(name, shape):
    kwargs = {"width": 0.125} if name == "preact_resnet18" else {}
    model = build_model(name, shape, 7, **kwargs).eval()
    assert model(torch.rand(3, *shape)).shape == (3, 7)
    assert any(isinstance(m, (nn.BatchNorm2d)) for m in model.modules())


def test_input_normalisation_is_inside_the_model():
    m = build_model("small_cnn", (1, 8, 8), 10, mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 8, 8), 0.75)
    assert torch.allclose(m.normalize(x), torch.ones_like(x))


def test_preact_resnet18_has_the_standard_block_layout():
    m = build_model("preact_resnet18", (3, 32, 32), 10)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2 convs, 3 projection shortcuts
    assert m.classifier.in_features == 512
    assert build_model("preact_resnet18", (3, 32, 32), 10, width=0.5).classifier.in_features == 256


def test_unknown_model_and_bad_kwargs_are_clear_errors():
    with pytest.raises(OnpError, match="unknown model 'resnet50'.*small_cnn"):
        build_model("resnet50", (1, 8, 8), 10)
    with pytest.raises(OnpError, match="bad arguments for model 'small_cnn'"):
        build_model("small_cnn", (1, 8, 8), 10, depth=3)


@pytest.mark.parametrize("shape", [(6, 4, 12, 10), (3, 5, 9, 7), (2, 8, 8)])
def test_fast_pooling_gives_max_pool2ds_outputs_and_gradients(shape):
    """Ties included: after a ReLU most windows hold several zeros, and the gradient must go where
    PyTorch's kernel sends it (each window's first maximum), odd edges dropped as floor mode drops them."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=g))
    x[..., :3, :] = torch.round(x[..., :3, :] * 2) / 2  # positive ties as well as zeros
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = MaxPool2x2()(ours)
    expected = nn.MaxPool2d(2)(theirs)
    assert torch.equal(y, expected)
    grad = torch.randn(expected.shape, generator=g)
    y.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), nn.MaxPool2d(2)(x))


def test_a_pooled_model_traces_to_its_unit_layers():
    model = build_model("small_cnn", (1, 28, 28), 10)
    assert any(isinstance(m, MaxPool2x2) for m in model.modules())
    layout, _ = find_units(model, torch.rand(2, 1, 28, 28))
    assert [(lay.name, lay.size) for lay in layout.layers] == [("features.1", 16), ("features.5", 32), ("fc", 128)]
