"""Settings of the repair that follows the agent's pipeline, chosen on shadow models, one study at a time.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/onp_repair_knobs.py --run STUDY-FRACTION [--workers 2]

With 1% defense data the agent's pipeline (`repair_sweep`, the sweep's limit from the agent's model, then verdict's
repair) loses about 2 points of clean accuracy on the 30 shadow models (onp_repair_sweep_agent_limit.md: 2.05) and
2.27 on the configuration-shift set, against 0.9 and 1.1 with 5%: the units cut are about as many at both fractions,
and the repair recovers less from 600 images (50 SGD steps over 5 epochs) than from 3000. The studies (STUDIES):

- `augment`: `repair_augment` shifts each repair batch by up to 2 pixels (`crop`) and flips half of it (`crop-flip`),
  so the 5 epochs do not show the pruned model the same 600 images over again (and crop over 10 epochs);
- `lr`: the repair's learning rate (`repair_lr`, 0.01 since verdict_repair.md, never varied on the small CNNs): a
  lower one moves the pruned model less from what it knew on a few hundred images;
- `lr-high`: measured after `lr` (lower rates gave less of the pruned units' accuracy back), higher ones;
- `epochs`: fewer repair epochs at the rate `lr-high` chose (0.02): with 5% defense data the repair's 5 epochs over
  3000 images are what keeps the pipeline's deployment above a tenth of ANP's time (AMONG);
- `epochs-high`: measured after `epochs` with 1% defense data (fewer epochs lost more accuracy there, not less), more:
  50 SGD steps over 600 images may give the pruned units' accuracy back only in part;
- `blend-verdict`: with 5% defense data, the 3-epoch pipeline without `blend_verdict` (its ten-class blend inversion is
  5.5 s of ~19 s), weighed by CHEAPER. Measured: DER 92.0 against 92.6 (SIG 70.2 against 73.4, 4 of 6 within
  against 6): the blend verdict stays.
- `layout`: the agent's command of each fraction (lr 0.02; 8 epochs with 1%, 3 with 5%) with its inversions optimised
  in the default memory layout and in channels-last (trigger_inversion.CPU_LAYOUT), every memo emptied before each
  (LAYOUTS): channels-last steps are about 30% faster, and their sums' other order moves the triggers' sizes in
  their last bits, the blend's by a few percent after 150 steps. Its rule, LAYOUT_RULE, was written before the run.
  Measured with 5% defense data: 92.3 / 1.9 / 1.06, 27 of 30 within, against 92.6 / 1.5 / 1.03, 29 (16.9 against
  20.0 s): the rule fails by one count. Two models moved across the target's line (SIG-028 1.0% -> 14.0% ASR, one
  unit fewer cut; TrojanNN-024 1.5 -> 2.7 points lost), the other 28 left the same units and the same ASR to 0.1.
- `layout-seeds`: written after `layout` at 5% failed and before `layout` at 1% was read: a change of the last bits
  moves 2 of 30 models across the line, so one path each cannot tell a count of one. The same two layouts with the
  defense's seeds 1 and 2 (its inversions, the agent's and the repair's draws; with 1% also the defense images),
  judged with `layout`'s seed 0 by LAYOUT_RULE on the means over the three seeds (the count within summed, 1 a seed).
  Measured: with 5% 92.0 / 2.5 / 1.12, 76 of 90 within, against 92.1 / 2.5 / 1.09, 79; with 1% (where `layout` alone
  held: 20 against 21) 91.7 / 2.5 / 1.62, 65 against 91.9 / 2.3 / 1.62, 67: the rule holds at both, and
  trigger_inversion.CPU_LAYOUT is channels-last since (0.78-0.80 of the seconds). The seeds also say what one path
  is worth: the default layout's 29 of 30 within with 5% is seed 0's; seeds 1 and 2 leave 26 and 24 (3.2% and 2.7%
  mean ASR against 1.5%), and a model can fail under one layout on every seed (TrojanNN-024 with channels-last,
  2.4-2.7 points lost: the agent, whose signals are computed with a fixed seed, cuts two convolution channels more).
  Both studies ran with `nn.Module.to(memory_format=)`; the typed helper that replaced it afterwards used
  `contiguous(memory_format=)`, which left the first convolution's weight (one input channel: contiguous in both
  layouts) in the default, found in session 61 (the recommended `verdict` alone was no faster then).
- `layout-whole`: channels-last with every 4-d weight copied into it (the first convolution's too), the defense's
  seeds 0, 1 and 2, against the default layout's cells of `layout` and `layout-seeds` (the same seeds: the default
  layout's numbers did not move) by LAYOUT_RULE on the means over the three seeds (COMPARED). Written before the run;
  if it fails, trigger_inversion.CPU_LAYOUT goes back to the default layout. Measured: all 180 cells (30 models, 3
  seeds, 2 fractions) equal `layout`'s and `layout-seeds`' channels-last cells in every field but the seconds (those
  ran with Module.to, which copies every weight too: a check that the copy reproduces them), so the rule holds as it
  did: 92.0 / 2.5 / 1.12 (76 of 90) against 92.1 / 2.5 / 1.09 (79) with 5%, 91.7 / 2.5 / 1.62 (65) against 91.9 /
  2.3 / 1.62 (67) with 1%. Mean seconds a seed: 15.1-19.5 with 5%, 11.2-15.5 with 1% (seed 0 is the fastest in every
  run: the agent's signals are inverted with seed 0 and verdict reuses them only when its seed is the same).
- `spread`: the agent's command with verdict's `class_spread` (which class to follow chosen on each verdict's scores
  standardised per class by the shipped reference's spreads), the defense's seeds 0, 1 and 2, against
  `layout-whole`'s cells (AGAINST) by CHANGE_RULE, written before the run. Chosen on the verdicts recorded on the
  shadow models (verdict_choice_rules.py; `flagged_pair`, tried first, failed its check on seed 5's shift rows).
  Only runs whose verdicts race can move. The spreads come from those models' records, so this is in-sample.
  Measured: holds at 5% (92.2 / 2.0 / 1.14, 77 of 90, against 92.0 / 2.5 / 1.12, 76), fails at 1% by 0.07 DER (91.7 /
  2.6 / 1.66, 66, against 91.7 / 2.5 / 1.62, 65): the commands do not take it. Its costly moves at 1% were to the
  latent shift (the all-to-all TrojanNN-024, 0.4% -> 25.5% on seed 1; SIG-028 seed 0, 7.05 points lost).
- `spread-input`: written after `spread`, on fresh seeds: the agent's command without and with `class_spread` and
  `spread_latent` false (the standardised choice moves the class only to a mask or blend inversion), the defense's
  seeds 3 and 4, judged by CHANGE_RULE within the study; written before the run. Seeds 0-2 chose the variant, so only
  these seeds judge it. Measured: holds at 1% (91.7 / 2.5 / 1.65, 47 of 60, against 91.6 / 2.8 / 1.64,
  47) and at 5% (92.4 / 1.6 / 1.13, 54, against 92.3 / 1.9 / 1.12, 53): the agent's command is to take it, and
  did on 2026-12-06 until `spread-check`.
- `spread-check`: written after the command took it, when the README's `verdict` with the same change
  (verdict_spread.py, seeds 7-8) showed costly moves (SIG-003 at 5%: 0.4% -> 15.2% ASR; the all-to-all WaNet-012 at
  1%: 9.2% -> 32.4%): the same comparison as `spread-input` on the defense's seeds 7 and 8, judged by CHANGE_RULE over
  seeds 3, 4, 7 and 8 together (POOLED), written before the run. Where it fails at either fraction, the agent's
  command drops `class_spread` again. Measured with 1%: 91.8 / 2.2 / 1.75, 93 of 120 within, against 91.8 / 2.4 /
  1.73, 94: it fails (WaNet-012 seed 8 follows a blend of class 2: 1.89 -> 3.06 points lost), and the command dropped
  it. With 5%, run after the decision: 92.3 / 1.9 / 1.17, 107 of 120, against 92.3 / 1.9 / 1.16, 107, holds, as
  SIG-028 seed 4's gain (16.9% -> 2.3%) offsets SIG-003 seed 7's loss (0.2% -> 11.9%).
- `repair-layout`: the repair itself trained in channels-last on the CPU (nc.REPAIR_LAYOUT; the inversions stay in
  channels-last), against the default layout, the defense's seeds 0, 1 and 2 both ways on this host's fold agents
  (rebuilt 2026-12-06), judged by LAYOUT_RULE over the three seeds. A training step of the small CNN takes 0.64 of
  the default's time (layout_speed_training.md), about 1 s of the 5% deployment; the deployment's margin under a
  tenth of ANP's time is a few hundredths. Written before the run: where it holds at both fractions,
  nc.REPAIR_LAYOUT becomes channels-last (every NC and verdict repair, the agent's command's included); where it
  fails at either, it stays the default. Measured: with 5% 91.8 / 3.2 / 1.03, 82 of 90 within, against 91.8 / 3.2 /
  1.04, 82 (15.0-20.0 s a deployment against 15.9-21.1); with 1% 91.2 / 3.7 / 1.57, 66, both ways (10.8-15.4 s
  against 11.2-15.6). It holds at both, and nc.REPAIR_LAYOUT is channels-last since. The last bits moved the repaired
  ASR or accuracy of 87 of 90 runs with 5% and 74 of 90 with 1%, by at most 0.5 points of ASR but one (BadNets-020
  with 1%, seed 2: 1.9): unlike the inversions' layout, the repair's moves no verdict.

- `hedge`: verdict's `hedge` (the repair also unlearns the strongest flagged mask or blend verdict of another class
  than the one followed), written after the configuration-shift set's 1% misses were traced (trigger_floor.md: the
  strong SIG s202 follows a latent class 8 at 4.15 against a mask and a blend of the target at 2.74 and 2.91). Chosen
  on verdict_choice's records of the shadow models (seeds 0-6; the runner-up names the target in 6 of the 7
  all-to-one cells that follow a wrong class, a wrong class in 50 of 357 that follow the right one). The agent's
  command without and with it, the defense's seeds 9-12 (HEDGE_SEEDS, run by no study before), judged by CHANGE_RULE
  within the study over the four seeds; written before the run. Where it holds at both fractions, the agent's
  command takes `hedge`; where it fails at either, it does not. Measured with 1%: 91.7 / 2.4 / 1.96, 81 of 120
  within, against 91.7 / 2.4 / 1.92, 83: it fails, and the command does not take it (5% was not run: the rule had
  decided). It fired on 14 runs, all of which followed the right class; 12 times the runner-up was the bag's mask,
  which WaNet's models name on most runs, and unlearning it cost up to 1.2 points (SIG-003: 1.72 -> 2.95). Only the
  all-to-all BadNets-025 gained (11.6% -> 7.8% ASR, still outside).

- `few-images`: where the agent's command switches from 8 repair epochs to 3 (agents/defense.py FEW_IMAGES, 1342
  images: the geometric mean of the 600 and 3000 where each was chosen, never measured between). Both at lr 0.02
  with 2% and 3% defense data (1200 and 1800 images, either side of the switch), the defense's seeds 15, 16 and 17
  (FEW_SEEDS: no study ran them), judged at each fraction by onp_prunable.py's rule over the three seeds pooled, the
  setting the command takes there today first (a tie keeps it: FEW_ORDER). Written before the run: where 8 is
  chosen at 2% and 3 at 3%, FEW_IMAGES stays; where 3 at both, it becomes 849 (the geometric mean of 600 and 1200);
  where 8 at both, 2324 (of 1800 and 3000); where 3 at 2% and 8 at 3%, it stays and the note says the two settings
  do not order by the defense set's size there. Seconds are not compared (the second setting of a seed reuses the
  first's inversions); the time bound is measured at 5%, where the command runs 3 epochs either way.
  Measured: 8 epochs at both. With 2%, 91.0 / 4.6 / 1.24, 79 of 90 within, against 3 epochs' 90.6 / 4.8 / 1.72, 55;
  with 3%, 91.6 / 3.3 / 1.26, 78, against 91.4 / 3.3 / 1.62, 74 (8 ahead on every seed's accuracy lost). So
  FEW_IMAGES is 2324 since: 8 epochs up to the 1800 images measured, 3 from the 3000 where the time bound chose them
  (`epochs` at 5% compared 3 and 2 only; 8 epochs over 3000 images were never run). With 2280 images, just below
  the new switch, 8 epochs take a median 0.082 of ANP's time (deploy_cost.py 'agent command below the switch').

Each of the 30 sampled shadow models (configs/agent/fashion-mnist-sampled.yaml) is defended by the leave-one-attack-out
agent that never saw its attack (onp_repair_sweep.fold_agent) with the pipeline of onp_vs_baselines's `shipped agent
verdict repair sweep agent limit`, its repair with each of the study's settings, all in one process per model (the
later settings reuse the first's memoised inversions: no seconds are compared beyond the repair's own). One JSON line
per model in onp_repair_STUDY_F.jsonl (F: the defense data in %; resumable), then onp_repair_STUDY_F.md. The choice for
the held-out runs is onp_prunable.py's rule: the best mean DER after the repair among the settings within the target
(mean ASR <= 5%, <= 2 points lost), else among all; a tie keeps the first, the recommended command's."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from onp_prunable import FRACTIONS, best, outcome, repaired_cell, repaired_means
from onp_repair_sweep import fold_agent, models
from onp_vs_baselines import _DISTILL
from rows import exit_2_on_bad_input
from signal_models import HERE, Rows, per_model_main
from verdict_repair import TARGET

from baselines import nc
from baselines.verdict import VerdictParams
from onp_env.signals import trigger_inversion
from onp_env.signals.base import Memo

HEDGE_SEEDS = (9, 10, 11, 12)
"""The defense's seeds of `hedge`, none run before (verdict_choice: 0-6; verdict_spread and spread-check: 7-8)."""
FEW_SEEDS = (15, 16, 17)
"""The defense's seeds of `few-images`, none run before by a study that chose (0-14 were)."""
FEW_FRACTIONS = (0.02, 0.03)
"""`few-images`' defense data: 1200 and 1800 Fashion-MNIST images, either side of FEW_IMAGES."""
FEW_ORDER = {0.02: ("8 epochs", "3 epochs"), 0.03: ("3 epochs", "8 epochs")}
"""`few-images`' settings at each fraction, first the one the agent's command took there when the study ran (its switch
at 1342 images)."""
STUDIES: dict[str, dict[str, dict[str, Any]]] = {
    "augment": {
        "none": {},
        "crop": {"repair_augment": "crop"},
        "crop-flip": {"repair_augment": "crop-flip"},
        "crop 10 epochs": {"repair_augment": "crop", "repair_epochs": 10},
    },
    "lr": {"lr 0.01": {}, "lr 0.005": {"repair_lr": 0.005}, "lr 0.002": {"repair_lr": 0.002}},
    "lr-high": {"lr 0.01": {}, "lr 0.02": {"repair_lr": 0.02}, "lr 0.03": {"repair_lr": 0.03}},
    "epochs": {
        "5 epochs": {"repair_lr": 0.02},
        "3 epochs": {"repair_lr": 0.02, "repair_epochs": 3},
        "2 epochs": {"repair_lr": 0.02, "repair_epochs": 2},
    },
    "epochs-high": {
        "5 epochs": {"repair_lr": 0.02},
        "8 epochs": {"repair_lr": 0.02, "repair_epochs": 8},
        "12 epochs": {"repair_lr": 0.02, "repair_epochs": 12},
    },
    "blend-verdict": {
        "3 epochs": {"repair_lr": 0.02, "repair_epochs": 3},
        "3 epochs no blend verdict": {
            "repair_lr": 0.02,
            "repair_epochs": 3,
            "blend_verdict": False,
            "blend_reuse": False,
        },
    },
    "layout": {"contiguous": {}, "channels last": {}},
    "layout-seeds": {
        "contiguous seed 1": {},
        "channels last seed 1": {},
        "contiguous seed 2": {},
        "channels last seed 2": {},
    },
    "layout-whole": {f"channels last seed {seed}": {} for seed in (0, 1, 2)},
    "spread": {f"class spread seed {seed}": {"class_spread": True} for seed in (0, 1, 2)},
    **{
        study: {
            f"{name} seed {seed}": extra
            for seed in seeds
            for name, extra in (("command", {}), ("input spread", {"class_spread": True, "spread_latent": False}))
        }
        for study, seeds in (("spread-input", (3, 4)), ("spread-check", (7, 8)))
    },
    "hedge": {
        f"{name} seed {seed}": extra
        for seed in HEDGE_SEEDS
        for name, extra in (("command", {}), ("hedge", {"hedge": True}))
    },
    "repair-layout": {f"{name} seed {seed}": {} for seed in (0, 1, 2) for name in ("contiguous", "channels last")},
    "few-images": {
        f"{epochs} epochs seed {seed}": {"repair_lr": 0.02, "repair_epochs": epochs}
        for seed in FEW_SEEDS
        for epochs in (8, 3)
    },
}
"""Each study's settings: repair parameters on top of the recommended command's (`_DISTILL`: 5 epochs, lr 0.01); the
first of each is the agent's command of its time (lr 0.02 once `lr-high` chose it)."""
AMONG = {"epochs-0.05": ("3 epochs", "2 epochs")}
"""Runs whose choice is made among some of their settings only: with 5% defense data the pipeline's 5 epochs take
its deployment to 0.103 of ANP's time (deploy_cost_shipped_agent_verdict_repair_sweep_agent_limit.md), above the tenth
issue 23 sets; 3 epochs take about 1.8 of its ~20 s off (deploy_profile.py: the repair is 4.6 s there). Measured
afterwards against one ANP run per model (deploy_cost_agent_repairs_at_5.md): 0.117 -> 0.103, still above the tenth on 4
of 5 models in that run."""
CHEAPER = {"blend-verdict-0.05": ("3 epochs no blend verdict", 0.5)}
"""Runs that weigh a cheaper setting against the rule's choice: it is chosen where its mean ASR and accuracy lost meet
the target and its mean DER is at most this many points below the choice's. With 5% defense data the pipeline of 3
epochs still took 0.103 of one ANP run (deploy_cost_agent_repairs_at_5.md); `blend_verdict`'s inversion of every class
as a blend is 5.5 s of its ~19 s (deploy_profile.py) and no cap on its steps kept its verdicts (blend_steps.md). Without
it the repair's blend trigger is the suspect's alone (one class inverted, `repair_blend`)."""
COMMAND = {0.01: {"repair_lr": 0.02, "repair_epochs": 8}, 0.05: {"repair_lr": 0.02, "repair_epochs": 3}}
"""The agent's command's repair per fraction (README, "The learned defense"), under LAYOUTS' studies."""
LAYOUTS = {
    "layout": {"contiguous": (torch.contiguous_format, 0), "channels last": (torch.channels_last, 0)},
    "layout-seeds": {
        f"{name} seed {seed}": (layout, seed)
        for seed in (1, 2)
        for name, layout in (("contiguous", torch.contiguous_format), ("channels last", torch.channels_last))
    },
    "layout-whole": {f"channels last seed {seed}": (torch.channels_last, seed) for seed in (0, 1, 2)},
    "spread": {f"class spread seed {seed}": (torch.channels_last, seed) for seed in (0, 1, 2)},
    **{
        study: {
            f"{name} seed {seed}": (torch.channels_last, seed) for seed in seeds for name in ("command", "input spread")
        }
        for study, seeds in (("spread-input", (3, 4)), ("spread-check", (7, 8)))
    },
    "hedge": {
        f"{name} seed {seed}": (torch.channels_last, seed) for seed in HEDGE_SEEDS for name in ("command", "hedge")
    },
    "repair-layout": {
        f"{name} seed {seed}": (layout, seed)
        for seed in (0, 1, 2)
        for name, layout in (("contiguous", torch.contiguous_format), ("channels last", torch.channels_last))
    },
}
"""Studies whose settings are the inversions' memory layout on the CPU (trigger_inversion.CPU_LAYOUT) and the defense's
seed, under the fraction's COMMAND; every memo of the process is emptied before each setting, so each is a fresh
deployment. In REPAIR_LAYOUT_STUDIES the layout is the repair's (nc.REPAIR_LAYOUT), the inversions' channels-last."""
REPAIR_LAYOUT_STUDIES = ("repair-layout",)
SEEDED = {"layout-seeds": ("layout",)}
"""Studies judged with other studies' cells of the same fraction (their seeds), of both layouts."""
COMPARED = {"layout-whole": ("layout", "layout-seeds")}
"""Studies of channels-last alone, judged against other studies' cells of the default layout at the same fraction."""
LAYOUT_RULE = (0.5, 0.5, 0.2, 1)
"""Channels-last is kept where, at both fractions, its mean DER is at most 0.5 below the default layout's, its mean ASR
at most 0.5 above, its accuracy lost at most 0.2 above and its count within the target at most 1 below: a change of
the last bits is a change of the optimisation's path, as another seed would be, and is taken for its speed where the
defense's outcome holds."""
AGAINST = {
    "spread": ("layout-whole", "channels last"),
    "spread-input": ("spread-input", "command"),
    "spread-check": ("spread-check", "command"),
    "hedge": ("hedge", "command"),
}
"""Studies of one change to the command, judged by CHANGE_RULE against the cells of the same seeds of a study (itself,
where its runs hold both) whose settings begin so."""
POOLED = {"spread-check": ("spread-input",)}
"""Studies judged over their own seeds and those of the studies named (their cells at the same fraction, both
settings)."""
CHANGE_RULE = (0.0, 0.1, 0.1, 0)
"""The change joins the agent's command where, at both fractions over the defense's seeds 0-2, its mean DER is not
below the command's without it, its mean ASR and accuracy lost at most 0.1 above, and its count within the target not
below (LAYOUT_RULE's order). Written before the run: `class_spread` changes the followed class only where the
standardised race names another class, so every other run is the same to the last bit, and it must not make the
outcome worse."""
RUNS = [
    f"{study}-{fraction}" for study in STUDIES for fraction in (FEW_FRACTIONS if study == "few-images" else FRACTIONS)
]


