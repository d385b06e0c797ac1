"""How decisive is the mask inversion's verdict on one model with more images to draw from, at the same cost a step?

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/inversion_images_probe.py ARTIFACT_DIR \
        [--fractions 0.01 0.05] [--seeds 202 0] [--images 64 256]

The inversion (onp_env.signals.trigger_inversion.invert, the shipped settings) optimises each class's trigger on
`images` defense images drawn with the seed, 16 a class and step: a larger pool costs nothing more a step, only which
images the steps see. On the rebuilt configuration-shift model with a centred 5-pixel BadNets patch (seed 202),
`verdict` missed the target with 1% defense data (benchmarks/results/bench-fashion-mnist-shift-verdict-rebuild/). This
prints, per defense fraction (onp_env.defend.defense_subset), seed and image count, the most anomalous class and its
index against the shipped class reference `fashion-mnist`, and the attack's target's (read from the manifest, only to
label the row). A probe of one model, not a choice: a setting is chosen on shadow models (onp_repair_knobs.py's
rule), and the shipped reference was measured with 64 images."""

from __future__ import annotations

import argparse

import torch
from rows import exit_2_on_bad_input

from onp_env.artifacts import load_artifact
from onp_env.defend import defense_subset
from onp_env.signals.base import anomaly_index
from onp_env.signals.shipped import shipped_reference
from onp_env.signals.trigger_inversion import InversionParams, invert


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--seeds", nargs="+", type=int, default=[202, 0])
    p.add_argument("--images", nargs="+", type=int, default=[64, 256])
    args = p.parse_args()
    torch.set_num_threads(1)
    art = load_artifact(args.artifact)
    target = art.attack.target if art.attack is not None else None
    reference = torch.tensor(shipped_reference("fashion-mnist").signals["inversion"]["sizes"])
    print("| fraction | seed | images | suspect | index | target's index | steps |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for fraction in args.fractions:
        for seed in args.seeds:
            x, y = defense_subset(art, fraction, seed)
            for images in args.images:
                inv = invert(art.model, x, y, len(reference), InversionParams(images=images), seed, torch.device("cpu"))
                index = anomaly_index(inv.norms, reference)
                k = int(index.argmax())
                mark = "-" if target is None else f"{float(index[target]):.2f}"
                print(f"| {fraction:.0%} | {seed} | {images} | {k} | {float(index[k]):.2f} | {mark} | {inv.steps} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    exit_2_on_bad_input(main)
