"""Backdoor scores for the environment's reward, from the defense set only.

- `oracle`: attack success rate on triggered defense images (score_kwargs {kind: confidence}: their
  mean softmax probability of the target label instead, which falls with every backdoor unit cut
  rather than only once the last one goes: a denser reward). Needs the trigger: for training on
  shadow models whose attack is known, never for deployment.
- `unlearn` (trigger-free, after RNP, Li et al., ICML 2023): an unlearned twin of the model (clean
  loss maximised until its defense accuracy collapses) sends clean images to the backdoor label
  through the backdoor neurons. The score is the share of clean defense images that the twin,
  pruned exactly like the model, still sends to its collapse label.
- `anp` (trigger-free, after ANP, Wu & Wang, NeurIPS 2021): under an adversarial perturbation of
  the unpruned units' BatchNorm weight and bias (Linear units: weight row and bias), a backdoored
  network collapses onto its target. The score is the share of clean defense images predicted as
  the most frequent label under that perturbation.
- `none`: no backdoor term (always 0): for deploying a learned policy, where no reward is read."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from onp_env.devices import device_of
from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout
from onp_env.masking import Masks, split_output
from onp_env.training import augment_defense_batch, defense_augment

SCORES = ("oracle", "unlearn", "anp", "none")


def unlearn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    max_epochs: int = 20,
    clean_threshold: float = 0.2,
    clip: float = 20.0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "unlearning",
    augment: str = "none",
) -> tuple[nn.Module, dict[str, Any]]:
    """RNP's neuron-level unlearning on a copy of `model`: gradient ascent on the clean
    cross-entropy, all weights trainable, BatchNorm in train mode, SGD with the released schedule
    (learning-rate steps x0.1 at epochs 10 and 20), until the defense-set accuracy is <=
    `clean_threshold`, for at most `max_epochs` (20 here, for the env's `unlearn` score and MNP's
    suppression; RNP passes the released 21). `augment` (onp_env.training.defense_augment: none,
    crop, crop-flip or auto) augments every batch as the released code does.

    Departures from the released code (docs/methods.md): the gradient norm is clipped to `clip`
    (the released code calls its clip before backward(), so it never clips, and run that way the
    ascent diverges to NaN on the Fashion-MNIST CNN); the threshold is checked on every batch (its
    accuracy before the update), not at epoch ends, since on small models the epoch-end check
    overshoots into a degenerate model. `progress`: a bar of the batches on stderr (its total is the
    max_epochs bound; it stops early at the threshold)."""
    augment = defense_augment(augment, x)
    twin = copy.deepcopy(model)
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 20], gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    steps, acc = 0, 1.0
    done = False
    bar = tqdm(total=max_epochs * -(-len(x) // batch_size), desc=desc, disable=not progress, leave=False)
    for _ in range(max_epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            out = twin(augment_defense_batch(x[idx], augment, g))
            acc = (out.argmax(1) == y[idx]).float().mean().item()
            if acc <= clean_threshold:
                done = True
                break
            loss = -F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(twin.parameters(), clip)
            opt.step()
            steps += 1
            bar.update()
        if done:
            break
        sched.step()
    bar.close()
    twin.eval()
    return twin, {"steps": steps, "final_batch_acc": acc, "reached_threshold": done}


class UnlearnScore:
    def __init__(self, model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, **kwargs: Any):
        try:
            self.twin, self.report = unlearn(model, x, y, **kwargs)
        except TypeError as e:
            raise OnpError(f"bad score_kwargs for unlearn: {e}") from e
        masks.attach(self.twin)
        self.x = x
        with torch.inference_mode():
            pred = self.twin(x).argmax(1)
        self.label = int(torch.bincount(pred).argmax())
        self.report["collapse_label"] = self.label

    def __call__(self) -> float:
        with torch.inference_mode():
            return (self.twin(self.x).argmax(1) == self.label).float().mean().item()


class ANPScore:
    """One ANP perturbation per call: uniform start in [-eps, eps] (fixed seed), one signed
    ascent step of size eps on the clean loss, then the collapse rate."""

    def __init__(self, model: nn.Module, layout: UnitLayout, masks: Masks, x: torch.Tensor, y: torch.Tensor,
                 eps: float = 0.4, seed: int = 0):  # fmt: skip
        self.model, self.layout, self.masks, self.x, self.y, self.eps = model, layout, masks, x, y, eps
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device

        def uniform(n: int) -> torch.Tensor:
            return ((torch.rand(n, generator=g) * 2 - 1) * eps).to(device_of(model))

        self.start = {lay.name: (uniform(lay.size), uniform(lay.size)) for lay in layout.layers}

    def _forward(self, delta: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        modules: dict[str, Any] = dict(self.model.named_modules())
        hooks = []
        for lay in self.layout.layers:
            d, b = delta[lay.name]
            alive = (self.masks.values[lay.name] > 0).float().to(d.device)

            def perturb(m: nn.Module, i: object, out: torch.Tensor, d=d * alive, b=b * alive) -> torch.Tensor:
                core, bias, shape = split_output(m, out)
                # weight * (1 + d) and bias * (1 + b): y' = y + d * core + b * bias
                return out + d.view(shape) * core + b.view(shape) * bias

            hooks.append(modules[lay.name].register_forward_hook(perturb))
        try:
            return self.model(self.x)
        finally:
            for h in hooks:
                h.remove()

    def __call__(self) -> float:
        delta = {k: (d.clone().requires_grad_(), b.clone().requires_grad_()) for k, (d, b) in self.start.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(self._forward(delta), self.y)
            grads = torch.autograd.grad(loss, [t for pair in delta.values() for t in pair])
        it = iter(grads)
        stepped = {k: (d.detach() + self.eps * next(it).sign(), b.detach() + self.eps * next(it).sign())
                   for k, (d, b) in delta.items()}  # fmt: skip
        with torch.inference_mode():
            pred = self._forward(stepped).argmax(1)
        return torch.bincount(pred).max().item() / len(pred)


def check_score(name: str, has_attack: bool) -> None:
    if name not in SCORES:
        raise OnpError(f"unknown backdoor score '{name}': choose one of {', '.join(SCORES)}")
    if name == "oracle" and not has_attack:
        raise OnpError(
            "score 'oracle' needs the model's trigger: use score=unlearn or anp for a model whose attack is unknown"
        )
