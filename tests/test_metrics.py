import pytest
import torch
from torch import nn

from onp_env.attacks import build_attack
from onp_env.metrics import accuracy, attack_success_rate, der, evaluate, robust_accuracy

t = torch.tensor


def test_accuracy_by_hand():
    assert accuracy(t([1, 2, 3, 0]), t([1, 2, 0, 0])) == 0.75


def test_asr_and_ra_skip_images_whose_true_label_is_the_target():
    labels = t([0, 1, 2, 3, 4])
    targets = t([0, 0, 0, 0, 0])
    pred = t([0, 0, 0, 3, 1])  # image 0 is of the target class: excluded
    assert attack_success_rate(pred, labels, targets) == 0.5  # 2 of the 4 eligible
    assert robust_accuracy(pred, labels, targets) == 0.25  # only image 3 keeps its label


def test_all_to_all_counts_every_image():
    labels = t([0, 1, 2])
    targets = (labels + 1) % 3
    assert attack_success_rate(t([1, 2, 2]), labels, targets) == pytest.approx(2 / 3)


def test_der_rewards_asr_drop_and_penalises_accuracy_drop():
    before = {"acc": 0.90, "asr": 1.00}
    assert der(before, {"acc": 0.90, "asr": 0.00}) == 1.0
    assert der(before, {"acc": 0.90, "asr": 1.00}) == 0.5
    # ASR -0.8, ACC -0.2: (0.8 - 0.2 + 1) / 2; the wrong sign would give (0.8 + 0.2 + 1) / 2 = 1.0
    assert der(before, {"acc": 0.70, "asr": 0.20}) == pytest.approx(0.8)
    # gains are clipped at 0: a higher ACC or a higher ASR after the defense does not count
    assert der(before, {"acc": 0.95, "asr": 1.0}) == 0.5
    assert der(before, {"acc": 0.00, "asr": 1.0}) == pytest.approx(0.05)
    assert der({"acc": 0.9, "asr": 0.1}, {"acc": 0.9, "asr": 0.5}) == 0.5


def test_evaluate_agrees_with_the_primitives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    attack = build_attack("badnets", (1, 8, 8), 10, target=2, params={"patch_size": 2})
    x, y = torch.rand(50, 1, 8, 8), torch.arange(50) % 10
    got = evaluate(model, x, y, attack)
    with torch.no_grad():
        assert got["acc"] == accuracy(model(x).argmax(1), y)
        keep = y != 2
        trig = model(attack.apply(x[keep])).argmax(1)
    assert got["asr"] == attack_success_rate(trig, y[keep], torch.full_like(y[keep], 2))
    assert got["ra"] == robust_accuracy(trig, y[keep], torch.full_like(y[keep], 2))
    assert evaluate(model, x, y)["asr"] is None
