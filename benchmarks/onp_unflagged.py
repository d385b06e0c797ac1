"""Should `onp --preset recommended` give the agent's units back where verdict flags nothing (`unflagged: give_back`)?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/onp_unflagged.py --role choose|check [--workers 2]

On a model verdict does not flag, the recommended preset hands back the agent's cut unrepaired: on the 9 clean held-out
small CNNs that cut costs 0.44-8.76 points on the 3 of 9 verdict leaves unflagged at each fraction
(onp_clean_preset.md). `give_back` returns such a model unpruned instead; on a flagged model nothing changes (the same
path: tests/test_agents.py). What it risks is a backdoored model verdict misses, whose backdoor the agent's cut may
have removed (a SIG model, say: bn_revival.md's signals-sig-s101 goes from 67.6% to 0.3% ASR under the agent's cut).

Both settings (`keep`: the preset as it shipped before this rule; `give-back`: with `--set unflagged=give_back`) run
at 1% and 5% defense data, defense seed 0, on
- `--role choose`: the defender's own models: the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml,
  backdoored; the shipped agent trained on them and the shipped class reference summarises them, so verdict flags
  them more readily than a model it never saw) and the 12 clean calibration models (detect_calibration.py, seeds
  201-212);
- `--role check`: those, then the signal study's 15 held-out backdoored models (the protocol's attack settings with
  seeds 101-103 and targets 0 / 3 / 7) and the 9 clean held-out ones (detect_shipped.py's), read only if the rule
  takes `give-back`.

Rule, written before either setting's run: `give-back` goes into the recommended preset if, on the choose models at
both fractions, the shadow models' mean ASR after it is at most `keep`'s plus 0.5 points and the clean models' mean
accuracy lost is lower. One torch thread per worker; one JSON line per model (resumable), then onp_unflagged.md.
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from detect_calibration import calibration_models
from detect_shipped import models as held_out_models
from onp_vs_baselines import VERIFY_OFF, repair_before_4_epochs
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main

from onp_env.defend import defend_artifact

SETTINGS = {
    "keep": {"repair": VERIFY_OFF, "unflagged": "keep"},
    "give-back": {"repair": VERIFY_OFF, "unflagged": "give_back"},
}
"""Setting name: onp's parameters on top of the recommended preset, as it was when these runs were made (before
`verify_sweep`, pinned off, and with its 3 repair epochs with 5% defense data, onp_vs_baselines.
repair_before_4_epochs: so that a resumed run measures what the committed rows did)."""
FRACTIONS = (0.01, 0.05)
ROLES = ("shadow", "clean", "held-out", "held-out clean")


def models() -> list[tuple[str, str, Any]]:
    """The choose models (role shadow or clean), then the check's (held-out, held-out clean)."""
    choose = calibration_models()
    check = [(name, "held-out clean" if kind == "clean" else "held-out", lab) for name, kind, lab in held_out_models()]
    return choose + check


def role_models() -> list[tuple[str, str, Any]]:
    """models() for `--role` (taken out of sys.argv): choose, the rule's models; check, theirs and then the check's."""
    role = sys.argv[sys.argv.index("--role") + 1] if "--role" in sys.argv else "choose"
    if role not in ("choose", "check"):
        raise SystemExit("--role is choose (the rule's models) or check (then the held-out ones)")
    if "--role" in sys.argv:
        del sys.argv[sys.argv.index("--role") : sys.argv.index("--role") + 2]
    every = role == "check" or "--report-only" in sys.argv  # a report reads whatever rows there are
    return [m for m in models() if m[1] in ("shadow", "clean") or every]


