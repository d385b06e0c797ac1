"""Should the recommended commands take verdict's `verify_sweep` (the followed class's mask inverted again on the
pruned model; where still flagged, the repair unlearns it)?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/verify_sweep.py --set SET [--workers 2]

The configuration-shift set's one miss of the target with 5% defense data is the centred 3-pixel TrojanNN s202 with
the defense's seeds 1 and 2 (53.8% and 56.5% ASR after the agent's command: shift_presets.md). There the sweep follows
a class-6 trigger (a blend with seed 1, a mask of 16.6 pixels with seed 2) to `max_ratio`; after the cut that
trigger sends 6-20% of the other classes' images to class 6 while the real one still sends 97%, and class 6's mask
inverted alone on the pruned model measures 13.1-13.4 pixels, flagged (scores 5.1-7.5; unpruned 16.6-21.0). With the
repair unlearning that trigger, the two runs end at 3.0% and 2.4% ASR, 1.99 and 2.04 points lost (a probe of those two
runs, which suggested the change: the change's one setting, a single inversion from the defense's seed judged at the
flag line, was not tuned on them). Whether the commands take it is decided on the defender's own models:

- `--set choose`: the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml; the shipped agent trained on
  them, so its units there are in-sample) and the 12 clean calibration models (detect_calibration.py, seeds 201-212),
  the defense's seeds 18 and 19 (run by no study before), at 1% and 5%. Rule, written before the run: a command's
  preset (`onp --preset recommended`, `verdict --preset recommended`) takes `verify_sweep` where, at both fractions
  over both seeds, on the shadow models onp_repair_knobs.CHANGE_RULE holds (mean DER not below, mean ASR and points
  lost at most 0.1 above, runs within the target not fewer) and on the clean models the mean points lost are at most
  0.1 above; else not. The agent's preset's repair is verdict's recommended one, so either may take it alone.
- `--set choose-folds` (written 2026-12-07 after `choose` was read, where the agent's preset failed by 0.0035 DER
  with 1% on one run of 60): the shipped agent trained on the shadow models, so `choose` measured the agent's command
  with in-sample units, not as it deploys. Here each of the 30 shadow models is defended by the agent's preset with
  the leave-one-attack-out agent that never trained on its attack (configs/agent/fashion-mnist-sampled-no-mnp.yaml,
  the shipped agent's config, with zoo.exclude=[that attack]; trained where missing into
  benchmarks/runs/onp-no-mnp/without-A/onp, where onp_vs_baselines.py trains and reads it); the class reference
  stays the shipped one, which holds these models (both settings alike). Defense seeds 20 and 21 (run by no study
  before), 1% and 5%. Rule, written before the run: the agent's preset takes `verify_sweep` where CHANGE_RULE holds
  on these 30 models at both fractions over both seeds, read on this set alone (not pooled with `choose`'s seeds
  18-19); the clean part of the rule is `choose`'s (the shipped agent never trained on the clean models: 0 of 48
  runs flagged, points lost unchanged at both fractions). A second try after a failed check: the note and the
  README say so whichever way it falls.
- `--set shift`: the 12 configuration-shift models with the model's seed and shift_seeds.SEEDS (shift_presets.md's
  runs), for the report only;
- `--set held-out`: the signal study's 15 held-out backdoored models and 9 clean ones (detect_shipped.py's: the
  protocol's attack settings with seeds 101-103 and targets 0 / 3 / 7; those of seed 101 are the protocol's own
  held-out models, the others differ from them in their target), verdict's
  preset alone with the defense's seeds 0-2 (protocol_seeds.py's), for the report only (written after `choose` was
  read: the agent's preset does not take the change, verdict's does);
- `--set held-out-folds`: the same 15 backdoored models, the agent's preset with each model's fold agent (never
  trained on its attack: the protocol's deployment, as onp_no_mnp_spread.md runs it) and the defense's seeds 0-2, for
  the report only (written before `choose-folds` was read).

Each run goes with the change first; where `verify` does not flag (nothing changes after the sweep: its one inversion
draws from its own generator) the run without it is that run, copied (`copied`); where it flags, the run without is
made in the same process (reusing the memoised inversions: no seconds compared). One torch thread per worker; one JSON
line per model in verify_sweep_SET.jsonl (resumable), then verify_sweep_SET.md."""

from __future__ import annotations

import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from detect_calibration import calibration_models
from detect_shipped import models as held_out_models
from filelock import FileLock
from onp_repair_knobs import CHANGE_RULE, judged, moved, rule_holds
from onp_vs_baselines import repair_before_4_epochs, train_variant
from rows import exit_2_on_bad_input
from shift_seeds import SEEDS as SHIFT_SEEDS
from shift_seeds import models as shift_models
from signal_models import HERE, Rows, per_set_main

from onp_env.defend import defend_artifact

