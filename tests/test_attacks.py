import math

import pytest
import torch
from torch import nn

from onp_env import OnpError
from onp_env.attacks import ATTACKS, PoisonedSet, build_attack, choose_poison

SHAPE = (1, 8, 8)
READY = {"trojannn": {"patch_size": 2, "pattern": [[[255, 0], [0, 255]]]}}


def make(name, **kw):
    return build_attack(name, SHAPE, 10, params={**READY.get(name, {}), **kw.pop("params", {})}, **kw)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_changes_images_within_pixel_range_deterministically(name):
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0)) * 0.5
    out = make(name).apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, make(name).apply(x))
    assert torch.equal(x, torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0)) * 0.5)


def test_badnets_stamps_exactly_the_patch():
    a = make("badnets", params={"patch_size": 2, "position": [1, 3], "pattern": "checker"})
    out = a.apply(torch.full((1, *SHAPE), 0.5))
    assert out[0, 0, 1:3, 3:5].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    out[0, 0, 1:3, 3:5] = 0.5
    assert torch.all(out == 0.5)


def test_blended_is_a_convex_mix_with_the_pattern():
    a = make("blended", params={"alpha": 0.3, "pattern": "checker"})
    x = torch.rand(2, *SHAPE)
    pattern = a.apply(torch.zeros(1, *SHAPE)) / 0.3
    assert torch.allclose(a.apply(x), 0.7 * x + 0.3 * pattern)
    assert (
        make("blended", params={"alpha": 0.2, "test_alpha": 0.5}).apply(x, train=True).sub(x).abs().mean()
        < make("blended", params={"alpha": 0.2, "test_alpha": 0.5}).apply(x).sub(x).abs().mean()
    )


def test_sig_adds_a_horizontal_sinusoid_and_poisons_only_the_target_class():
    a = make("sig", params={"delta": 0.1, "frequency": 1})
    out = a.apply(torch.full((1, *SHAPE), 0.5))
    expected = 0.5 + 0.1 * torch.sin(2 * math.pi * torch.arange(8) / 8)
    assert torch.allclose(out[0, 0], expected.expand(8, 8))
    y = torch.arange(100) % 10
    poison, _ = choose_poison(a, y, 0.08, seed=0)
    assert set(y[poison].tolist()) == {0} and len(poison) == 8
    assert a.clean_label
    with pytest.raises(OnpError, match="only 10 target-class images"):
        choose_poison(a, y, 0.2, seed=0)


def test_wanet_noise_mode_adds_cross_images_with_their_true_labels():
    a = make("wanet", params={"cross_ratio": 2.0})
    y = torch.arange(200) % 10
    poison, cross = choose_poison(a, y, 0.1, seed=0)
    assert len(poison) == 20 and len(cross) == 40
    assert not set(poison.tolist()) & set(cross.tolist())
    ds = PoisonedSet(torch.rand(200, *SHAPE), y, a, poison, cross)
    x, yb = ds.batch(cross, torch.Generator().manual_seed(0))
    assert torch.equal(yb, y[cross])
    assert not torch.equal(x, a.apply(ds.x[cross]))  # warp + per-image noise, not the trigger
    assert choose_poison(make("wanet", params={"noise": False}), y, 0.1, 0)[1].numel() == 0


def test_targets_all_to_one_and_all_to_all():
    y = torch.tensor([0, 1, 9])
    assert make("badnets", target=3).targets(y).tolist() == [3, 3, 3]
    assert make("badnets", mode="all-to-all").targets(y).tolist() == [1, 2, 0]
    # all-to-one never poisons images already of the target class
    poison, _ = choose_poison(make("badnets", target=0), torch.arange(50) % 10, 0.5, seed=1)
    assert 0 not in (torch.arange(50) % 10)[poison].tolist()


def test_poisoned_set_relabels_only_poisoned_images():
    a = make("badnets", target=7)
    x, y = torch.rand(40, *SHAPE), torch.arange(40) % 10
    ds = PoisonedSet(x, y, a, poison=torch.tensor([1, 2]))
    xb, yb = ds.batch(torch.arange(40), torch.Generator())
    assert yb[1] == 7 and yb[2] == 7 and torch.equal(yb[3:], y[3:])
    assert torch.equal(xb[1], a.apply(x[1:2])[0]) and torch.equal(xb[5], x[5])
    assert torch.equal(ds.x, x)  # the source tensor is never modified


def trojannn_on_a_random_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    a = build_attack("trojannn", SHAPE, 10, params={"patch_size": 3, "steps": 50, "seed": seed})
    with pytest.raises(OnpError, match="not optimised yet"):
        a.apply(torch.rand(1, *SHAPE))
    return model, a, a.prepare(model, torch.rand(64, *SHAPE))


def trojannn_excitation(seed: int) -> dict[str, float]:
    """How much the optimised trigger raises its neuron's activation above clean images'."""
    _, _, report = trojannn_on_a_random_mlp(seed)
    return {"triggered_minus_clean": report["activation_triggered"] - report["activation_clean"]}


def test_trojannn_optimises_a_trigger_that_excites_its_neurons():
    model, a, report = trojannn_on_a_random_mlp()
    strongest = model[3].weight.abs().sum(0).argmax().item()
    assert report["layer"] == "1" and report["neurons"] == [strongest]
    assert report["activation_triggered"] > report["activation_clean"]  # by 0.14-0.37 over seeds 0-19
    rebuilt = build_attack("trojannn", SHAPE, 10, params=a.describe()["params"])
    x = torch.rand(2, *SHAPE)
    assert torch.equal(rebuilt.apply(x), a.apply(x))


@pytest.mark.parametrize(
    ("name", "kw", "message"),
    [
        ("blended", {"params": {"alpha": 1.5}}, r"alpha must be >= 0 and <= 1"),
        ("blended", {"params": {"alpha": -0.1}}, r"alpha must be >= 0 and <= 1"),
        ("badnets", {"params": {"patch_size": 9}}, "does not fit a 8x8 image"),
        ("badnets", {"params": {"patch_size": 3, "position": [6, 6]}}, "does not fit a 8x8 image"),
        ("badnets", {"target": 10}, r"target label 10 out of range for 10 classes: use 0..9"),
        ("badnets", {"target": -1}, "out of range"),
        ("badnets", {"params": {"colour": "red"}}, "unknown key.*colour.*valid keys"),
        ("badnets", {"mode": "one-to-one"}, "unknown target mode"),
        ("sig", {"mode": "all-to-all"}, "only supports mode all-to-one"),
        ("wanet", {"params": {"k": 20}}, "grid k must be in"),
    ],
)
def test_bad_attack_parameters_name_the_fix(name, kw, message):
    with pytest.raises(OnpError, match=message):
        make(name, **kw)


def test_unknown_attack_and_bad_poison_rate():
    with pytest.raises(OnpError, match="unknown attack 'lira'.*badnets"):
        build_attack("lira", SHAPE, 10)
    y = torch.arange(100) % 10
    for rate in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(OnpError, match=r"poisoning rate must be in \(0, 1\)"):
            choose_poison(make("badnets"), y, rate, seed=0)
