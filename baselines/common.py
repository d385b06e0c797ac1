"""The one interface every baseline defense implements, and its wrapper as an environment policy.

A defense sees a model and the clean defense set, nothing else: no test data, no trigger. It
scores every prunable unit (higher = more suspicious), chooses units to prune by its own paper's
rule, and prunes through the shared primitive (onp_env.masking.Masks)."""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from onp_env.attacks import PoisonedSet
from onp_env.config import TrainConfig, from_dict
from onp_env.devices import resolve_device
from onp_env.errors import OnpError
from onp_env.graph.units import UnitLayout, find_units
from onp_env.masking import Masks
from onp_env.models.layers import keep_values, lay_out
from onp_env.presets import Preset
from onp_env.training import train


@dataclass
class DefenseResult:
    method: str
    scores: torch.Tensor
    """(units,) suspicion per unit; -inf for units the method cannot judge."""
    pruned: list[int]
    """Flat unit indices the method prunes, most suspicious first."""
    masks: dict[str, Any]
    """Masks.state() of the pruned model: plain data."""
    model: nn.Module
    """The original weights with the pruned units removed (masks folded in)."""
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    finetuned: nn.Module | None = None
    """For methods that fine-tune after pruning: the fine-tuned model."""


class Defense(ABC):
    """Subclasses set `name`, `Params` (a dataclass of the paper's defaults), `scores` and `select`.

    `device` (cpu, cuda, cuda:N or auto) is where the scoring and pruning run: `plan` and `run` take
    the model and data anywhere and hand back models, scores and units on the CPU. Randomness comes
    from CPU generators, so a seed draws the same numbers on every device."""

    name: ClassVar[str]
    Params: ClassVar[type]
    presets: ClassVar[dict[str, Preset]] = {}
    """Named parameter sets (`onp defend --preset NAME`), each as it was measured."""

    def __init__(self, semantics: str = "zero", seed: int = 0, device: str = "cpu", **params: Any):
        # typed and range-checked against the Params dataclass (onp_env.config.bounded), one place for all
        self.params: Any = from_dict(self.Params, params, f"{self.name} parameters")
        self.semantics, self.seed = semantics, seed
        self.device = resolve_device(device)
        self.extra: dict[str, Any] = {}
        """What a method measured on its way (e.g. whether unlearning reached its threshold)."""

    @classmethod
    def cell_cpus(cls, params: dict[str, Any], threads: int) -> int:
        """Cores one run with these parameters keeps busy when torch has `threads` threads: what
        `onp bench` reserves for its cell. Methods that start threads of their own override it."""
        return threads

    @classmethod
    def run_hint(cls, params: dict[str, Any]) -> str | None:
        """A line `onp defend` prints after a run with these parameters and no preset, where a better-measured
        setting of the method exists (None: nothing to say)."""
        return None

    def check_inputs(self, model: nn.Module, x: torch.Tensor) -> None:
        """Refuse, with one line and before any work, a model these settings cannot defend (e.g. one of another kind
        than a shipped reference they read describes); `x`: a few defense images. Nothing to refuse by default."""
        return None

    @abstractmethod
    def scores(self, model: nn.Module, layout: UnitLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Suspicion of every unit (higher = prune first)."""

    @abstractmethod
    def select(self, scores: torch.Tensor, model: nn.Module, layout: UnitLayout, x: torch.Tensor,
               y: torch.Tensor) -> list[int]:  # fmt: skip
        """Units to prune by the method's own rule, most suspicious first."""

    def finetune(self, original: nn.Module, pruned_model: nn.Module, layout: UnitLayout, pruned: list[int],
                 x: torch.Tensor, y: torch.Tensor) -> nn.Module | None:  # fmt: skip
        """Methods that repair or purify after pruning override this; models and data are on the
        defense's device."""
        return None

    def plan(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[UnitLayout, torch.Tensor, list[int]]:
        """(layout, scores on the CPU, units to prune) without touching `model`."""
        work, layout, s = self.scored(model, x, y)
        x, y = x.to(self.device), y.to(self.device)
        return layout, s, self.select(s, work, layout, x, y)

    def scored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, UnitLayout, torch.Tensor]:
        """(the working copy of `model` on the device, its layout, scores on the CPU): what `plan` reads before it
        selects, `extra` holding what scoring recorded."""
        if len(x) == 0:
            raise OnpError(f"{self.name} needs a non-empty defense set")
        work = copy.deepcopy(model).to(self.device).eval()
        x, y = x.to(self.device), y.to(self.device)
        layout, _ = find_units(work, x[:2])
        self.extra = {}
        torch.manual_seed(self.seed)
        return work, layout, self.scores(work, layout, x, y).cpu()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> DefenseResult:
        start = time.perf_counter()
        layout, s, pruned = self.plan(model, x, y)
        target = copy.deepcopy(model).to(self.device).eval()
        with Masks(target, layout, self.semantics) as masks:
            masks.prune(pruned)
            pruned_model, state = masks.export(), masks.state()
        # the hooks are gone: `target` is the unpruned model, on the device like the data
        finetuned = self.finetune(target, pruned_model, layout, pruned, x.to(self.device), y.to(self.device))
        details = {"params": dataclasses.asdict(self.params), "semantics": self.semantics, "seed": self.seed,
                   **self.extra}  # fmt: skip
        return DefenseResult(self.name, s, pruned, state, pruned_model.cpu(), time.perf_counter() - start, details,
                             None if finetuned is None else finetuned.cpu())  # fmt: skip


def finetune_pruned(model: nn.Module, layout: UnitLayout, pruned: list[int], x: torch.Tensor, y: torch.Tensor,
                    cfg: TrainConfig, semantics: str, seed: int, desc: str, progress: bool,
                    pre_hooks: dict[str, Callable[..., Any]] | None = None,
                    before_epoch: Callable[[nn.Module, int], None] | None = None,
                    cpu_layout: torch.memory_format = torch.contiguous_format) -> nn.Module:  # fmt: skip
    """A copy of `model` trained on (x, y) with the `pruned` units held at zero by their masks (folded in).
    `pre_hooks` (module name: forward pre-hook) act during the training only; the copy returned has none.
    `before_epoch(copy, epoch)`: onp_env.training.train's, on the masked copy (it may rewrite `x` in place).
    `cpu_layout`: the memory layout of the copy's 4-d weights while it trains on a CPU; it is returned in the
    model's own."""
    tuned = copy.deepcopy(model)
    modules = dict(tuned.named_modules())
    with Masks(tuned, layout, semantics) as masks:
        masks.prune(pruned)
        handles = [modules[name].register_forward_pre_hook(hook) for name, hook in (pre_hooks or {}).items()]
        moved = lay_out(tuned, cpu_layout) if resolve_device(cfg.device).type == "cpu" else []
        try:
            train(tuned, PoisonedSet(x, y), cfg, seed, desc=desc, progress=progress, before_epoch=before_epoch)
        finally:
            keep_values(moved)
            for handle in handles:
                handle.remove()
        return masks.export()


def top_units(scores: torch.Tensor, keep: torch.Tensor) -> list[int]:
    """Indices where `keep` holds, ordered by descending score (ties by index: deterministic)."""
    idx = torch.nonzero(keep).flatten()
    order = torch.argsort(-scores[idx], stable=True)
    return idx[order].tolist()


class BaselinePolicy:
    """A defense as a policy for NeuronPruningEnv (neuron mode): on the first step of an episode it
    plans on the env's current model and defense set, then prunes its chosen units one per step,
    most suspicious first, and STOPs when its own rule says so."""

    def __init__(self, defense: Defense):
        self.defense = defense
        self._queue: list[int] = []

    def act(self, env: Any, obs: Any = None, info: Any = None) -> int:
        """The next unit of the plan, or STOP; `obs` and `info` are not read (onp_env.suite's Policy)."""
        e = env.unwrapped
        if e.cfg.action_mode != "neuron":
            raise OnpError("baseline policies act in action_mode='neuron'")
        if e.steps == 0:
            _, _, pruned = self.defense.plan(e.task.source_model, *e.task.defense)
            self._queue = list(pruned)
        while self._queue and e.pruned[self._queue[0]]:  # already pruned, e.g. with its residual group
            self._queue.pop(0)
        return self._queue.pop(0) if self._queue else e.max_units


def heuristic_policy(name: str, params: dict[str, Any], seed: int) -> BaselinePolicy:
    """The registered defense `name` as a policy (entry point of group onp_env.policies)."""
    from onp_env.registry import defense_class

    reserved = sorted(set(params) & {"seed", "device", "semantics"})
    if reserved:
        raise OnpError(f"policy {name}: {', '.join(reserved)} cannot be a parameter (the seed is --seed; the env "
                       "sets device and semantics)")  # fmt: skip
    return BaselinePolicy(defense_class(name)(seed=seed, **params))


def run_policy(policy: BaselinePolicy, env: Any, seed: int | None = None,
               options: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One episode; returns the info dicts of every step (the episode record)."""
    _, info = env.reset(seed=seed, options=options)
    record = [info]
    done = False
    while not done:
        _, reward, term, trunc, info = env.step(policy.act(env))
        record.append({**info, "reward": reward})
        done = term or trunc
    return record


__all__ = [
    "BaselinePolicy",
    "Defense",
    "DefenseResult",
    "finetune_pruned",
    "heuristic_policy",
    "run_policy",
    "top_units",
]
