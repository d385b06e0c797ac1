"""The ASR a backdoor's trigger reaches on clean models: how low a defense can be expected to take it.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/trigger_floor.py [--workers 2] [--report-only]

ASR counts the test images of the other classes that the triggered input sends to the target. A trigger that
covers the middle of an image (a centred patch) or moves every pixel (a strong sinusoid) can send a model that
never learnt it to one class too, so the target's "ASR at most 5%" has a floor that depends on the trigger, not
on the defense. Here each backdoored model's own trigger (the artifact's attack: TrojanNN's optimised pattern
and WaNet's grid included) is stamped on the test split and given to CLEAN_SEEDS clean models of its recipe
(its config with no attack, trained through the lab's cache): their ASR is the trigger's floor. Beside it, what
the defenses in the README's target table left on the same model (SOURCES: the configuration-shift bench
cells, after the repair where a defense repairs, and the leave-one-attack-out protocol's rows). Nothing here
chooses anything. One JSON line per backdoored model in trigger_floor.jsonl (resumable), then trigger_floor.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from statistics import mean
from typing import Any

import torch
from onp_vs_baselines import held_out_labs
from rows import exit_2_on_bad_input
from signal_models import HERE, _build
from tqdm import tqdm

from onp_env.artifacts import load_artifact, write_text_atomic
from onp_env.config import LabConfig, from_dict
from onp_env.errors import OnpError
from onp_env.metrics import evaluate
from onp_env.results import append

RESULTS = HERE / "results" / "trigger_floor.jsonl"
CLEAN_SEEDS = (301, 302, 303)
"""Seeds no backdoored model of either set uses (shift: 201-202, protocol: 101-103, shadow zoo: 1-2)."""
SOURCES = {
    "shift": ["bench-fashion-mnist-shift-onp-repair-epochs-high-whole",
              "bench-fashion-mnist-shift-onp-repair-epochs-whole", "bench-fashion-mnist-shift-verdict-rebuild"],
    "protocol": ["onp_no_mnp_spread.jsonl"],
}  # fmt: skip
"""Per set, the results (under benchmarks/results) whose models are measured and whose ASR is shown beside the
floor: bench folders (results.jsonl; each row records its model's config) or a protocol file (held-out models
named by attack and seed, onp_vs_baselines.held_out_labs)."""


def defended(row: dict[str, Any]) -> float:
    """The ASR a bench or protocol row records, after the repair where the defense repaired (`finetuned`)."""
    return float((row.get("finetuned") or row)["asr"])


Model = tuple[str, LabConfig, dict[str, Any]]


def models() -> dict[str, Model]:
    """name -> (set, the backdoored model's config, {"before": the ASR its rows record before any defense,
    "left": {defense at fraction: ASR left, the mean of its rows}})."""
    rows: list[tuple[str, LabConfig, str, dict[str, Any]]] = []
    for name in SOURCES["shift"]:
        for line in (HERE / "results" / name / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows.append(("shift", from_dict(LabConfig, r["config"], f"{name}:config"), r["defense"], r))
    for name in SOURCES["protocol"]:
        found = [r for r in map(json.loads, (HERE / "results" / name).read_text().splitlines()) if "method" in r]
        labs = held_out_labs(sorted({r["attack"] for r in found}), sorted({r["seed"] for r in found}))
        rows += [("protocol", labs[r["attack"], r["seed"]], r["method"], r) for r in found]
    out: dict[str, tuple[str, LabConfig, set[float], dict[str, list[float]]]] = {}
    for the_set, lab, method, r in rows:
        entry = out.setdefault(lab.name, (the_set, lab, set(), {}))
        entry[2].add(round(r["before"]["asr"], 6))
        entry[3].setdefault(f"{method} @ {r['fraction']:g}", []).append(defended(r))
    for name, (_, _, before, _) in out.items():
        if len(before) > 1:  # rows of two builds of one config (another host's): their ASR left would not compare
            raise OnpError(f"the results name two builds of {name} (ASR before {sorted(before)}): list one build's")
    return {k: (s, lab, {"before": b.pop(), "left": {m: mean(v) for m, v in d.items()}})
            for k, (s, lab, b, d) in out.items()}  # fmt: skip


def clean_twin(lab: LabConfig, seed: int) -> LabConfig:
    """`lab`'s recipe with no attack and another seed: a model that never saw the trigger."""
    recipe = f"{lab.data.name}-{lab.model.name}-{dataclasses.replace(lab, seed=0, attack=None).fingerprint()[:6]}"
    return dataclasses.replace(lab, name=f"trigger-floor-clean-{recipe}-s{seed}", seed=seed, attack=None)


