"""TrojanNN-style attack (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): the
trigger is not chosen by hand but optimised on a trained (reference) model so that it strongly
excites a few chosen internal neurons; the model is then retrained from the reference weights on
data stamped with that trigger and relabelled to the target.

Procedure here: (1) the neurons are those of `layer` with the largest total outgoing weight
magnitude into the next layer of the same kind (the paper's "highly connected" neurons); (2) the
patch pixels are optimised with Adam, through a sigmoid, to maximise the neurons' mean
pre-activation on a batch of training images carrying the patch; (3) the pattern is quantised to
8-bit pixels and recorded in the params, so the attack is rebuilt without re-optimising.

Departures: the paper reverse-engineers training data and retrains only later layers; here the
attacker has the training data and fine-tunes the whole network from the reference weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onp_env.attacks.badnets import Patch
from onp_env.config import SEED_LIMIT, bounded, short_repr
from onp_env.errors import OnpError


@dataclass
class TrojanNNParams:
    patch_size: int = bounded(3, ge=1)
    position: str | list[int] = "bottom-right"
    layer: str | None = None
    """Module whose output neurons the trigger excites (default: last hidden Linear layer)."""
    neurons: int = bounded(1, ge=1)
    steps: int = bounded(300, ge=1, le=1_000_000)
    lr: float = bounded(0.1, gt=0)
    batch: int = bounded(256, ge=1, le=1_000_000)
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    pattern: list | None = None
    """The optimised trigger as 0-255 integers shaped (C, size, size); filled by `prepare`."""


def check_pattern(pattern: Any, shape: tuple[int, int, int]) -> None:
    """A recorded trigger must be nested lists shaped `shape` of pixel values in 0..255, checked
    before torch sees it (an artifact's params are untrusted); the error names the entry."""
    c, h, w = shape
    fix = "the trigger is corrupt or crafted; rerun the attack to optimise it again"

    def need(where: str, row: Any, n: int) -> None:
        if not isinstance(row, list) or len(row) != n:
            got = f"{len(row)} entries" if isinstance(row, list) else short_repr(row, 40)
            raise OnpError(f"trojannn {where} must be a list of {n} entries (the pattern is shaped [{c}, {h}, {w}]), "
                           f"got {got}: {fix}")  # fmt: skip

    need("pattern", pattern, c)
    for i, plane in enumerate(pattern):
        need(f"pattern[{i}]", plane, h)
        for j, row in enumerate(plane):
            need(f"pattern[{i}][{j}]", row, w)
            for k, v in enumerate(row):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 255:
                    raise OnpError(f"trojannn pattern[{i}][{j}][{k}] must be a pixel value in 0..255, got "
                                   f"{short_repr(v, 40)}: {fix}")  # fmt: skip


def _default_layer(model: nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) >= 2:
        return linears[-2]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise OnpError("trojannn needs a hidden Linear or BatchNorm2d layer: set params.layer")
    return bns[-1]


def _outgoing_strength(model: nn.Module, layer: str) -> torch.Tensor:
    """Sum of |weight| leaving each neuron of `layer` into the next Linear/Conv consuming it."""
    mods = dict(model.named_modules())
    names = list(mods)
    src = mods[layer]
    width = src.out_features if isinstance(src, nn.Linear) else src.num_features
    for n in names[names.index(layer) + 1 :]:
        m = mods[n]
        if isinstance(m, nn.Linear) and m.in_features == width:
            return m.weight.detach().abs().sum(0)
        if isinstance(m, nn.Conv2d) and m.in_channels == width:
            return m.weight.detach().abs().sum((0, 2, 3))
    return torch.ones(width)


class TrojanNN(Patch):
    name = "trojannn"
    Params = TrojanNNParams
    needs_reference_model = True

    def validate(self) -> None:
        p = self.params
        c = self.image_shape[0]
        self.locate(p.patch_size, p.position)  # before any tensor: patch_size must fit the image
        if p.pattern is None:
            self._pattern = torch.full((c, p.patch_size, p.patch_size), 0.5)  # placeholder until prepare()
            return
        check_pattern(p.pattern, (c, p.patch_size, p.patch_size))
        try:
            self._pattern = torch.tensor(p.pattern, dtype=torch.float32) / 255
        except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # check_pattern should have caught it
            raise OnpError(f"trojannn pattern is not a (C, size, size) array of pixel values ({e}): rerun the attack "
                           f"to optimise it again") from e  # fmt: skip

    @property
    def prepared(self) -> bool:
        return self.params.pattern is not None

    def apply(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if not self.prepared:
            raise OnpError("trojannn trigger not optimised yet: call prepare(reference_model, images)")
        return self.stamp(x)

    def prepare(self, model: nn.Module, images: torch.Tensor) -> dict:
        """Optimise the trigger on `model` (a trained clean model); returns a report."""
        p = self.params
        layer = p.layer or _default_layer(model)
        mods = dict(model.named_modules())
        if layer not in mods:
            raise OnpError(
                f"trojannn layer '{layer}' not in the model: choose one of {', '.join(n for n in mods if n)}"
            )
        strength = _outgoing_strength(model, layer)
        chosen = torch.topk(strength, min(p.neurons, len(strength))).indices
        g = torch.Generator().manual_seed(p.seed)
        x = images[torch.randperm(len(images), generator=g)[: p.batch]]
        logits = torch.zeros(self._pattern.shape, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=p.lr)
        acts: dict[str, torch.Tensor] = {}
        hook = mods[layer].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
        was_training = model.training
        model.eval()
        try:
            for _ in range(p.steps):
                self._pattern = torch.sigmoid(logits)
                model(self.stamp(x))
                a = acts["a"][:, chosen]
                loss = -(a.mean(dim=tuple(range(2, a.ndim))) if a.ndim > 2 else a).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                quant = torch.round(torch.sigmoid(logits) * 255).to(torch.int64)
                self._pattern = quant.float() / 255
                model(x)
                before = acts["a"][:, chosen].mean().item()
                model(self.stamp(x))
                after = acts["a"][:, chosen].mean().item()
        finally:
            hook.remove()
            model.train(was_training)
        p.pattern = quant.tolist()
        p.layer = layer
        return {
            "layer": layer,
            "neurons": chosen.tolist(),
            "activation_clean": round(before, 4),
            "activation_triggered": round(after, 4),
        }