FRACTIONS = (0.01, 0.05)
CHOOSE_SEEDS = (18, 19)
FOLD_SEEDS = (20, 21)
FOLD_CONFIG = HERE.parent / "configs" / "agent" / "fashion-mnist-sampled-no-mnp.yaml"
FOLDS = HERE / "runs" / "onp-no-mnp"
"""onp_vs_baselines.py --agent-config FOLD_CONFIG --runs FOLDS: its fold agents, in without-A/onp/agent."""
COMMANDS = {"agent's preset": "onp", "verdict's preset": "verdict"}
"""Command name: the registered defense run with `--preset recommended`."""
SETS = {
    "choose": calibration_models,
    "choose-folds": lambda: [m for m in calibration_models() if m[1] == "shadow"],
    "shift": shift_models,
    "held-out": lambda: [(n, "held-out clean" if a == "clean" else "held-out", lab) for n, a, lab in held_out_models()],
    "held-out-folds": lambda: [(n, "held-out", lab) for n, a, lab in held_out_models() if a != "clean"],
}
CLEAN_ROLES = ("clean", "held-out clean")


def results_of(which: str) -> Path:
    return HERE / "results" / f"verify_sweep_{which}.jsonl"


def seeds_of(name: str, role: str, which: str) -> tuple[int, ...]:
    if which == "choose-folds":
        return FOLD_SEEDS
    if which == "held-out-folds":
        return (0, *SHIFT_SEEDS)
    if role in ("shadow", "clean"):
        return CHOOSE_SEEDS
    return (int(name.rsplit("-s", 1)[1]), *SHIFT_SEEDS) if role == "shift" else (0, *SHIFT_SEEDS)


def commands_of(role: str, which: str) -> tuple[str, ...]:
    if which in ("choose-folds", "held-out-folds"):
        return ("agent's preset",)
    return ("verdict's preset",) if role.startswith("held-out") else tuple(COMMANDS)


def fold_agent(name: str) -> Path:
    """The leave-one-attack-out agent that never trained on model `name`'s attack (a sampled shadow model's or a
    held-out one's), trained first where it is missing (one worker at a time per fold; resumed from its checkpoints
    where a run was cut short)."""
    lab = next(lab for n, _, lab in calibration_models() + held_out_models() if n == name)
    attack = lab.attack.name
    out = FOLDS / f"without-{attack}" / "onp"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / ".train.lock"):
        train_variant(str(FOLD_CONFIG), [f"zoo.exclude=[{attack}]"], out)
    return out / "agent"


def run(path: str, command: str, fraction: float, seed: int, verify: bool, agent: Path | None = None) -> dict:
    """One run of `command`'s preset, with or without `verify_sweep` (the agent's with `agent`, else the shipped
    one): the cell's fields."""
    change: dict[str, Any] = {"verify_sweep": verify}
    if COMMANDS[command] == "onp":  # its rows ran the agent's preset's 3 repair epochs with 5%
        change = repair_before_4_epochs(fraction, change)
    return run_changed(path, command, fraction, seed, change, "with" if verify else "without", agent)


def run_changed(path: str, command: str, fraction: float, seed: int, change: dict[str, Any], setting: str,
                agent: Path | None = None) -> dict:  # fmt: skip
    """One run of `command`'s preset with `change` to its verdict parameters (the agent's preset: to its repair's),
    the agent's with `agent`, else the shipped one: the cell's fields, `setting` naming the change."""
    defense = COMMANDS[command]
    params: dict[str, Any] = {"repair": change} if defense == "onp" else dict(change)
    if agent is not None:
        params["agent"] = str(agent)
    with tempfile.TemporaryDirectory() as tmp:
        _, r = defend_artifact(path, defense, {**params, "defense_fraction": fraction, "seed": seed},
                               Path(tmp) / "out", preset="recommended")  # fmt: skip
    d = r["details"]
    v = d if defense == "verdict" else d.get("repair", {})
    after = r["finetuned"] or {k: r[k] for k in ("acc", "asr")}
    return {"command": command, "setting": setting, "fraction": fraction, "seed": seed,
            "before": r["before"], "repaired": after, "pruned": r["pruned"], "flagged": v.get("flagged"),
            "verdict": {"follows": v.get("follows"), "suspect": v.get("suspect")}, "stopped": v.get("stopped"),
            "verified": v.get("verified"), "seconds": r["seconds"],
            **({"agent": agent.parent.parent.name} if agent is not None else {})}  # fmt: skip


