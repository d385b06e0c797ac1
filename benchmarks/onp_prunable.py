"""Where the shipped agent may prune (`prunable` all or last), chosen on shadow models before any held-out run.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/onp_prunable.py [--workers 2] [--report-only]

shift_onp_repair_units.md found that the shipped agent spends about half its units on convolution channels,
which cost accuracy and which `verdict` never cuts, while most of its fully connected units are among
verdict's. `onp defend --method onp --set prunable=last` opens only the last unit layer to the policy (the
observation is unchanged: the action mask narrows). Whether that helps is measured here on the defender's
own models: the first three sampled shadow models of each attack (configs/agent/fashion-mnist-sampled.yaml;
the shipped agent trained on them, so they flatter it either way), at 1% and 5% defense data, each run
with the recommended command's repair (`repair_with: verdict`, onp_vs_baselines._DISTILL), whose report
also measures the pruned model before the repair. One torch thread per worker. One JSON line per model in
onp_prunable.jsonl (resumable), then onp_prunable.md: the choice for the held-out runs is the setting with
the better mean DER after the repair, among those within the target (mean ASR <= 5%, <= 2 points lost).
The results files were made with the agent shipped until 2026-12-05 (with MNP's signal); a run now measures the one
that ships since (configs/agent/fashion-mnist-sampled-no-mnp.yaml)."""

from __future__ import annotations

import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from onp_vs_baselines import SETTINGS
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main, sampled_and_held_out
from verdict_repair import TARGET

from onp_env import load_artifact
from onp_env.defend import defend_artifact
from onp_env.graph.units import find_units

RESULTS = HERE / "results" / "onp_prunable.jsonl"
FRACTIONS = (0.01, 0.05)
PRUNABLE = ("all", "last")
PER_ATTACK = 3


def models() -> list[tuple[str, str, Any]]:
    """The first PER_ATTACK shadow models of each attack, in the zoo's order."""
    seen: dict[str, int] = {}
    out = []
    for name, role, lab in sampled_and_held_out():
        if role == "shadow" and lab.attack is not None and seen.get(lab.attack.name, 0) < PER_ATTACK:
            seen[lab.attack.name] = seen.get(lab.attack.name, 0) + 1
            out.append((name, role, lab))
    return out


def repaired_cell(path: str, fraction: float, **params: Any) -> dict[str, Any]:
    """One `onp defend` run of the shipped agent with verdict's repair (`params` on top: another agent, prunable):
    what the agent's pruned model and the repaired one left, and the agent's units."""
    method, setting = SETTINGS["shipped agent verdict repair"]
    with tempfile.TemporaryDirectory() as tmp:
        _, r = defend_artifact(path, method, {**setting, **params, "defense_fraction": fraction}, Path(tmp) / "out")
    return {"fraction": fraction, **repaired_outcome(r), "sequence": r["details"]["sequence"],
            "swept": r["details"].get("swept", []), "spared": r["details"].get("spared", []),
            **verdicts_of(r["details"].get("repair", {}))}  # fmt: skip


def repaired_outcome(r: dict[str, Any]) -> dict[str, Any]:
    """What a defense that repairs its pruned model left, from its `onp defend` report `r`: the model before, the
    seconds, the units cut, the pruned model (`agent`, before the repair) and the repaired one."""
    return {"before": r["before"], "seconds": r["seconds"], "pruned": r["pruned"],
            "agent": {k: r[k] for k in ("acc", "asr", "der")},
            "repaired": {k: r["finetuned"][k] for k in ("acc", "asr", "der")}}  # fmt: skip


def verdicts_of(repair: dict[str, Any]) -> dict[str, Any]:
    """What `verdict`'s judgement of the unpruned model named, where it repaired (its class verdicts' suspects and
    scores, the one followed and its suspect, and with `class_spread` whether that moved it): {} for another repair."""
    if "follows" not in repair:
        return {}
    names = [n for n in ("inversion", "latent_gap", "blend") if n in repair]
    found = {n: {k: repair[n][k] for k in ("suspect", "score")} for n in names}
    moved = {"class_spread_moved": repair["class_spread"]["moved"]} if "class_spread" in repair else {}
    return {"verdict": {"follows": repair["follows"], "suspect": repair["suspect"], **found, **moved}}


