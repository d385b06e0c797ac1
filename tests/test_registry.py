"""Defenses and commands are a registry (entry points), not imports: a user's own package adds a
defense that `onp defend` runs like ours, and the lab never imports the packages above it."""

import json
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import torch

import onp_env.registry as registry
from baselines.common import Defense, top_units
from onp_env.cli import main
from onp_env.config import bounded


@dataclass
class LastUnitsParams:
    count: int = bounded(2, ge=0)
    """How many units to prune."""


class LastUnits(Defense):
    """The tiny example of a user's defense: prunes the `count` last units of the last layer."""

    name = "last-units"
    Params = LastUnitsParams

    def scores(self, model, layout, x, y):
        return torch.arange(layout.num_units, dtype=torch.float)

    def select(self, scores, model, layout, x, y):
        return top_units(scores, torch.ones_like(scores, dtype=torch.bool))[: self.params.count]


@pytest.fixture
def user_package(monkeypatch):
    """What `[project.entry-points."onp_env.defenses"] last-units = "tests.test_registry:LastUnits"`
    in a user's pyproject.toml does once their package is installed."""
    entries = dict(registry._entries())
    entries["last-units"] = EntryPoint("last-units", "tests.test_registry:LastUnits", registry.GROUP)
    monkeypatch.setattr(registry, "_entries", lambda: entries)


def test_a_users_registered_defense_runs_through_onp_defend(user_package, tiny_artifact, tmp_path, capsys):
    assert "last-units" in registry.defense_names()
    out = tmp_path / "defended"
    args = ["defend", "--method", "last-units", "--artifact", str(tiny_artifact), "--set", "count=3", "--out", str(out)]
    assert main([*args, "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "last-units" and report["pruned"] == 3
    assert json.loads((out / "report.json").read_text())["pruned"] == 3
    assert main([*args[:-1], str(tmp_path / "again"), "--set", "count=-1"]) == 2  # its Params are range-checked


def test_unknown_defense_names_the_registered_ones(capsys, tiny_artifact):
    assert main(["defend", "--method", "nope", "--artifact", str(tiny_artifact)]) == 2
    assert "registered defenses are" in capsys.readouterr().err


def test_the_lab_imports_nothing_above_it():
    """Only the plugin modules named by entry points load (agents.cli adds `train-agent`, importing
    nothing else until it runs)."""
    code = (
        "import sys, onp_env, onp_env.cli, onp_env.defend, onp_env.env, onp_env.registry; "
        "onp_env.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('baselines', 'agents') "
        "and m not in ('agents', 'agents.cli')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
