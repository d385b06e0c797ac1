"""Which units each method pruned, next to the oracle's: per layer, on the protocol's held-out models.

    python benchmarks/onp_units.py [--results benchmarks/results/onp.jsonl]

For every held-out model and defense fraction of benchmarks/onp_vs_baselines.py that has an oracle
row, counts each method's pruned units per layer and how many of them the oracle expert (which knows
the trigger) also pruned; the layer layout comes from the cached held-out artifact. Writes
benchmarks/results/onp_units.md: the measurement behind "why did this method win or lose here"."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rows import exit_2_on_bad_input, read_protocol

from onp_env import load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.graph.units import find_units
from onp_env.zoo import cache_dir

HERE = Path(__file__).resolve().parent
ORDER = ["oracle", "onp", "mnp", "anp", "rnp", "bnp", "fp", "clp", "magnitude", "random"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "onp.jsonl")
    p.add_argument("--cache", type=Path, default=HERE / "runs" / "cache")
    args = p.parse_args()
    rows = [r for r in read_protocol(args.results) if r.get("kind") is None]
    oracle = {(r["attack"], r["seed"], r["fraction"]): set(r["units"]) for r in rows if r["method"] == "oracle"}
    layouts: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
    table: dict[tuple[str, float, str], list[tuple[list[int], list[int]]]] = {}
    for r in rows:
        key = (r["attack"], r["seed"], r["fraction"])
        if key not in oracle or r["method"] not in ORDER:
            continue
        if key[:2] not in layouts:
            found = sorted((args.cache if args.cache.is_dir() else cache_dir()).glob(f"held-out-{key[0]}-s{key[1]}-*"))
            art = load_artifact(found[0])
            layout, _ = find_units(art.model, art.defense_set()[0][:2])
            layouts[key[:2]] = [(lay.name, lay.offset, lay.size) for lay in layout.layers]
        layers = layouts[key[:2]]
        units = set(r["units"])
        per_layer = [len([u for u in units if off <= u < off + size]) for _, off, size in layers]
        hits = [len([u for u in units & oracle[key] if off <= u < off + size]) for _, off, size in layers]
        table.setdefault((r["attack"], r["fraction"], r["method"]), []).append((per_layer, hits))
    names = [n for n, _, _ in next(iter(layouts.values()))] if layouts else []
    lines = [
        "# Which units each method pruned, next to the oracle's",
        "",
        "`python benchmarks/onp_units.py` from `onp.jsonl` and the cached held-out models. Per held-out attack "
        "and defense fraction, mean over held-out models of the units pruned in each layer, and in brackets how "
        "many of them the oracle expert (trigger known) also pruned. Layers: " + ", ".join(names) + ".",
        "",
    ]
    for attack, fraction in sorted({(a, f) for a, f, _ in table}):
        lines += [f"## {attack}, {fraction:.0%} defense data", "", "| method | n | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]  # fmt: skip
        for method in ORDER:
            cells = table.get((attack, fraction, method))
            if not cells:
                continue
            cols = []
            for i in range(len(names)):
                pruned = statistics.mean(c[0][i] for c in cells)
                hit = statistics.mean(c[1][i] for c in cells)
                cols.append(f"{pruned:.1f} ({hit:.1f})")
            lines.append(f"| {method} | {len(cells)} | " + " | ".join(cols) + " |")
        lines.append("")
    write_text_atomic(HERE / "results" / "onp_units.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
