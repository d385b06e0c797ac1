"""Named parameter sets of a defense: `onp defend --method M --preset NAME`, a bench spec's `preset`.

A defense class lists its presets in `presets` (name: Preset). A preset holds parameters that were measured
together, so that a user types one name instead of a dozen `--set`s; what the user sets besides wins. Where the
measured setting depended on how much defense data there was, `few` replaces some of them below `few_below`
images, the size of the defense set being known only once the artifact is read."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from onp_env.errors import OnpError


@dataclass(frozen=True)
class Preset:
    summary: str
    """One line: what the parameters are for, and where they were measured."""
    params: dict[str, Any]
    """The defense's parameters (a dict-valued parameter, e.g. onp's `repair`, as a nested dict)."""
    few: dict[str, Any] = field(default_factory=dict)
    """Parameters that replace those of `params` where the defense set holds fewer than `few_below` images."""
    few_below: int = 0
    scope: str = ""
    """The models it was measured on, named in a refusal where a model is not one of them."""

    def resolve(self, images: int) -> dict[str, Any]:
        """The parameters for a defense set of `images` images."""
        return merged(self.params, self.few if self.is_few(images) else {})

    def is_few(self, images: int) -> bool:
        """Whether a defense set of `images` images takes the `few` values."""
        return images < self.few_below

    def both(self, over: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Its parameters with few images and with many, `over` (the user's) on top: what is checked before the
        defense set's size is known."""
        return merged(self.resolve(0), over), merged(self.resolve(self.few_below), over)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `over`, nested dicts key by key (a user's `--set repair.repair_epochs=5` changes one key
    of a preset's `repair`, not the whole of it), except that an empty dict empties its section (`--set repair={}`
    leaves the repairing defense at its own defaults); neither is changed."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_of(cls: type, name: str) -> Preset:
    """The preset `name` of the defense class `cls`, refused with one line naming the ones it has."""
    presets: dict[str, Preset] = getattr(cls, "presets", {})
    if name in presets:
        return presets[name]
    method = getattr(cls, "name", cls.__name__)
    known = f"its presets: {', '.join(sorted(presets))}" if presets else "it has none; set its parameters with --set"
    raise OnpError(f"{method} has no preset {name!r} ({known})")
