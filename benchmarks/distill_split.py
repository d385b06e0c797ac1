"""Which images' soft targets let a backdoor back under `repair_distill`? A diagnostic on shadow models.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/distill_split.py [--models wanet-012 ...] \
        [--fractions 0.05]

With the README's `verdict` (onp_vs_baselines.BEFORE_VERIFY), shadow WaNet-012 at 5% kept 19.7% ASR after the
distilled repair against 4.6% without (verdict_repair_second_build.md). Here one sweep per model and fraction
(seed 0, as verdict_repair.py runs them) is repaired four ways: labels only (`repair_distill` 0), the
README's 0.5 on every image, and 0.5 only on the images that carry a trigger (`stamped`) or only on the others
(`clean`). The split is made by replacing the unpruned model's output on the other images with its label
(logits of 100 on the label: a softmax that is the one-hot label), so the repair code runs unchanged. The
shadow models' test splits and triggers score the repairs: these are the defender's own models, and nothing
here is chosen for a held-out model. Prints one line per repair; writes nothing."""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from onp_vs_baselines import BEFORE_VERIFY, SETTINGS
from rows import exit_2_on_bad_input
from verdict_repair import CONFIG, sweep_of

import baselines.nc as nc
from agents.config import load_agent_config
from agents.train import zoo_configs
from baselines.verdict import Verdict
from onp_env import build_artifact, load_artifact
from onp_env.defend import defense_subset
from onp_env.graph.units import find_units
from onp_env.metrics import evaluate

SPLITS = ("labels", "every image", "stamped", "clean")


def repair(defense: Verdict, art, ds, result, layout, x, y, split: str) -> dict:
    """The pruned model repaired with the soft targets on `split`'s images only."""
    recommended = SETTINGS[BEFORE_VERIFY][1]
    epochs, unlearn, distill = recommended["repair_epochs"], recommended["unlearn"], recommended["repair_distill"]
    distill = 0.0 if split == "labels" else distill
    defense.params = dataclasses.replace(defense.params, repair_epochs=epochs, unlearn=unlearn, repair_distill=distill)
    original_logits = nc.logits
    pick = defense.repair_draw(len(x))[0]
    hard = torch.zeros(len(x), dtype=torch.bool)
    if split in ("stamped", "clean"):
        hard[:] = split == "stamped"  # "stamped": every image hard but the stamped ones
        hard[pick] = split == "clean"

    def split_logits(model, images):
        out = original_logits(model, images)
        return torch.where(hard[:, None], 100.0 * torch.nn.functional.one_hot(y, out.shape[1]).to(out), out)

    nc.logits = split_logits
    try:
        tuned = defense.finetune(art.model, result.model, layout, result.pruned, x, y)
    finally:
        nc.logits = original_logits
    return evaluate(tuned, ds.test_x, ds.test_y, art.attack)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["wanet-012"], help="shadow models by attack-index")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.05])
    args = p.parse_args()
    torch.set_num_threads(1)
    labs = {lab.name: lab for lab in zoo_configs(load_agent_config(str(CONFIG), []))}
    for short in args.models:
        names = [n for n in labs if f"-{short}-" in n]
        if len(names) != 1:
            p.error(f"--models {short!r} names {len(names)} shadow models: write ATTACK-INDEX, e.g. wanet-012")
        (name,) = names
        art = load_artifact(build_artifact(labs[name], progress=False))
        before, ds = art.metrics, art.dataset()
        for fraction in args.fractions:
            x, y = defense_subset(art, fraction)
            defense = Verdict(**sweep_of(BEFORE_VERIFY))  # the sweep alone: each split repairs it
            result = defense.run(art.model, x, y)
            layout, _ = find_units(copy.deepcopy(art.model).eval(), x[:2])
            for split in SPLITS:
                after = repair(defense, art, ds, result, layout, x, y, split)
                print(
                    f"{short} {fraction:.0%} follows {result.details['follows']}, soft targets on {split}: "
                    f"ASR {100 * after['asr']:.1f}%, {100 * (before['acc'] - after['acc']):.2f} points lost"
                )


if __name__ == "__main__":
    exit_2_on_bad_input(main)
