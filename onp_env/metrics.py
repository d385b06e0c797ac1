"""ACC, ASR, RA and DER: implemented once, used by every method and report.

Definitions (docs/methods.md): ACC = clean test accuracy; ASR = share of triggered images
*whose true label is not their target* that are classified as the target; RA = accuracy of those
same triggered images against their true labels; DER = (max(0, ASR_b - ASR_a) -
max(0, ACC_b - ACC_a) + 1) / 2, in [0, 1], where a drop in accuracy *lowers* DER."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from onp_env.attacks.base import Attack
from onp_env.devices import device_of


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (pred == labels).float().mean().item()


def _eligible(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    keep = labels != targets
    if not keep.any():
        raise ValueError("no image whose true label differs from its target: ASR is undefined")
    return keep


def attack_success_rate(pred_triggered: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    keep = _eligible(labels, targets)
    return (pred_triggered[keep] == targets[keep]).float().mean().item()


def robust_accuracy(pred_triggered: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    keep = _eligible(labels, targets)
    return (pred_triggered[keep] == labels[keep]).float().mean().item()


def der(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Defense effectiveness rate from {acc, asr} before and after a defense."""
    asr_gain = max(0.0, before["asr"] - after["asr"])
    acc_loss = max(0.0, before["acc"] - after["acc"])
    return (asr_gain - acc_loss + 1) / 2


@torch.inference_mode()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs, on the CPU, of a model on any device in eval mode for images `x` (kept where they are:
    only one batch at a time moves to the model)."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels, on the CPU (see `logits`)."""
    return logits(model, x, batch_size).argmax(1)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None
) -> dict[str, float | None]:
    """{acc, asr, ra} of `model` on clean images `x`, `y`; asr and ra are None without an attack."""
    out: dict[str, float | None] = {"acc": accuracy(predict(model, x), y), "asr": None, "ra": None}
    if attack is not None:
        targets = attack.targets(y)
        keep = y != targets
        pred = predict(model, attack.apply(x[keep]))
        out["asr"] = attack_success_rate(pred, y[keep], targets[keep])
        out["ra"] = robust_accuracy(pred, y[keep], targets[keep])
    return out
