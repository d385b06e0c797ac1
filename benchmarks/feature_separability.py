"""How well each node feature the policy can see separates the backdoor units, per attack.

    python benchmarks/feature_separability.py [--attacks badnets ...] [--top 12]

For the small-CNN Fashion-MNIST model of each attack (configs/attack/*-fashion-mnist.yaml), the
oracle's `--top` most trigger-sensitive units (largest clean-vs-triggered activation gap, agents.expert;
uses the trigger, for this analysis only) are the positives; every feature of the environment's
observation (static, and the trigger-free signal sets mnp / anp / rnp) is scored by its ROC-AUC
within the layer that holds most positives (an AUC below 0.5 means the feature ranks them lowest).
Writes benchmarks/results/feature_separability.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from agents.expert import activation_gap
from onp_env import build_artifact, load_config
from onp_env.artifacts import write_text_atomic
from onp_env.config import LabConfig
from onp_env.env import NeuronPruningEnv

HERE = Path(__file__).resolve().parent


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet", "sig", "trojannn"])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--results", type=Path, default=HERE / "results" / "feature_separability.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, names = [], None
    for attack in args.attacks:
        cfg = load_config(LabConfig, HERE.parent / "configs" / "attack" / f"{attack}-fashion-mnist.yaml")
        env = NeuronPruningEnv(artifacts=[str(build_artifact(cfg, progress=False))], features=["mnp", "anp", "rnp"])
        obs, _ = env.reset(seed=0)
        names = env.feature_names
        gap = activation_gap(env)
        top = torch.argsort(-gap)[: args.top]
        layers = [env.task.layout.locate(int(u))[0] for u in top]
        lay = max(set(layers), key=layers.count)
        sl = slice(lay.offset, lay.offset + lay.size)
        positive = torch.zeros(env.num_units, dtype=torch.bool)
        positive[top] = True
        x = torch.as_tensor(obs["nodes"][: env.num_units])
        aucs = [auc(x[sl, i], positive[sl]) for i in range(len(names))]
        rows.append((attack, lay.name, int(positive[sl].sum()), aucs))
        print(attack, lay.name, [f"{n}={a:.2f}" for n, a in zip(names, aucs, strict=True)], flush=True)
    assert names is not None
    keep = [i for i, n in enumerate(names) if n not in ("depth", "width", "is_bn", "pruned")]
    lines = [
        "# Which node features separate the backdoor units",
        "",
        f"`python benchmarks/feature_separability.py`: positives = the oracle's {args.top} units with the largest "
        "clean-vs-triggered activation gap (uses the trigger: analysis only); ROC-AUC of each observed feature "
        "within the layer holding most positives (0.5 = chance; below 0.5 = positives rank low). Small-CNN "
        "Fashion-MNIST models of configs/attack/; signals at their environment defaults (onp_env/env/signals.py).",
        "",
        "| attack | layer (positives) | " + " | ".join(names[i] for i in keep) + " |",
        "|---|---|" + "---:|" * len(keep),
    ]
    for attack, layer, n, aucs in rows:
        lines.append(f"| {attack} | {layer} ({n}) | " + " | ".join(f"{aucs[i]:.2f}" for i in keep) + " |")
    write_text_atomic(args.results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
