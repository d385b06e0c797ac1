"""`repair_sweep` (verdict's sweep going on from the agent's units before its repair), chosen on shadow models.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/onp_repair_sweep.py [--workers 2] [--report-only]

onp_no_mnp.md's leave-one-attack-out run found the repaired fold agents 0.17 points over the accuracy bound at 1%,
all of it on WaNet: the WaNet fold's agent, which never saw a warp, cuts 0-5 units, and verdict's repair of a
barely pruned model costs 4.4-5.5 points, where verdict's own sweep (64 units) loses 0.9-1.6 after the same repair.
`onp defend --method onp --set repair_sweep=true` lets verdict's sweep go on from the agent's units until its
reversed trigger fails after them (nothing where it already fails). Whether that helps is measured here on the
defender's own models, never on the held-out ones:

- `fold agents`: each of the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml) defended by the
  leave-one-attack-out agent that never saw its attack (benchmarks/runs/onp-no-mnp/without-ATTACK, trained by
  `onp_vs_baselines.py --agent-config configs/agent/fashion-mnist-sampled-no-mnp.yaml`): the situation of the
  protocol's held-out models, on models whose settings lie inside the sampler's ranges;
- `shipped agent`: the first three shadow models of each attack (onp_prunable.py's), the shipped agent, which
  trained on them.

Each at 1% and 5% defense data, with the recommended repair (onp_vs_baselines's `shipped agent verdict repair`)
without and with `repair_sweep`, in one process (the second run reuses the first's memoised inversions: no
seconds are compared). One torch thread per worker. One JSON line per model in onp_repair_sweep.jsonl
(resumable), then onp_repair_sweep.md. The choice for the held-out runs, per fraction, is onp_prunable.py's rule
on the fold agents' rows: the better mean DER after the repair among settings within the target (mean ASR <= 5%,
<= 2 points lost), else among all; a tie keeps the repair alone."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from onp_prunable import FRACTIONS, best, outcome, repaired_cell
from onp_prunable import models as first_three
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main, sampled_and_held_out

from onp_env.errors import OnpError

RESULTS = HERE / "results" / "onp_repair_sweep.jsonl"
FOLDS = HERE / "runs" / "onp-no-mnp"
SWEEP = (False, True)
AGENTS = ("fold agents", "shipped agent")
SPARE = ("agent-spare-0.01", "agent-spare-0.05")
"""`sweep_spare`'s candidates: the reversed trigger's rate allowed after a unit's return."""


def fold_agent(attack: str) -> Path:
    """The leave-one-attack-out agent that never saw `attack`, refused with one line where it was not trained."""
    path = FOLDS / f"without-{attack}" / "onp" / "agent"
    if not (path / "agent.json").is_file():
        raise OnpError(
            f"no fold agent at {path}: run benchmarks/onp_vs_baselines.py --agent-config "
            "configs/agent/fashion-mnist-sampled-no-mnp.yaml --runs benchmarks/runs/onp-no-mnp first"
        )
    return path


def models() -> list[tuple[str, str, Any]]:
    return [m for m in sampled_and_held_out() if m[1] == "shadow" and m[2].attack is not None]


def spare_of(limit_from: str) -> float | None:
    """The `sweep_spare` of a `--sweep-limit-from` value (agent-spare-X: X; else None)."""
    return float(limit_from.removeprefix("agent-spare-")) if limit_from.startswith("agent-spare-") else None


def results_of(limit_from: str) -> Path:
    """The rows of `--sweep-limit-from`: unpruned (the default's, both settings), agent (its sweep cells alone) or
    agent-spare-X (those with `sweep_spare` X)."""
    if spare_of(limit_from) is not None:
        return RESULTS.with_name(f"onp_repair_sweep_spare_{spare_of(limit_from)}.jsonl")
    return RESULTS.with_name("onp_repair_sweep_agent_limit.jsonl") if limit_from == "agent" else RESULTS