def measure(name: str, role: str, path: str, which: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    cells = []
    agent = fold_agent(name) if which.endswith("-folds") else None
    for command in commands_of(role, which):
        for fraction in FRACTIONS:
            for seed in seeds_of(name, role, which):
                with_it = run(path, command, fraction, seed, True, agent)
                fired = bool((with_it["verified"] or {}).get("flagged"))
                without = run(path, command, fraction, seed, False, agent) if fired else {
                    **with_it, "setting": "without", "verified": None, "copied": True}  # fmt: skip
                cells += [without, with_it]
    return {"model": name, "role": role, "set": which, "host": platform.node(), "torch": torch.__version__,
            "cells": cells}  # fmt: skip


def cells_of(rows: Rows, roles: tuple[str, ...], command: str, fraction: float, setting: str) -> dict:
    return {(r["model"], c["seed"]): c for r in rows if r["role"] in roles for c in r["cells"]
            if c["command"] == command and c["fraction"] == fraction and c["setting"] == setting}  # fmt: skip


def lost(cells: list[dict[str, Any]]) -> float:
    return statistics.mean(100 * (c["before"]["acc"] - c["repaired"]["acc"]) for c in cells)


def decision(rows: Rows, command: str, which: str = "choose") -> str:
    """The rule of `--set choose` or `choose-folds` for one command (read once every model is in; choose-folds has
    no clean models: its clean part is choose's)."""
    needed = len(SETS[which]())
    if len(rows) < needed:
        return f"not yet read ({needed} models needed)"
    seeds = FOLD_SEEDS if which == "choose-folds" else CHOOSE_SEEDS
    holds = []
    for fraction in FRACTIONS:
        old, new = (list(cells_of(rows, ("shadow",), command, fraction, s).values()) for s in ("without", "with"))
        clean = [list(cells_of(rows, ("clean",), command, fraction, s).values()) for s in ("without", "with")]
        keeps_clean = not clean[0] or lost(clean[1]) <= lost(clean[0]) + 0.1
        holds.append(rule_holds(new, old, CHANGE_RULE, len(seeds)) and keeps_clean)
    return "takes `verify_sweep`" if all(holds) else "does not take `verify_sweep`"


def report(rows: Rows) -> str:
    which = rows[0]["set"] if rows else "?"
    lines = [
        f"# verdict's `verify_sweep` in the recommended commands ({which} models)",
        "",
        f"Generated by `python benchmarks/verify_sweep.py --set {which}` from verify_sweep_{which}.jsonl: {len(rows)} "
        "models, each command by its recommended preset without and with `verify_sweep` (a run where verify did not "
        "flag is one run, copied). Backdoored models: mean DER / ASR left / points lost after the repair and the runs "
        "within the target (ASR <= 5%, <= 2 points lost), by onp_repair_knobs.CHANGE_RULE's comparison; clean models: "
        f"mean points lost. Hosts: {', '.join(sorted({r['host'] for r in rows}))}.",
    ]
    roles = sorted({r["role"] for r in rows})
    backdoored = tuple(r for r in roles if r not in CLEAN_ROLES)
    clean = tuple(r for r in roles if r in CLEAN_ROLES)
    for command in COMMANDS:
        for fraction in FRACTIONS:
            by = {s: cells_of(rows, backdoored, command, fraction, s) for s in ("without", "with")}
            if not by["with"]:
                continue
            seeds = len({seed for _, seed in by["with"]})
            fired = [c for c in by["with"].values() if (c["verified"] or {}).get("flagged")]
            lines += ["", f"## {command}, {fraction:.0%} defense data", "",
                      f"Backdoored ({', '.join(backdoored)}; {len(by['with'])} runs): "
                      f"{judged(list(by['with'].values()), list(by['without'].values()), CHANGE_RULE, seeds)}. "
                      f"Verify flagged on {len(fired)} runs."]  # fmt: skip
            if clean:
                cs = {s: list(cells_of(rows, clean, command, fraction, s).values()) for s in ("without", "with")}
                n_fired = sum(bool((c["verified"] or {}).get("flagged")) for c in cs["with"])
                lines.append(f"Clean ({', '.join(clean)}; {len(cs['with'])} runs): {lost(cs['with']):.2f} points "
                             f"lost against {lost(cs['without']):.2f}; verify flagged on {n_fired}.")  # fmt: skip
            lines += ["", *moved(by["without"], by["with"])]
    if which == "choose":
        agent, verdict = (decision(rows, command) for command in COMMANDS)
        lines += ["", "Rule (CHANGE_RULE on the shadow models and clean loss at most 0.1 above, both fractions, seeds "
                  f"{', '.join(map(str, CHOOSE_SEEDS))}): the agent's preset {agent}; verdict's preset "
                  f"{verdict}."]  # fmt: skip
    if which.endswith("-folds"):
        agents = ", ".join(sorted({c["agent"] for r in rows for c in r["cells"]}))
        lines += ["", f"Each model defended with the fold agent that never trained on its attack ({agents}: "
                  f"{FOLDS.relative_to(HERE.parent)})."]  # fmt: skip
    if which == "choose-folds":
        seeds, ruled = ", ".join(map(str, FOLD_SEEDS)), decision(rows, "agent's preset", which)
        lines.append(f"Rule (CHANGE_RULE on these models, both fractions, seeds {seeds}; the clean part is "
                     f"`choose`'s): the agent's preset {ruled}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    per_set_main(__doc__, "--set", SETS, results_of, measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
