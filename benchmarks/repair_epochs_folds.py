"""Should the agent's preset repair over 4 or 5 epochs instead of 3 where it has FEW_IMAGES defense images or more?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/repair_epochs_folds.py --set SET [--workers 2]

Written 2026-12-07, when with 5% defense data (3000 Fashion-MNIST images) the agent's preset trailed the recommended
`verdict` by 0.05-0.10 mean DER on the protocol's held-out models and on seeds 104-109 (the README's "Not met" then):
the same ASR, 0.1-0.2 points more accuracy lost on every attack. Its repair ran 3 epochs where `verdict`'s runs 5: 5
epochs scored better on the shadow models on 2026-12-05 (onp_repair_epochs_5.md: 92.7 / 1.3 / 0.9 against 92.6 / 1.5 /
1.0, the command of that day, its agents' units in-sample) and were left out for the deployment bound (with
`verify_sweep`: a median 0.091 of ANP's time, at most 0.105, 4 of 5 models within a tenth;
deploy_cost_agent_repair_epochs_at_5.md).

- `--set choose-folds`: the 30 sampled shadow models, each defended by the agent's preset as it shipped then (3
  repair epochs) and with `repair_epochs` 4 and 5, with the leave-one-attack-out agent that never trained on its attack
  (verify_sweep.fold_agent), the defense's seeds 22 and 23 (run by no study before), 5% defense data. Rule, written
  before the run: the preset takes, from FEW_IMAGES images up, the most epochs among 5 and 4 for which
  onp_repair_knobs.CHANGE_RULE holds against 3 on these runs over both seeds (mean DER not below, mean ASR and points
  lost at most 0.1 above, runs within the target not fewer) **and** one deploy_cost.py timing of that setting beside
  the 3-epoch preset against one ANP run per model (its five shadow models, 5% defense data, the code of that time)
  has every model within a tenth of ANP's time; else it keeps 3. The timing of 5 epochs of 2026-12-07 failed that
  (0.105 on SIG-003) and a timing that fails is not re-run on the same code: 5 epochs can only be taken after a
  change that makes the command cheaper, timed once afterwards; 4 epochs are timed once (deploy_cost.py 'agent
  repair 4 epochs at 5%').
- `--set held-out-folds`: the signal study's 15 held-out backdoored models (verify_sweep.py's set of that name), the
  same three settings with each model's fold agent, the defense's seeds 0-2, for the report only.
- `--set protocol` (written after `choose-folds` and the timing were read, before any of its runs): the protocol's 15
  held-out models (protocol_seeds.py's: five attacks, seeds 101-103, as this host builds them), the same three
  settings with the fold agent that never saw the model's attack (onp_repair_sweep.fold_agent) and the recommended
  `verdict` (its preset), the defense's seeds 0-2, for the report only: whether the agent's preset with 4 epochs has
  the best mean DER there, the README's target.
- `--set shift` (written after `protocol` was read, before any of its runs): the 12 configuration-shift models, the
  same three settings with the shipped agent (trained on every attack type; the shift set holds settings its sampler
  never drew), the model's seed and shift_seeds.SEEDS (verify_sweep.py's `shift` runs, whose `verdict` rows it is read
  beside), for the report only.

Each run of a model goes in one process, 3 epochs first: the 4- and 5-epoch runs reuse the memoised inversions and the
agent's deployment (its repair alone differs; no seconds are compared). One torch thread per worker; one JSON line per
model in repair_epochs_folds_SET.jsonl (resumable), then repair_epochs_folds_SET.md."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import deploy_cost
import torch
from onp_prunable import repaired_means
from onp_repair_knobs import CHANGE_RULE, judged, moved, rule_holds
from onp_repair_sweep import fold_agent as attack_fold_agent
from onp_vs_baselines import AGENT_COMMAND
from protocol_seeds import models as protocol_models
from rows import exit_2_on_bad_input
from shift_seeds import SEEDS as SHIFT_SEEDS
from signal_models import HERE, Rows, per_set_main, read_rows
from verify_sweep import FOLDS, SETS, cells_of, fold_agent, run_changed, seeds_of

FRACTION = 0.05
SEEDS = {"choose-folds": (22, 23), "held-out-folds": (0, 1, 2), "protocol": (0, 1, 2), "shift": (0, *SHIFT_SEEDS)}
"""Set -> the defense's seeds (shift: 0 stands for each model's own seed, verify_sweep.seeds_of)."""
VERIFY_SHIFT = HERE / "results" / "verify_sweep_shift.jsonl"
"""verify_sweep.py's runs of the shift set: the `verdict` rows the shift set's report is read beside."""
MODELS = {**{k: SETS[k] for k in ("choose-folds", "held-out-folds", "shift")}, "protocol": protocol_models}
"""Set -> its models (name, role, lab): the protocol's role is the model's attack."""
SETTINGS = {"3 epochs": {"repair_epochs": 3}, "4 epochs": {"repair_epochs": 4}, "5 epochs": {"repair_epochs": 5}}
"""Setting name -> change to the agent's preset's repair (the first: the preset until 2026-12-07, late; an empty change
would empty the preset's repair section, onp_env.presets.merged)."""
COMMAND, VERDICT = "agent's preset", "verdict's preset"
TIMINGS = {"5 epochs": "agent repair epochs at 5%", "4 epochs": "agent repair 4 epochs at 5%"}
"""Setting -> the deploy_cost.py COMPARED entry that timed it beside 3 epochs (5 epochs': 2026-12-07, before this
study; 4 epochs': after its choose-folds runs)."""


def timing_holds(setting: str) -> bool | None:
    """Whether every model of the setting's timing ran within a tenth of its ANP run (None: not timed)."""
    path = deploy_cost.results_of(TIMINGS[setting])
    if not path.is_file():
        return None
    rows = read_rows(path)
    name = f"{AGENT_COMMAND} {setting} give back verify"
    return all(x <= deploy_cost.TENTH for x in deploy_cost.compared_ratios(rows, name))


def what(timed: bool | None) -> str:
    return "not timed" if timed is None else "holds" if timed else "fails"


def results_of(which: str) -> Path:
    return HERE / "results" / f"repair_epochs_folds_{which}.jsonl"


def measure(name: str, role: str, path: str, which: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    agent = attack_fold_agent(role) if which == "protocol" else None if which == "shift" else fold_agent(name)
    seeds = seeds_of(name, role, which) if which == "shift" else SEEDS[which]
    cells = [run_changed(path, COMMAND, FRACTION, seed, change, setting, agent)
             for seed in seeds for setting, change in SETTINGS.items()]  # fmt: skip
    if which == "protocol":
        cells += [run_changed(path, VERDICT, FRACTION, seed, {}, "verdict") for seed in SEEDS[which]]
    return {"model": name, "role": role, "set": which, "host": platform.node(), "torch": torch.__version__,
            "cells": cells}  # fmt: skip


def report(rows: Rows) -> str:
    which = rows[0]["set"] if rows else "?"
    roles = tuple(sorted({r["role"] for r in rows}))
    by = {s: cells_of(rows, roles, COMMAND, FRACTION, s) for s in SETTINGS}
    base, *longer = SETTINGS
    seeds = SEEDS.get(which, ())
    agents = ", ".join(sorted({c["agent"] for r in rows for c in r["cells"] if "agent" in c}))
    who = ("the shipped agent" if which == "shift" else
           f"the fold agent that never trained on its attack ({agents}: {FOLDS.relative_to(HERE.parent)})")  # fmt: skip
    own = " (0: the model's own)" if which == "shift" else ""
    lines = [
        f"# The agent's preset's repair over {', '.join(s.split()[0] for s in SETTINGS)} epochs with "
        f"{FRACTION:.0%} defense data ({which} models)",
        "",
        f"Generated by `python benchmarks/repair_epochs_folds.py --set {which}` from "
        f"repair_epochs_folds_{which}.jsonl: {len(rows)} models, each defended by the agent's preset (`onp "
        "--preset recommended`) with `repair.repair_epochs` 3 (the preset until 2026-12-07, late), 4 (since) and 5, "
        f"with {who}, the defense's seeds {', '.join(map(str, seeds))}{own}. Mean DER / ASR left / points lost after "
        "the repair and the runs within the target (ASR <= 5%, <= 2 points lost), each setting against 3 epochs by "
        "onp_repair_knobs.CHANGE_RULE's comparison. Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}.",
    ]
    old = list(by[base].values())
    for setting in longer:
        new = list(by[setting].values())
        lines += ["", f"## {setting}", "", f"Against {base} ({len(new)} runs): "
                  f"{judged(new, old, CHANGE_RULE, len(seeds))}.", "", *moved(by[base], by[setting])]  # fmt: skip
    verdict = list(cells_of(rows, roles, VERDICT, FRACTION, "verdict").values())
    if which == "shift" and VERIFY_SHIFT.is_file():  # the recommended verdict as it ships, on the same seeds
        shift_rows = read_rows(VERIFY_SHIFT)
        found = cells_of(shift_rows, ("shift",), VERDICT, FRACTION, "with")
        verdict = [c for key, c in found.items() if key in by[base]]
        agent_rows = cells_of(shift_rows, ("shift",), COMMAND, FRACTION, "with")
        same = all(agent_rows[key]["repaired"] == c["repaired"] for key, c in by[base].items())
        lines += ["", f"This set's 3-epoch runs {'equal' if same else 'differ from'} verify_sweep_shift.jsonl's runs "
                  "of the agent's preset (with `verify_sweep`), whose `verdict` rows the table reads."]  # fmt: skip
    if verdict:
        lines += ["", "| command | mean DER | mean ASR | points lost | within |", "|---|---:|---:|---:|---:|"]
        for name, cs in (
            *((f"agent's preset, {s}", list(by[s].values())) for s in SETTINGS),
            ("`verdict`'s preset", verdict),
        ):
            der, asr, lost, within = repaired_means(cs)
            lines.append(f"| {name} | {der:.2f} | {asr:.2f} | {lost:.2f} | {within} of {len(cs)} |")
    if which == "choose-folds":
        ready = len(rows) == len(MODELS[which]())
        holding = [s for s in reversed(longer) if rule_holds(list(by[s].values()), old, CHANGE_RULE, len(seeds))]
        said = ("not yet read" if not ready else f"holds for {', '.join(holding)}" if holding
                else "holds for neither: the preset keeps 3 epochs")  # fmt: skip
        timed = {s: timing_holds(s) for s in holding}
        taken = next((s for s in holding if timed[s]), base) if ready else "not yet read"
        lines += ["", f"Rule, first part (CHANGE_RULE against {base} on these runs, seeds "
                  f"{', '.join(map(str, seeds))}): {said}. Second part, every model within a tenth of ANP's time in "
                  "the setting's one deploy_cost.py timing beside 3 epochs (TIMINGS; a failed timing is not re-run "
                  f"on the same code): {'; '.join(f'{s} {what(t)}' for s, t in timed.items()) or 'not read'}. "
                  f"Taken: {taken}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    per_set_main(__doc__, "--set", MODELS, results_of, measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