def parsed(run: str) -> tuple[str, float]:
    """(study, fraction) of a `--run` value."""
    study, fraction = run.rsplit("-", 1)
    return study, float(fraction)


def results_of(run: str) -> Path:
    study, fraction = parsed(run)
    return HERE / "results" / f"onp_repair_{study}_{round(fraction * 100)}.jsonl"


def measure(name: str, role: str, path: str, run: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    study, fraction = parsed(run)
    attack = next(lab.attack.name for n, _, lab in models() if n == name)
    agent = str(fold_agent(attack))
    cells = []
    for setting, extra in STUDIES[study].items():
        if study == "hedge" and setting.startswith("hedge") and not hedge_fires(cells[-1]):
            cells.append({**cells[-1], "setting": setting, "copied": True})  # the change cannot touch this run
            continue
        seed = {}
        if study in LAYOUTS:
            layout, seed["seed"] = LAYOUTS[study][setting]
            if study in REPAIR_LAYOUT_STUDIES:
                trigger_inversion.CPU_LAYOUT, nc.REPAIR_LAYOUT = torch.channels_last, layout
            else:
                trigger_inversion.CPU_LAYOUT = layout
            Memo.clear_all()
            extra = {**COMMAND[fraction], **extra}
        elif study == "few-images":
            seed["seed"] = few_seed(setting)
        cell = repaired_cell(path, fraction, agent=agent, repair_sweep=True, sweep_limit_from="agent",
                             repair={**_DISTILL, **extra}, **seed)  # fmt: skip
        cells.append({**cell, "setting": setting})
    return {
        "model": name,
        "attack": attack,
        "study": study,
        "host": platform.node(),
        "torch": torch.__version__,
        "cells": cells,
    }


def hedge_fires(cell: dict[str, Any]) -> bool:
    """Whether verdict's `hedge` can change this run of the command (its recorded verdicts): a mask or blend verdict
    above the command's flag line (`flag_index`, 2) names another class than the one followed (not the untargeted
    look). Where not, the run with `hedge` is the same to the last bit, and `hedge`'s cell is the command's, copied."""
    v = cell.get("verdict")
    if not v or v["follows"] == "untargeted":
        return False
    line = VerdictParams().flag_index  # the command leaves it at its default
    return any(v[n]["score"] > line and v[n]["suspect"] != v["suspect"] for n in ("inversion", "blend") if n in v)


WHAT = {
    "augment": "`repair_augment` none, crop (a random shift of up to 2 pixels), crop-flip (and half flipped left to "
    "right) or crop over 10 epochs",
    "lr": "`repair_lr` 0.01, 0.005 or 0.002",
    "lr-high": "`repair_lr` 0.01, 0.02 or 0.03",
    "epochs": "`repair_lr` 0.02 (the 1% command's) over 5, 3 or 2 epochs",
    "epochs-high": "`repair_lr` 0.02 (the 1% command's) over 5, 8 or 12 epochs",
    "blend-verdict": "`repair_lr` 0.02 over 3 epochs (the 5% command's), with and without `blend_verdict` (and so "
    "`blend_reuse`)",
    "layout": "`repair_lr` 0.02 over 8 epochs with 1%, 3 with 5% (the agent's command), its inversions optimised in "
    "the default memory layout or channels-last, each from empty memos (so the seconds compare)",
    "layout-seeds": "`repair_lr` 0.02 over 8 epochs with 1%, 3 with 5% (the agent's command), its inversions "
    "optimised in the default memory layout or channels-last, the defense's seed 1 or 2, each from empty memos",
    "layout-whole": "`repair_lr` 0.02 over 8 epochs with 1%, 3 with 5% (the agent's command), its inversions "
    "optimised with every 4-d weight in channels-last, the defense's seed 0, 1 or 2, each from empty memos",
    "spread": "the agent's command (channels-last) with verdict's `class_spread`, the defense's seed 0, 1 or 2, each "
    "from empty memos",
    "spread-input": "the agent's command (channels-last) without and with verdict's `class_spread` and `spread_latent` "
    "false, the defense's seed 3 or 4, each from empty memos",
    "spread-check": "the agent's command (channels-last) without and with verdict's `class_spread` and `spread_latent` "
    "false, the defense's seed 7 or 8, each from empty memos",
    "repair-layout": "`repair_lr` 0.02 over 8 epochs with 1%, 3 with 5% (the agent's command), its repair trained in "
    "the default memory layout or channels-last on the CPU, the defense's seed 0, 1 or 2, each from empty memos",
    "few-images": "`repair_lr` 0.02 over 8 or 3 epochs (the agent's command below or above its switch, 1342 defense "
    "images when this ran), the defense's seed 15, 16 or 17",
    "hedge": "the agent's command (channels-last) without and with verdict's `hedge`, the defense's seed 9, 10, 11 or "
    "12, each from empty memos (a run whose verdicts hold no flagged runner-up of another class is the command's "
    "cell, copied: `hedge` cannot change it)",
}
"""Each study's settings, as its report says them."""


MEMOS = "the inversions are memoised after the first setting, so only differences in the repair's share compare"


def report(rows: Rows) -> str:
    study, fraction = rows[0]["study"], rows[0]["cells"][0]["fraction"]
    settings = tuple(STUDIES[study])

    def cells(setting: str, attack: str | None = None) -> list[dict[str, Any]]:
        return [c for r in rows if attack in (None, r["attack"]) for c in r["cells"] if c["setting"] == setting]

    lines = [
        f"# The repair after the agent's pipeline on shadow models: {study}, {fraction:.0%} defense data",
        "",
        f"Generated by `python benchmarks/onp_repair_knobs.py --run {study}-{fraction}` from "
        f"{results_of(f'{study}-{fraction}').name}: {len(rows)} sampled shadow models, each defended by the "
        "leave-one-attack-out agent that never saw its attack, `repair_sweep` with the limit from the agent's model, "
        "then verdict's repair (the recommended command's: 5 epochs, lr 0.01, half the images stamped, half the "
        f"targets distilled) with {WHAT[study]}. 'agent' columns: the pruned model before the repair. DER, ASR and "
        "accuracy lost in %/points; within: ASR <= 5% and <= 2 points lost; seconds: the whole defense, mean "
        f"({MEMOS if study not in LAYOUTS else 'each setting from empty memos: they compare'}). Hosts: "
        f"{', '.join(sorted({r['host'] for r in rows}))}.",
        "",
        "| setting | units | agent DER | agent ASR | agent lost | repaired DER | repaired ASR | repaired lost | "
        "within | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in settings:
        cs = cells(setting)
        units, seconds = statistics.mean(c["pruned"] for c in cs), statistics.mean(c["seconds"] for c in cs)
        lines.append(f"| {setting} | {units:.1f} | {outcome(cs)} | {seconds:.1f} |")
    lines += ["", "## By attack", "",
              "| attack | setting | agent DER | agent ASR | agent lost | repaired DER | repaired ASR | repaired lost | "
              "within |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for attack in sorted({r["attack"] for r in rows}):
        for setting in settings:
            lines.append(f"| {attack} | {setting} | {outcome(cells(setting, attack))} |")
    among = AMONG.get(f"{study}-{fraction}", settings)
    pick = best(among, cells)
    said = "" if among == settings else f", among {', '.join(among)} (AMONG: the others do not fit the time bound)"
    if f"{study}-{fraction}" in CHEAPER:
        cheaper, slack = CHEAPER[f"{study}-{fraction}"]
        der, asr, lost, _ = repaired_means(cells(cheaper))
        picked = repaired_means(cells(pick))[0]
        fits = asr <= TARGET[0] * 100 and lost <= TARGET[1] * 100 and der >= picked - slack
        said += f"; CHEAPER: {cheaper} if within the target and its DER at most {slack:g} below, {der:.1f} against "
        said += f"{picked:.1f}"
        pick = cheaper if fits else pick
    if study in AGAINST:
        return "\n".join([*lines, "", *change_verdict(study, fraction, rows)]) + "\n"
    if study in LAYOUTS:
        return "\n".join([*lines, "", layout_verdict(study, fraction, cells)]) + "\n"
    if study == "few-images":
        return "\n".join([*lines, "", *few_verdict(fraction, rows)]) + "\n"
    return "\n".join([*lines, "", f"Choice for the held-out runs (onp_prunable.py's rule{said}): {pick}."]) + "\n"


def layout_verdict(study: str, fraction: float, cells: Callable[[str], list[dict[str, Any]]]) -> str:
    """LAYOUT_RULE at this fraction: channels last against the default layout, over the study's seeds and those of
    the studies SEEDED names (both layouts) and COMPARED names (the default layout's)."""
    new: list[dict[str, Any]] = []
    old: list[dict[str, Any]] = []
    seeds = 0
    for each, layouts in ((study, (torch.channels_last, torch.contiguous_format)),
                          *((s, (torch.channels_last, torch.contiguous_format)) for s in SEEDED.get(study, ())),
                          *((s, (torch.contiguous_format,)) for s in COMPARED.get(study, ()))):  # fmt: skip
        if each == study:
            found = [c for s in LAYOUTS[study] for c in cells(s)]
        else:
            found = [c for _, c in study_cells(each, fraction)]
        for layout, out in ((torch.channels_last, new), (torch.contiguous_format, old)):
            if layout in layouts:
                out += [c for c in found if LAYOUTS[each][c["setting"]][0] == layout]
        if torch.channels_last in layouts:
            seeds += sum(f == torch.channels_last for f, _ in LAYOUTS[each].values())
    return (f"LAYOUT_RULE at this fraction, over {seeds} seed(s) ({len(new)} runs a layout): channels last "
            f"{judged(new, old, LAYOUT_RULE, seeds)}.")  # fmt: skip


def few_seed(setting: str) -> int:
    """The defense's seed of a `few-images` setting ('8 epochs seed 15' -> 15)."""
    return int(setting.rsplit(" ", 1)[1])


def few_verdict(fraction: float, rows: Rows) -> list[str]:
    """`few-images`' choice at this fraction: onp_prunable.py's rule over FEW_SEEDS pooled, FEW_ORDER's first kept
    on a tie."""

    def pooled(epochs: str) -> list[dict[str, Any]]:
        return [c for r in rows for c in r["cells"] if c["setting"].startswith(f"{epochs} seed ")]

    order = FEW_ORDER[fraction]
    lines = [f"Over the defense's seeds {', '.join(map(str, FEW_SEEDS))} pooled ({len(pooled(order[0]))} runs a "
             "setting):", "", "| setting | agent DER | agent ASR | agent lost | repaired DER | repaired ASR | "
             "repaired lost | within |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {epochs} | {outcome(pooled(epochs))} |" for epochs in order]
    lines += ["", f"Choice (onp_prunable.py's rule, a tie keeps {order[0]}, the agent's command's when this ran): "
              f"{best(order, pooled)}."]  # fmt: skip
    return lines


def study_cells(study: str, fraction: float) -> list[tuple[str, dict[str, Any]]]:
    """(model, cell) of every cell another study recorded at this fraction."""
    rows = [json.loads(line) for line in results_of(f"{study}-{fraction}").read_text().splitlines()]
    return [(r["model"], c) for r in rows for c in r["cells"]]


def rule_holds(new: list[dict[str, Any]], old: list[dict[str, Any]], rule: tuple[float, ...], seeds: int) -> bool:
    """Whether `rule` (LAYOUT_RULE's order; the count's slack per seed) holds for `new`'s means against `old`'s."""
    return means_hold(repaired_means(new), repaired_means(old), rule, seeds)


def means_hold(means: tuple, means0: tuple, rule: tuple[float, ...], seeds: int) -> bool:
    """rule_holds on means already taken (repaired_means')."""
    (der, asr, lost, within), (der0, asr0, lost0, within0) = means, means0
    d_der, d_asr, d_lost, d_within = rule
    return (
        der >= der0 - d_der and asr <= asr0 + d_asr and lost <= lost0 + d_lost and within >= within0 - d_within * seeds
    )


def judged(new: list[dict[str, Any]], old: list[dict[str, Any]], rule: tuple[float, ...], seeds: int) -> str:
    """The means of `new` against `old` and whether `rule` (LAYOUT_RULE's order; the count's slack per seed) holds."""
    means, means0 = repaired_means(new), repaired_means(old)
    (der, asr, lost, within), (der0, asr0, lost0, within0) = means, means0
    holds = means_hold(means, means0, rule, seeds)
    return (
        f"{der:.1f} / {asr:.1f} / {lost:.2f}, {within} within, against {der0:.1f} / {asr0:.1f} / {lost0:.2f}, "
        f"{within0}: {'holds' if holds else 'fails'}"
    )


def change_verdict(study: str, fraction: float, rows: Rows) -> list[str]:
    """CHANGE_RULE at this fraction against AGAINST's study (cells of the same seeds), and every run that moved."""
    other, base = AGAINST[study]
    seed_of = {setting: seed for setting, (_, seed) in {**LAYOUTS[study], **LAYOUTS[other]}.items()}
    cells = [(r["model"], c) for r in rows for c in r["cells"]]
    for each in POOLED.get(study, ()):
        seed_of |= {setting: seed for setting, (_, seed) in LAYOUTS[each].items()}
        cells += study_cells(each, fraction)
    found = cells if other == study else study_cells(other, fraction)
    before = {(model, seed_of[c["setting"]]): c for model, c in found if c["setting"].startswith(base)}
    after = {(model, seed_of[c["setting"]]): c for model, c in cells if not c["setting"].startswith(base)}
    old = [before[key] for key in after]
    seeds = len({seed for _, seed in after})
    lines = [f"CHANGE_RULE at this fraction, over {seeds} seeds ({len(after)} runs), against {other}'s `{base}`: "
             f"{judged(list(after.values()), old, CHANGE_RULE, seeds)}.", "",
             *moved(before, after)]  # fmt: skip
    return lines


def moved(before: dict[tuple[str, int], dict[str, Any]], after: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """A table of the runs (keyed by model and seed) whose units or ASR after the repair moved from `before` to
    `after`, with the verdict and class followed after."""
    lines = ["Runs whose units or ASR after the repair moved (ASR and points lost after the repair; the verdict and "
             "class followed with the change):", "", "| model | seed | units | ASR | lost | followed |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for (model, seed), c in after.items():
        b = before[(model, seed)]
        if c["pruned"] == b["pruned"] and c["repaired"]["asr"] == b["repaired"]["asr"]:
            continue
        lost = [100 * (x["before"]["acc"] - x["repaired"]["acc"]) for x in (b, c)]
        v = c.get("verdict", {})
        followed = f"{v['follows']}: {v['suspect']}" if v else ""
        lines.append(f"| {model} | {seed} | {b['pruned']} -> {c['pruned']} | {100 * b['repaired']['asr']:.1f} -> "
                     f"{100 * c['repaired']['asr']:.1f} | {lost[0]:.2f} -> {lost[1]:.2f} | {followed} |")  # fmt: skip
    return lines


def main() -> None:
    if "--report-only" not in sys.argv:
        for attack in sorted({lab.attack.name for _, _, lab in models()}):
            fold_agent(attack)  # before any model is built
    run = {"choices": RUNS, "required": True, "help": "the study and the defense data (a share of the split)"}
    per_model_main(__doc__, results_of(RUNS[0]), models(), measure, report, option=("--run", run, results_of))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