def measure(name: str, role: str, path: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    art = load_artifact(path)
    last = find_units(art.model, art.defense_set()[0][:2])[0].layers[-1].name
    cells = []
    for fraction in FRACTIONS:
        for prunable in PRUNABLE:
            c = repaired_cell(path, fraction, prunable=prunable)
            cells.append(
                {**c, "prunable": prunable, "earlier": sum(not u.startswith(f"{last}[") for u in c["sequence"])}
            )
    return {"model": name, "role": role, "host": platform.node(), "torch": torch.__version__, "cells": cells}


def _mean(values: list[float], scale: float = 100) -> str:
    return f"{statistics.mean(values) * scale:.1f}"


def outcome(cs: list[dict[str, Any]]) -> str:
    """The table columns agent DER | ASR | lost | repaired DER | ASR | lost | within (of TARGET), over cells `cs`."""
    lost = {k: [c["before"]["acc"] - c[k]["acc"] for c in cs] for k in ("agent", "repaired")}
    within = sum(
        c["repaired"]["asr"] <= TARGET[0] and x <= TARGET[1] for c, x in zip(cs, lost["repaired"], strict=True)
    )
    means = [
        _mean(v) for k in ("agent", "repaired") for v in ([c[k]["der"] for c in cs], [c[k]["asr"] for c in cs], lost[k])
    ]
    return " | ".join([*means, f"{within} of {len(cs)}"])


def repaired_means(cs: list[dict[str, Any]]) -> tuple[float, float, float, int]:
    """Mean DER, ASR and accuracy lost after the repair over cells `cs` (%/points), and how many are within TARGET."""
    lost = [c["before"]["acc"] - c["repaired"]["acc"] for c in cs]
    within = sum(c["repaired"]["asr"] <= TARGET[0] and x <= TARGET[1] for c, x in zip(cs, lost, strict=True))
    der, asr = (statistics.mean(c["repaired"][k] for c in cs) * 100 for k in ("der", "asr"))
    return der, asr, statistics.mean(lost) * 100, within


def best(settings: tuple[Any, ...], cells: Callable[[Any], list[dict[str, Any]]]) -> Any:
    """The setting with the best mean DER after the repair among those whose mean ASR and accuracy lost meet the
    target (else among all), DER compared to 0.1 points; a tie keeps the first of `settings`."""

    def rank(setting: Any) -> tuple[bool, float]:
        cs = cells(setting)
        lost = statistics.mean(c["before"]["acc"] - c["repaired"]["acc"] for c in cs)
        asr = statistics.mean(c["repaired"]["asr"] for c in cs)
        return asr <= TARGET[0] and lost <= TARGET[1], round(statistics.mean(c["repaired"]["der"] for c in cs), 3)

    return max(settings, key=rank)  # max keeps the first of equals


def choice(rows: Rows) -> str:
    """The rule of the docstring, per fraction (`best`); a tie keeps `all`, the agent's training env."""
    picks = {
        fraction: best(PRUNABLE, lambda p, f=fraction: [c for r in rows for c in r["cells"]
                                                         if c["fraction"] == f and c["prunable"] == p])
        for fraction in FRACTIONS
    }  # fmt: skip
    said = ", ".join(f"{p} with {f:.0%}" for f, p in picks.items())
    return f"Choice for the held-out runs: {said}" + (
        " (the agent's own setting: no held-out run of `last` follows)." if set(picks.values()) == {"all"} else "."
    )


def report(rows: Rows) -> str:
    lines = [
        "# Where the shipped agent may prune, on shadow models",
        "",
        f"Generated by `python benchmarks/onp_prunable.py` from onp_prunable.jsonl: {len(rows)} sampled shadow "
        "models (the first three of each attack; the shipped agent trained on them), the shipped agent with "
        "`prunable` all (its training env) or last (only the last unit layer), then verdict's repair "
        "(`repair_with: verdict`, the recommended command's parameters). DER, ASR and accuracy lost in %/points; "
        "within: models with ASR <= 5% and <= 2 points lost. No seconds: `last` runs after `all` in the same "
        "process and reuses its trigger inversions (memoised), so they would flatter it. Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}; torch {', '.join(sorted({r['torch'] for r in rows}))}.",
        "",
        "| defense data | prunable | units | in earlier layers | agent DER | agent ASR | agent lost | repaired DER | "
        "repaired ASR | repaired lost | within |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fraction in FRACTIONS:
        for prunable in PRUNABLE:
            cs = [c for r in rows for c in r["cells"] if c["fraction"] == fraction and c["prunable"] == prunable]
            if not cs:
                continue
            earlier = statistics.mean(c["earlier"] for c in cs)
            lines.append(f"| {fraction:.0%} | {prunable} | {statistics.mean(c['pruned'] for c in cs):.1f} | "
                         f"{earlier:.1f} | {outcome(cs)} |")  # fmt: skip
    lines += ["", choice(rows)]
    lines += ["", "## Per model", "", "| model | defense data | prunable | units | agent ASR | repaired ASR | "
              "repaired lost |", "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        for c in r["cells"]:
            lines.append(f"| {r['model']} | {c['fraction']:.0%} | {c['prunable']} | {c['pruned']} | "
                         f"{c['agent']['asr'] * 100:.1f} | {c['repaired']['asr'] * 100:.1f} | "
                         f"{(c['before']['acc'] - c['repaired']['acc']) * 100:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    per_model_main(__doc__, RESULTS, models(), measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
