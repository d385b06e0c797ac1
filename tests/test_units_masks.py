import json

import pytest
import torch
from torch import nn

from onp_env import OnpError
from onp_env.graph.units import find_units
from onp_env.masking import Masks
from onp_env.models import build_model


def layout(name, shape=(1, 8, 8), **kw):
    model = build_model(name, shape, 10, **kw).eval()
    return model, find_units(model, torch.rand(2, *shape))[0]


def test_small_cnn_units_by_hand():
    _, L = layout("small_cnn")  # conv16-BN, conv32-BN, fc128, classifier
    assert [(lay.name, lay.kind, lay.size) for lay in L.layers] == [
        ("features.1", "bn", 16), ("features.5", "bn", 32), ("fc", "linear", 128)]  # fmt: skip
    assert L.num_units == 176 and L.groups == [] and L.output == "classifier"
    assert [(c.module, c.sources, c.targets, c.fan) for c in L.connections] == [
        ("features.4", ("features.1",), ("features.5",), 1),
        ("fc", ("features.5",), ("fc",), 4),  # 8x8 input pooled twice: 2x2 positions per channel
        ("classifier", ("fc",), (), 1),
    ]


def test_vgg_units_by_hand():
    _, L = layout("vgg")  # 32, 32, 64, 64, 128, 128 BN channels + 256 hidden
    assert [lay.size for lay in L.layers] == [32, 32, 64, 64, 128, 128, 256]
    assert L.num_units == 704 and L.groups == []


def test_preact_resnet18_units_and_residual_groups_by_hand():
    _, L = layout("preact_resnet18")
    bn2 = [64, 64, 128, 128, 256, 256, 512, 512]  # inside each block
    bn1 = [64, 64, 64, 128, 128, 256, 256, 512]  # reading the residual stream entering each block
    assert L.num_units == sum(bn2) + sum(bn1) + 512 == 3904
    assert len(L.layers) == 17 and all(lay.kind == "bn" for lay in L.layers)
    assert L.groups == [
        ("layers.0.bn1", "layers.1.bn1", "layers.2.bn1"),
        ("layers.3.bn1", "layers.4.bn1"),
        ("layers.5.bn1", "layers.6.bn1"),
        ("layers.7.bn1", "bn"),
    ]
    conv2 = next(c for c in L.connections if c.module == "layers.0.conv2")
    assert conv2.targets == ("layers.1.bn1", "layers.2.bn1")  # through the identity skip
    short = next(c for c in L.connections if c.module == "layers.2.shortcut")
    assert short.sources == ("layers.2.bn1",) and short.targets == ("layers.3.bn1", "layers.4.bn1")


def _perturb_bn(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.bias.uniform_(-0.3, 0.3)


@pytest.mark.parametrize(("name", "kw"), [("small_cnn", {}), ("vgg", {}), ("preact_resnet18", {"width": 0.25})])
def test_zero_masks_equal_a_model_with_those_channels_removed(name, kw):
    model, L = layout(name, (1, 28, 28), **kw)
    _perturb_bn(model)
    x = torch.rand(16, 1, 28, 28)
    masks = Masks(model, L)
    masks.prune(range(1, L.num_units, 4))
    with torch.no_grad():
        masked = model(x)
        smaller = masks.export_smaller()
        assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(smaller(x), masked, rtol=0, atol=1e-5)
        torch.testing.assert_close(masks.export()(x), masked, rtol=0, atol=0)
    masks.reset()
    unmasked = model(x)
    masks.remove()
    torch.testing.assert_close(model(x), unmasked, rtol=0, atol=0)


def test_gamma_semantics_leave_beta_and_zero_semantics_do_not():
    model, L = layout("small_cnn")
    _perturb_bn(model)
    bn = model.features[1]
    out = {}
    x = torch.rand(4, 1, 8, 8)
    for semantics, expected in (("gamma", bn.bias[3].item()), ("zero", 0.0)):
        with Masks(model, L, semantics) as masks:
            masks.prune([3])
            seen = bn.register_forward_hook(lambda m, i, o: out.__setitem__("y", o.clone()))  # after the mask's hook
            model(x)
            seen.remove()
        assert torch.allclose(out["y"][:, 3], torch.full_like(out["y"][:, 3], expected))
    with pytest.raises(OnpError, match="needs zero semantics"):
        Masks(model, L, "gamma").export_smaller()


def test_masks_save_and_load_as_plain_data():
    model, L = layout("small_cnn")
    masks = Masks(model, L)
    masks.prune([0, 20, 170])
    masks.set_layer("features.5", torch.linspace(0, 1, 32))
    state = json.loads(json.dumps(masks.state()))
    other = Masks(build_model("small_cnn", (1, 8, 8), 10), L)
    other.load_state(state)
    assert torch.equal(other.flat(), masks.flat()) and 0 in other.pruned() and 170 in other.pruned()
    with pytest.raises(OnpError, match=r"must be finite and in \[0, 1\]"):
        masks.set_layer("fc", torch.full((128,), 1.5))
    with pytest.raises(OnpError, match="not a unit layer"):
        masks.set_layer("classifier", torch.ones(10))
    with pytest.raises(OnpError, match="gamma"):
        Masks(model, L, "gamma").load_state(state)


class UserNet(nn.Module):
    def __init__(self, extra: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.extra = extra or nn.Identity()
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.extra(torch.relu(self.bn(self.conv(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_users_own_module_is_traced():
    L, _ = find_units(UserNet(), torch.rand(2, 3, 10, 10))
    assert [(lay.name, lay.size) for lay in L.layers] == [("bn", 6)] and L.output == "head"


def test_unsupported_layers_and_unit_free_models_are_named():
    with pytest.raises(OnpError, match="unsupported layer 'extra' of type LayerNorm"):
        find_units(UserNet(nn.LayerNorm([6, 8, 8])), torch.rand(2, 3, 10, 10))
    with pytest.raises(OnpError, match="has no prunable units"):
        find_units(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.rand(2, 1, 8, 8))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(OnpError, match="cannot trace Branchy"):
        find_units(Branchy(), torch.rand(2, 3))
