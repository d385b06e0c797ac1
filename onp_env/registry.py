"""The name table of defenses (heuristic and learned), read from the Python entry points of group
`onp_env.defenses`. The lab never imports the packages above it: `onp defend`, the environment's
signal features and the benchmarks find a defense here by name, and a user's own package adds one
by declaring an entry point in its pyproject.toml:

    [project.entry-points."onp_env.defenses"]
    mine = "my_package.module:MyDefense"

A defense class has a `name`, a `Params` dataclass, and `scores(model, layout, x, y)` (suspicion of
every unit from the model and clean defense data; see baselines.common.Defense)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from onp_env.config import short_repr
from onp_env.errors import OnpError

GROUP = "onp_env.defenses"
COMMANDS = "onp_env.commands"


@cache
def _entries() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def command_plugins() -> list[Callable[[Any], None]]:
    """`add(subparsers)` functions of the `onp` subcommands that other packages declare (group
    onp_env.commands), each adding its parser with `func` set; sorted by name."""
    return [ep.load() for ep in sorted(entry_points(group=COMMANDS), key=lambda ep: ep.name)]


def defense_names() -> list[str]:
    return sorted(_entries())


def defense_class(name: str) -> Any:
    """The registered defense class called `name`."""
    entries = _entries()
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none (is onp-env installed with pip?)"
        raise OnpError(f"unknown defense {short_repr(name)}: registered defenses are {known}")
    return entries[name].load()
