"""The suites' environments: `gym.make("onp_env/Digits-v0", split="test")`.

A suite id freezes the env's settings (onp_env/suite/spec.py); only the split, where the models are
evaluated (`device`), the lab cache and the progress bar are chosen at make time. For other settings,
make `onp_env/NeuronPruning-v0` with `artifacts=` the models of `onp suite build`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onp_env.env import NeuronPruningEnv, PruningTarget
from onp_env.errors import OnpError
from onp_env.suite.spec import get_suite
from onp_env.suite.zoo import SuiteModel, build_split


class FrozenSettingError(OnpError, TypeError):
    """A setting a suite id freezes, passed to make: a TypeError as for any unexpected keyword argument
    (wrappers such as TorchRL's GymEnv probe optional ones that way), with the fix in its message."""


class SuiteEnv(NeuronPruningEnv):
    """NeuronPruningEnv over one split of a suite; reset(options={"model": "digits-v0/test/007"})
    picks a model by its stable name. `suite`, `split` and `models` (each with its manifest check)
    say what it holds. `models` (stable names) builds and holds only those models of the split: a
    subset to iterate on, with the split's frozen settings."""

    def __init__(self, suite: str, split: str = "train", device: str = "cpu", cache: str | Path | None = None,
                 progress: bool = True, models: list[str] | None = None, **unexpected: object):  # fmt: skip
        spec = get_suite(suite)
        if unexpected:
            name = sorted(unexpected)[0]
            raise FrozenSettingError(
                f"{spec.gym_id} got an unexpected keyword argument '{name}': it freezes its settings; pass only "
                "split, models, device, cache or progress, or make onp_env/NeuronPruning-v0 with artifacts= for other "
                "settings"
            )
        built: list[SuiteModel] = build_split(spec, split, cache, progress, names=models)
        targets = [dataclasses.replace(PruningTarget.from_artifact(m.path), name=m.name) for m in built]
        super().__init__({**spec.env, "device": device}, targets=targets)
        self.suite, self.split, self.models = spec, split, built