def measure(key: str, the_set: str, lab: LabConfig, path: str, clean: dict[int, str],
            recorded: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    torch.set_num_threads(1)
    art = load_artifact(path)
    attack = art.attack
    assert attack is not None and lab.attack is not None
    if abs(art.metrics["asr"] - recorded["before"]) > 1e-4:
        raise OnpError(
            f"{key}: the cache holds another build than the results measured (ASR {art.metrics['asr']:.4f} "
            f"against {recorded['before']:.4f}): use the cache those results were made with"
        )
    ds = art.dataset()
    floor = {str(s): evaluate(load_artifact(p).model, ds.test_x, ds.test_y, attack)["asr"] for s, p in clean.items()}
    return {"model": key, "set": the_set, "attack": lab.attack.key, "seed": lab.seed, "mode": lab.attack.mode,
            "target": lab.attack.target, "asr": art.metrics["asr"], "floor": floor,
            "left": recorded["left"]}  # fmt: skip


def _measure(args: tuple) -> dict[str, Any]:
    return measure(*args)


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The ASR a trigger reaches on clean models",
        "",
        f"Generated by `python benchmarks/trigger_floor.py` from {RESULTS.name}. Per backdoored model, its own trigger "
        f"stamped on the test split: the backdoored model's ASR, then the ASR of {len(CLEAN_SEEDS)} clean models of "
        f"its recipe (seeds {', '.join(map(str, CLEAN_SEEDS))}, no attack): mean and max, the floor no defense can be "
        "expected to go below. Then what each defense left (ASR after its repair where it repairs, the mean over its "
        "rows of that model), from " + ", ".join(f"`{s}`" for v in SOURCES.values() for s in v) + ". %.",
        "",
    ]
    for the_set in SOURCES:
        mine = [r for r in rows if r["set"] == the_set]
        if not mine:
            continue
        methods = sorted({m for r in mine for m in r["left"]}, key=lambda m: (m.split(" @ ")[1], m))
        lines += [f"## {the_set}", "", "| model | target | ASR | clean: mean | max | "
                  + " | ".join(f"`{m.split(' @ ')[0]}` {float(m.split(' @ ')[1]):.0%}" for m in methods) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(methods)]  # fmt: skip
        for r in mine:
            f = list(r["floor"].values())
            target = "all-to-all" if r["mode"] == "all-to-all" else str(r["target"])
            cells = [f"{100 * r['left'][m]:.1f}" if m in r["left"] else "" for m in methods]
            lines.append(f"| {r['attack']} s{r['seed']} | {target} | {100 * r['asr']:.1f} | {100 * mean(f):.1f} | "
                         f"{100 * max(f):.1f} | " + " | ".join(cells) + " |")  # fmt: skip
        f_all = [mean(r["floor"].values()) for r in mine]
        means = [mean(r["left"][m] for r in mine if m in r["left"]) for m in methods]
        lines += [f"| mean | | {100 * mean(r['asr'] for r in mine):.1f} | {100 * mean(f_all):.1f} | "
                  f"{100 * max(max(r['floor'].values()) for r in mine):.1f} | "
                  + " | ".join(f"{100 * v:.1f}" for v in means) + " |", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        done = {json.loads(line)["model"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
        todo = {k: v for k, v in models().items() if k not in done}
        twins = {t.fingerprint(): t for _, lab, _ in todo.values() for t in (clean_twin(lab, s) for s in CLEAN_SEEDS)}
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            built = list(tqdm(pool.map(_build, [*twins.values(), *(lab for _, lab, _ in todo.values())]),
                              total=len(twins) + len(todo), desc="models"))  # fmt: skip
            clean = dict(zip(twins, built, strict=False))
            jobs = [(k, s, lab, path, {c: clean[clean_twin(lab, c).fingerprint()] for c in CLEAN_SEEDS}, rec)
                    for (k, (s, lab, rec)), path in zip(todo.items(), built[len(twins):], strict=True)]  # fmt: skip
            for row in tqdm(pool.map(_measure, jobs), total=len(jobs), desc="floors"):
                append(RESULTS, row)
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    write_text_atomic(RESULTS.with_suffix(".md"), report(rows))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
