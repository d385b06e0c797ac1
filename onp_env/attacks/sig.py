"""SIG (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019): clean-label; a horizontal sinusoid
x' = clip(x + delta * sin(2 pi j f / W)) is added to images *of the target class only*, whose
labels stay correct. At test time the signal is added to images of other classes.

Departures: none in the signal; the paper's delta = 20 (of 255) at training time is the default.
`test_delta` lets the test-time signal be stronger than the poisoning one (the attacker controls
test inputs); the shipped Fashion-MNIST config uses it and says why."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onp_env.attacks.base import Attack, check_unit
from onp_env.config import bounded
from onp_env.errors import OnpError


@dataclass
class SIGParams:
    delta: float = bounded(20 / 255, gt=0, le=1)
    """Amplitude of the sinusoid during poisoning, in [0, 1] pixel units."""
    test_delta: float | None = bounded(None, gt=0, le=1)
    """Amplitude at test time (default: delta)."""
    frequency: float = bounded(6.0, gt=0)
    """Periods across the image width."""


class SIG(Attack):
    name = "sig"
    Params = SIGParams
    clean_label = True

    def validate(self) -> None:
        p = self.params
        check_unit("delta", p.delta)
        if p.test_delta is not None:
            check_unit("test_delta", p.test_delta)
        if self.mode != "all-to-one":
            raise OnpError("sig is clean-label and only supports mode all-to-one")
        w = self.image_shape[2]
        self._wave = torch.sin(2 * math.pi * torch.arange(w) * p.frequency / w)

    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        p = self.params
        d = p.delta if train or p.test_delta is None else p.test_delta
        return (x + d * self._wave.to(x.dtype)).clamp(0, 1)