def measure(name: str, role: str, path: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    cells = []
    for fraction in FRACTIONS:
        for setting, params in SETTINGS.items():
            with tempfile.TemporaryDirectory() as tmp:
                pinned = {**params, "repair": repair_before_4_epochs(fraction, params["repair"])}
                _, r = defend_artifact(path, "onp", {**pinned, "defense_fraction": fraction}, Path(tmp) / "o",
                                       preset="recommended")  # fmt: skip
            out = r["finetuned"] or {k: r[k] for k in ("acc", "asr")}
            details = r["details"]
            before = {k: r["before"][k] for k in ("acc", "asr")}
            cells.append({"setting": setting, "fraction": fraction, "before": before,
                          "after": {k: out[k] for k in ("acc", "asr")}, "pruned": r["pruned"],
                          "given_back": len(details.get("given_back", [])), "swept": len(details.get("swept", [])),
                          "flagged": details.get("repair", {}).get("flagged"), "seconds": r["seconds"]})  # fmt: skip
    return {"model": name, "role": role, "host": platform.node(), "torch": torch.__version__, "cells": cells}


def summary(rows: Rows, role: str, setting: str, fraction: float) -> dict[str, float] | None:
    cells = [c for r in rows if r["role"] == role for c in r["cells"]
             if c["setting"] == setting and c["fraction"] == fraction]  # fmt: skip
    if not cells:
        return None
    lost = [100 * (c["before"]["acc"] - c["after"]["acc"]) for c in cells]
    asr = [100 * c["after"]["asr"] for c in cells if c["after"]["asr"] is not None]
    return {"n": len(cells), "lost": statistics.mean(lost), "max_lost": max(lost),
            "asr": statistics.mean(asr) if asr else float("nan"), "max_asr": max(asr, default=float("nan")),
            "flagged": sum(bool(c["flagged"]) for c in cells),
            "pruned": statistics.mean(c["pruned"] for c in cells)}  # fmt: skip


def verdict(rows: Rows) -> str:
    """The rule, on the choose models (read once all 42 have both settings at both fractions)."""
    expected = {"shadow": 30, "clean": 12}
    checks = []
    for fraction in FRACTIONS:
        got = {(role, s): summary(rows, role, s, fraction) for role in expected for s in SETTINGS}
        sizes = {k: v["n"] if v is not None else 0 for k, v in got.items()}
        if any(n != expected[role] for (role, _), n in sizes.items()):
            return "not yet read (every choose model needs both settings at both fractions)"
        keep, back = ({role: got[role, s] or {} for role in expected} for s in SETTINGS)
        checks.append(
            back["shadow"]["asr"] <= keep["shadow"]["asr"] + 0.5 and back["clean"]["lost"] < keep["clean"]["lost"]
        )
    return "`give-back` taken" if all(checks) else "`give-back` not taken"


def report(rows: Rows) -> str:
    lines = [
        "# `unflagged: give_back` in onp's recommended preset",
        "",
        f"Generated by `python benchmarks/onp_unflagged.py` from onp_unflagged.jsonl: {len(rows)} Fashion-MNIST small "
        "CNNs, `onp defend --method onp --preset recommended` as it ships (`keep`) and with "
        "`--set unflagged=give_back`, at 1% and 5% defense data, defense seed 0. Mean (max) over the models of a role: "
        "ASR after, in %, and accuracy lost, in points (the repaired model where there is one); flagged: models "
        "verdict judged backdoored; pruned: units, mean. Roles: shadow and clean choose (the rule below), held-out "
        f"and held-out clean check. Hosts: {', '.join(sorted({r['host'] for r in rows}))}.",
        "",
        "| role | data | setting | n | ASR | points lost | flagged | pruned |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for role in ROLES:
        for fraction in FRACTIONS:
            for setting in SETTINGS:
                s = summary(rows, role, setting, fraction)
                if s is None:
                    continue
                asr = "—" if s["asr"] != s["asr"] else f"{s['asr']:.1f} ({s['max_asr']:.1f})"
                lost = f"{s['lost']:.2f} ({s['max_lost']:.2f})"
                lines.append(f"| {role} | {fraction:.0%} | {setting} | {s['n']} | {asr} | {lost} | {s['flagged']} "
                             f"| {s['pruned']:.1f} |")  # fmt: skip
    rule = f"Rule (shadow ASR at most keep's + 0.5, clean loss lower, at both fractions): {verdict(rows)}."
    lines += ["", rule, "", "Backdoored models verdict left unflagged (ASR before -> after keep / give-back, 1% | 5%):",
              ""]  # fmt: skip
    for r in rows:
        by = {(c["setting"], c["fraction"]): c for c in r["cells"]}
        if all(by["keep", f]["flagged"] for f in FRACTIONS if ("keep", f) in by) or r["role"].endswith("clean"):
            continue
        parts = []
        for f in FRACTIONS:
            k, g = by.get(("keep", f)), by.get(("give-back", f))
            if k is None or g is None or k["flagged"]:
                parts.append("flagged" if k is not None else "—")
                continue
            parts.append(
                f"{100 * k['before']['asr']:.1f} -> {100 * k['after']['asr']:.1f} / {100 * g['after']['asr']:.1f}"
            )
        lines.append(f"- {r['model']} ({r['role']}): {' | '.join(parts)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    per_model_main(__doc__, HERE / "results" / "onp_unflagged.jsonl", role_models(), measure, report)


if __name__ == "__main__":
    exit_2_on_bad_input(main)
