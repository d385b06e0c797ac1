"""Which units two defenses of `onp bench` runs pruned on the same models, per layer, and what each left.

    python benchmarks/bench_units.py A/results.jsonl LABEL_A B/results.jsonl LABEL_B --out FILE.md

For every model and defense fraction both runs hold, counts each defense's pruned units per layer (the layout
comes from the cached model, found by the lab's cache: nothing is trained), how many of them the other
defense also pruned, and the ASR and points lost each left before its repair and after it (`+ fine-tune`).
It answers "did the repair or the choice of units make the difference" for two defenses that share a repair
(e.g. `onp` with `repair_with: verdict` against `verdict`)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rows import exit_2_on_bad_input

from onp_env import load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.bench.run import read_cells
from onp_env.config import LabConfig, from_dict
from onp_env.errors import OnpError
from onp_env.graph.units import find_units
from onp_env.zoo import cache_dir, find_cached


def cells_of(path: Path, label: str) -> dict[tuple[str, float], dict]:
    """The cells of `label` in a bench results file, by (model name, fraction)."""
    found = {(f"{r['key'].split('/')[2]} s{r['seed']}", r["fraction"]): r for r in read_cells(path)
             if r["defense"] == label}  # fmt: skip
    if not found:
        raise OnpError(f"{path} holds no cell of defense {label!r}: name a label of its results.md")
    return found


def layers_of(lab: dict) -> list[tuple[str, int, int]]:
    """(name, first unit, size) of each unit layer of the cached model of `lab` (a cell's config)."""
    cfg = from_dict(LabConfig, lab, "a cell's config")
    art_path = find_cached(cfg, cache_dir())
    if art_path is None:
        raise OnpError(f"the model {cfg.name} is not in the cache ({cache_dir()}): set ONP_CACHE to the bench's cache")
    art = load_artifact(art_path)
    layout, _ = find_units(art.model, art.defense_set()[0][:2])
    return [(lay.name, lay.offset, lay.size) for lay in layout.layers]


def per_layer(mine: set[int], other: set[int], layers: list[tuple[str, int, int]]) -> str:
    """`mine`'s units in each layer, in brackets how many of them are also in `other`."""
    counts = [(len([u for u in mine if o <= u < o + s]), len([u for u in mine & other if o <= u < o + s]))
              for _, o, s in layers]  # fmt: skip
    return " / ".join(f"{n} ({shared})" for n, shared in counts)


def left(cell: dict) -> tuple[float, float, float, float]:
    """ASR % and points lost after pruning, then after the repair (the pruned model's where none ran)."""
    tuned = cell.get("finetuned") or cell
    before = cell["before"]["acc"]
    return (100 * cell["asr"], 100 * (before - cell["acc"]), 100 * tuned["asr"], 100 * (before - tuned["acc"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("label_a")
    p.add_argument("b", type=Path)
    p.add_argument("label_b")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    a, b = cells_of(args.a, args.label_a), cells_of(args.b, args.label_b)
    keys = sorted(set(a) & set(b), key=lambda k: (k[1], k[0]))
    if not keys:
        raise OnpError(f"the two runs share no model and fraction: compare runs of one grid ({args.a}, {args.b})")
    layouts: dict[str, list[tuple[str, int, int]]] = {}  # by model: both fractions read one model
    for key in keys:
        if key[0] not in layouts:
            layouts[key[0]] = layers_of(a[key]["config"])
    names = [n for n, _, _ in layouts[keys[0][0]]]
    head = " | ".join(names)
    lines = [
        f"# Units pruned by `{args.label_a}` and `{args.label_b}`",
        "",
        f"`python benchmarks/bench_units.py {args.a} {args.label_a} {args.b} {args.label_b}`. Per model and defense "
        f"fraction: units pruned in each layer ({head}), in brackets how many the other defense also pruned; ASR % "
        "and points lost after pruning → after the repair.",
        "",
        f"| model | data | {args.label_a}: units | {args.label_b}: units | {args.label_a}: ASR, lost "
        f"| {args.label_b}: ASR, lost |",
        "|---|---:|---|---|---|---|",
    ]
    summary: dict[float, list[tuple[float, ...]]] = {}
    for key in keys:
        ca, cb = a[key], b[key]
        layers = layouts[key[0]]
        ua, ub = set(ca["units"]), set(cb["units"])
        la, lb = left(ca), left(cb)
        lines.append(f"| {key[0]} | {key[1]:.0%} | {per_layer(ua, ub, layers)} | {per_layer(ub, ua, layers)} "
                     f"| {la[0]:.1f}, {la[1]:.2f} → {la[2]:.1f}, {la[3]:.2f} "
                     f"| {lb[0]:.1f}, {lb[1]:.2f} → {lb[2]:.1f}, {lb[3]:.2f} |")  # fmt: skip
        summary.setdefault(key[1], []).append((len(ua), len(ub), len(ua & ub), *la, *lb))
    lines += ["", "## Means", "",
              f"| data | models | units {args.label_a} | units {args.label_b} | shared "
              f"| {args.label_a}: ASR, lost | {args.label_b}: ASR, lost |",
              "|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for fraction, rows in sorted(summary.items()):
        m = [statistics.mean(col) for col in zip(*rows, strict=True)]
        lines.append(f"| {fraction:.0%} | {len(rows)} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} "
                     f"| {m[3]:.1f}, {m[4]:.2f} → {m[5]:.1f}, {m[6]:.2f} "
                     f"| {m[7]:.1f}, {m[8]:.2f} → {m[9]:.1f}, {m[10]:.2f} |")  # fmt: skip
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
