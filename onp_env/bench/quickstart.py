"""`onp quickstart`: the first run on a fresh install, on the embedded digits data: a BadNets model,
every registered heuristic defense, a short training of the learned one (ONP) on digits shadow
models of BadNets and Blended (seeds 1-2; the defended model has seed 101) and its deployment; then
the comparison table, plots and artifacts of configs/bench/quick.yaml, in a few minutes on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onp_env.bench.config import BenchConfig, check
from onp_env.bench.run import run_bench
from onp_env.config import from_dict
from onp_env.registry import defense_names

HEURISTICS = ("mnp", "anp", "rnp", "bnp", "fp", "clp", "magnitude", "random")
"""A fixed list (not every registered name), so that installing a plugin does not change the grid."""
PATCH = {"patch_size": 2, "position": "bottom-right", "pattern": "checker"}
AGENT: dict[str, Any] = {
    "name": "quickstart",
    "zoo": {
        "base": {"data": {"name": "digits", "defense_fraction": 0.05}, "train": {"epochs": 30, "batch_size": 64}},
        "attacks": [{"name": "badnets", "params": PATCH}, {"name": "blended", "params": {"alpha": 0.2}}],
        "seeds": [1, 2],
    },
    "env": {"features": ["dynamic"], "budget": 0.3, "max_acc_drop": 0.2},
    "ppo": {"total_steps": 1024, "n_steps": 256, "batch_size": 64},
    "imitation": {"episodes": 2, "epochs": 30},
}


def quick_config() -> BenchConfig:
    heuristics = [{"name": n} for n in HEURISTICS if n in defense_names()]
    learned = [{"name": "onp", "params": {"agent_config": AGENT}}] if "onp" in defense_names() else []
    cfg = from_dict(BenchConfig, {
        "name": "quickstart", "datasets": [{"name": "digits"}], "models": [{"name": "small_cnn"}],
        "attacks": [{"name": "badnets", "params": PATCH}], "train": {"epochs": 30, "batch_size": 64},
        "seeds": [101], "fractions": [0.05], "defenses": heuristics + learned,
        "workers": min(2, os.cpu_count() or 1),
    }, "quickstart")  # fmt: skip
    check(cfg)
    return cfg


def run_quickstart(out: str | Path, progress: bool = True) -> Path:
    out = Path(out)
    report = run_bench(quick_config(), out, resume=(out / "config.json").is_file(), progress=progress)
    text = report.read_text()
    start = text.index("### DER")
    print(text[start : text.index("## Plots")] if "## Plots" in text else text[start:])
    print(f"report: {report}\nplots: {out / 'plots'}\ndefended artifacts: {out / 'defenses'}")
    return report
