import pytest
import torch
from torch import nn

from onp_env import OnpError
from onp_env.models import MODELS, build_model


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