def measure(name: str, role: str, path: str, limit_from: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    attack = next(lab.attack.name for n, _, lab in models() if n == name)
    shipped = {n for n, _, _ in first_three()}
    runs = [("fold agents", {"agent": str(fold_agent(attack))})] + ([("shipped agent", {})] if name in shipped else [])
    spare = {} if spare_of(limit_from) is None else {"sweep_spare": spare_of(limit_from)}
    if spare:
        limit_from = "agent"
    if limit_from == "agent":  # the sweep's own accuracy budget, beside the default file's rows
        runs, sweeps = runs[:1], (True,)
    else:
        sweeps = SWEEP
    cells = [{**repaired_cell(path, fraction, **agent, repair_sweep=sweep, sweep_limit_from=limit_from,
                              **spare),
              "agents": label, "repair_sweep": sweep}
             for label, agent in runs for fraction in FRACTIONS for sweep in sweeps]  # fmt: skip
    return {"model": name, "attack": attack, "host": platform.node(), "torch": torch.__version__, "cells": cells}


def _cells(rows: Rows, agents: str, fraction: float, sweep: bool, attack: str | None = None) -> list[dict[str, Any]]:
    return [c for r in rows for c in r["cells"] if c["agents"] == agents and c["fraction"] == fraction
            and c["repair_sweep"] == sweep and attack in (None, r["attack"])]  # fmt: skip


def _units(cs: list[dict[str, Any]]) -> str:
    """The table columns units | swept: the mean of all units cut and of the sweep's."""
    return f"{statistics.mean(c['pruned'] for c in cs):.1f} | {statistics.mean(len(c['swept']) for c in cs):.1f}"


def choice(rows: Rows) -> str:
    """onp_prunable's rule on the fold agents' rows, per fraction; a tie keeps the repair alone."""
    picks = {f: best(SWEEP, lambda s, f=f: _cells(rows, "fold agents", f, s)) for f in FRACTIONS}
    said = ", ".join(f"{'repair_sweep' if s else 'the repair alone'} with {f:.0%}" for f, s in picks.items())
    return f"Choice for the held-out runs (fold agents' rows): {said}."


def report(rows: Rows) -> str:
    hosts, torches = sorted({r["host"] for r in rows}), sorted({r["torch"] for r in rows})
    lines = [
        "# `repair_sweep` on shadow models",
        "",
        f"Generated by `python benchmarks/onp_repair_sweep.py` from onp_repair_sweep.jsonl: {len(rows)} sampled shadow "
        "models. Fold agents: each model defended by the leave-one-attack-out agent that never saw its attack; "
        "shipped agent: the first three models of each attack (it trained on them). Each with verdict's repair "
        "(the recommended command's), without and with `repair_sweep`. Units: all the run cut (the agent's and the "
        "sweep's); swept: the sweep's. DER, ASR and accuracy lost in %/points; within: ASR <= 5% and <= 2 points "
        f"lost. Hosts: {', '.join(hosts)}; torch {', '.join(torches)}.",
        "",
        "| agents | defense data | repair_sweep | units | swept | agent DER | agent ASR | agent lost | repaired DER | "
        "repaired ASR | repaired lost | within |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for agents in AGENTS:
        for fraction in FRACTIONS:
            for sweep in SWEEP:
                cs = _cells(rows, agents, fraction, sweep)
                if cs:
                    lines.append(f"| {agents} | {fraction:.0%} | {sweep} | {_units(cs)} | {outcome(cs)} |")
    both = all(_cells(rows, "fold agents", f, sweep) for f in FRACTIONS for sweep in SWEEP)
    lines += ["", choice(rows) if both else "(The sweep alone: compare onp_repair_sweep.md's rows.)", "",
              "## Fold agents by attack", "",
              "| attack | defense data | repair_sweep | units | swept | agent DER | agent ASR | agent lost | "
              "repaired DER | repaired ASR | repaired lost | within |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for attack in sorted({r["attack"] for r in rows}):
        for fraction in FRACTIONS:
            for sweep in SWEEP:
                cs = _cells(rows, "fold agents", fraction, sweep, attack)
                if cs:
                    lines.append(f"| {attack} | {fraction:.0%} | {sweep} | {_units(cs)} | {outcome(cs)} |")
    return "\n".join(lines) + "\n"


def spare_report() -> str | None:
    """onp_repair_sweep_spare.md: the fold agents' sweep (limit from the agent's model) without and with each
    `sweep_spare` candidate, on the models all have rows for, and onp_prunable's rule's pick per fraction (a tie
    keeps no spare); None until every candidate has rows."""
    files = {None: results_of("agent"), **{spare_of(v): results_of(v) for v in SPARE}}
    if not all(f.is_file() for f in files.values()):
        return None
    rows = {k: {r["model"]: r for r in map(json.loads, f.read_text().splitlines())} for k, f in files.items()}
    names = sorted(set.intersection(*(set(r) for r in rows.values())))

    def cells(spare: float | None, fraction: float) -> list[dict[str, Any]]:
        return [c for n in names for c in rows[spare][n]["cells"]
                if c["agents"] == "fold agents" and c["fraction"] == fraction]  # fmt: skip

    lines = [
        "# `sweep_spare` on shadow models",
        "",
        f"Generated by `python benchmarks/onp_repair_sweep.py --sweep-limit-from agent-spare-X` from "
        f"{', '.join(f.name for f in files.values())}: the {len(names)} sampled shadow models each file has, each "
        "defended by the leave-one-attack-out agent that never saw its attack, with verdict's repair after its sweep "
        "(the accuracy limit from the agent's pruned model), without (`none`) and with `sweep_spare` (the agent's "
        "units given back where their return raises defense-set accuracy while the reversed trigger sends at most "
        "that share of the other classes' images to its class). Units: all the run cut; spared: given back. 'agent' "
        "columns: the pruned model before the repair. DER, ASR and accuracy lost in %/points; within: ASR <= 5% and "
        "<= 2 points lost.",
        "",
        "| defense data | sweep_spare | units | spared | agent DER | agent ASR | agent lost | repaired DER | "
        "repaired ASR | repaired lost | within |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    picks = {}
    for fraction in FRACTIONS:
        for spare in files:
            cs = cells(spare, fraction)
            spared = statistics.mean(len(c.get("spared", [])) for c in cs)
            units = f"{statistics.mean(c['pruned'] for c in cs):.1f} | {spared:.1f}"
            lines.append(f"| {fraction:.0%} | {spare if spare is not None else 'none'} | {units} | {outcome(cs)} |")
        picks[fraction] = best(tuple(files), lambda v, f=fraction: cells(v, f))
    said = ", ".join(f"{'no spare' if v is None else f'sweep_spare {v}'} with {f:.0%}" for f, v in picks.items())
    return "\n".join([*lines, "", f"Choice for the held-out runs (onp_prunable.py's rule): {said}."]) + "\n"


def main() -> None:
    if "--report-only" not in sys.argv:
        for attack in sorted({lab.attack.name for _, _, lab in models()}):
            fold_agent(attack)  # before any model is built
    limit = {"choices": ["unpruned", "agent", *SPARE], "default": "unpruned",
             "help": "where the sweep's accuracy limit is measured from (onp's sweep_limit_from; agent-spare-X: "
                     "from the agent's, with sweep_spare X)"}  # fmt: skip
    per_model_main(__doc__, RESULTS, models(), measure, report, option=("--sweep-limit-from", limit, results_of))
    spare = spare_report()
    if spare is not None:
        out = RESULTS.with_name("onp_repair_sweep_spare.md")
        out.write_text(spare)
        print(out)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
