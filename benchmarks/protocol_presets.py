"""The leave-one-attack-out protocol's held-out models defended by both recommended commands as they ship.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/protocol_presets.py [--workers 2] [--report-only]

Written 2026-12-07, when the README's target table read the protocol's means from runs of earlier settings: with 1%
defense data the agent's command had been run there only before its preset took `unflagged: give_back` and
`verify_sweep` (onp_no_mnp_spread.md, protocol_seeds.md), and with 5% its 4 repair epochs only by
repair_epochs_folds.py's `protocol` set, whose runs name each setting by its change to the preset of that day. Here
each of the protocol's 15 held-out models (protocol_seeds.models: five attacks, seeds 101-103, as this host builds
them) is defended by `onp --preset recommended` with the fold agent that never saw the model's attack
(onp_repair_sweep.fold_agent) and by `verdict --preset recommended`, nothing changed, with the defense's seeds 0, 1
and 2 (protocol_seeds.py's) at 1% and 5%. Nothing is chosen here. Each row records both presets as the code held them
when it ran; the report names any row whose preset parameters differ from the code's now (a change of a default or
of the code itself is not seen so). One torch thread per worker; the runs of one model share one process and its
memoised inversions, so their seconds are not compared. One JSON line per model in protocol_presets.jsonl
(resumable), then protocol_presets.md."""

from __future__ import annotations

import json
import platform
from typing import Any

import torch
from onp_repair_sweep import fold_agent
from protocol_seeds import models
from rows import exit_2_on_bad_input
from shift_seeds import FRACTIONS, defended_cells, finetuned_means, seeds_report
from signal_models import HERE, Rows, per_model_main, read_rows

from onp_env.presets import preset_of
from onp_env.registry import defense_class

RESULTS = HERE / "results" / "protocol_presets.jsonl"
COMMANDS = {"agent's preset": "onp", "verdict's preset": "verdict"}
"""Method name in the rows: the registered defense run with `--preset recommended`."""
FOLDS_PROTOCOL = HERE / "results" / "repair_epochs_folds_protocol.jsonl"
SAME_AS = {"agent's preset": "4 epochs", "verdict's preset": "verdict"}
"""Command -> the setting of FOLDS_PROTOCOL that is its preset with 5% (the agent's since 2026-12-07, late: a preset
that changes makes the comparison count fewer runs the same, which the report says)."""
METHODS = {method: {f: (defense, {}, "recommended") for f in FRACTIONS} for method, defense in COMMANDS.items()}


def presets_now() -> dict[str, dict[str, Any]]:
    """Each command's recommended preset as the code holds it: its parameters, the few-images ones and their line."""
    out = {}
    for method, defense in COMMANDS.items():
        p = preset_of(defense_class(defense), "recommended")
        out[method] = {"params": p.params, "few": p.few, "few_below": p.few_below}
    return json.loads(json.dumps(out))  # as a row reads it back


def measure(name: str, attack: str, path: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    agent = {"agent": str(fold_agent(attack))}
    cells = defended_cells(path, {"agent's preset": METHODS["agent's preset"]}, 0, agent)
    cells += defended_cells(path, {"verdict's preset": METHODS["verdict's preset"]}, 0)
    return {"model": name, "role": attack, "host": platform.node(), "torch": torch.__version__,
            "presets": presets_now(), "cells": cells}  # fmt: skip


def _best(rows: Rows) -> list[str]:
    """Per fraction, which command has the higher mean DER over every run, and by how much."""
    lines = []
    for fraction in FRACTIONS:
        cells = [c for r in rows for c in r["cells"] if c["fraction"] == fraction]
        der = {m: finetuned_means([c for c in cells if c["method"] == m])[0] for m in COMMANDS}
        first, second = sorted(der, key=der.get, reverse=True)  # type: ignore[arg-type]
        lines.append(f"- {fraction:.0%}: {first} {der[first]:.2f} against {second}'s {der[second]:.2f} mean DER "
                     f"({der[first] - der[second]:+.2f}).")  # fmt: skip
    return lines


def _as_before(rows: Rows) -> str:
    """Whether the 5% runs repeat repair_epochs_folds.py's `protocol` runs of the same settings (its `4 epochs` and
    `verdict`, run on this host's build with the same fold agents and seeds) to the last digit."""
    if not FOLDS_PROTOCOL.is_file():
        return f"{FOLDS_PROTOCOL.name} is not here: the 5% runs were not compared with it."
    before = {}
    for r in read_rows(FOLDS_PROTOCOL):
        before |= {(r["model"], c["setting"], c["seed"], c["fraction"]): c["repaired"] for c in r["cells"]}
    pairs = [(c["finetuned"], before.get((r["model"], SAME_AS[c["method"]], c["seed"], c["fraction"])))
             for r in rows for c in r["cells"] if c["fraction"] == 0.05]  # fmt: skip
    met = [a for a, b in pairs if b is not None]
    same = sum(all(a[k] == b[k] for k in ("acc", "asr", "der")) for a, b in pairs if b is not None)
    return (f"Of the {len(pairs)} runs with 5%, {len(met)} were run by {FOLDS_PROTOCOL.name} too (its `4 epochs` and "
            f"`verdict`): {same} of them end with the same accuracy, ASR and DER to the last digit.")  # fmt: skip


def _per_attack(rows: Rows) -> list[str]:
    lines = ["", "Per held-out attack, over its three models and three seeds: mean DER / ASR left / points lost "
             "(runs within the target):", "",
             "| attack | " + " | ".join(f"{m} {f:.0%}" for m in COMMANDS for f in FRACTIONS) + " |",
             "|---|" + "---:|" * (len(FRACTIONS) * len(COMMANDS))]  # fmt: skip
    for attack in dict.fromkeys(r["role"] for r in rows):
        parts = []
        for method in COMMANDS:
            for fraction in FRACTIONS:
                cells = [c for r in rows if r["role"] == attack for c in r["cells"]
                         if c["method"] == method and c["fraction"] == fraction]  # fmt: skip
                der, asr, lost, within = finetuned_means(cells)
                parts.append(f"{der:.1f} / {asr:.1f} / {lost:.2f} ({within} of {len(cells)})")
        lines.append(f"| {attack} | " + " | ".join(parts) + " |")
    return lines


def report(rows: Rows) -> str:
    now = presets_now()
    other = [r["model"] for r in rows if r["presets"] != now]
    head = [
        "# The leave-one-attack-out protocol by both recommended commands as they ship",
        "",
        f"Generated by `python benchmarks/protocol_presets.py` from protocol_presets.jsonl: {len(rows)} held-out "
        "models (onp_vs_baselines.held_out_labs: five attacks, seeds 101-103), each defended by `onp --preset "
        "recommended` with the fold agent that never saw the model's attack and by `verdict --preset recommended`, "
        "with the defense's seeds 0, 1 and 2. Mean DER / ASR left / points lost after the repair, and the runs "
        "within the target (ASR <= 5%, <= 2 points lost). Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}.",
        "",
        "Every row ran the preset parameters the code holds now."
        if not other
        else f"**{len(other)} rows ran other preset parameters than the code's now** ({', '.join(other)}): re-run "
        "them into a fresh results file before reading this.",
        "",
        "Best mean DER:",
        *_best(rows),
        "",
        _as_before(rows),
    ]
    return seeds_report(rows, METHODS, head, "0") + "\n".join(_per_attack(rows)) + "\n"


if __name__ == "__main__":
    exit_2_on_bad_input(lambda: per_model_main(__doc__, RESULTS, models(), measure, report))
