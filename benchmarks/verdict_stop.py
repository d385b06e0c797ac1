"""The `verdict` defense's stopping thresholds and its `inversion_first` rule, chosen on the defender's
own shadow models.

    python benchmarks/verdict_stop.py [--workers 2] [--report-only]
    python benchmarks/verdict_stop.py --rules inversion_first+candidates inversion_first+reinvert \
        --results benchmarks/results/verdict_sweep.md

`verdict` (baselines/verdict.py) stops following the inversion once its reversed trigger sends at
most `stop_asr` of the other classes' defense images to its class, and following the latent shift
once the suspected class's anomaly index, the pruned units ruled out, is at most `stop_index`. Their
defaults are Neural Cleanse's (5%, and its outlier threshold of 2). With `inversion_first` it
follows a flagged inversion that names the latent shift's class whatever the indices; RULES add the
latent sweep's probe or patience, and `--rules` grades others: the inversion sweep's `candidates` (5)
or `reinvert` (3), or the accuracy guard `max_acc_drop` at 0.02 in place of 0.05 (both sweeps). This
runs a grid of the thresholds and rules on the sampled zoo's
30 shadow models (configs/agent/fashion-mnist-sampled.yaml), each judged against the class
reference of the protocol fold that left its attack out (runs/onp-sampled/without-ATTACK/
reference.json, as onp_vs_baselines.py writes them for `verdict shadow reference`; written here
where missing), so that a model's own attack is as unseen as a held-out model's. The shadow models
are the defender's: their test splits and triggers may score the settings; the held-out models of
the protocol are not used. One JSON line per model, fraction and setting (resumable); writes
verdict_stop.md (or --results). Rules compared in one report must come from one run of the models
and references: a rebuilt zoo needs a --results file of its own."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from onp_vs_baselines import fold_reference_files
from rows import STOP_FLAGS, exit_2_on_bad_input, read_verdict_stop, stop_flags, stop_key
from tqdm import tqdm

from agents.config import load_agent_config
from agents.train import zoo_configs
from baselines.verdict import Verdict
from onp_env import build_artifact, load_artifact
from onp_env.artifacts import write_text_atomic
from onp_env.defend import defense_subset
from onp_env.metrics import der, evaluate
from onp_env.results import append

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "agent" / "fashion-mnist-sampled.yaml"
RUNS = HERE / "runs" / "onp-sampled"
RESULTS = HERE / "results" / "verdict_stop.md"
STOP_INDEX = (2.0, 1.0, 0.0)
STOP_ASR = (0.05, 0.02, 0.0)
RULES = ((), ("inversion_first",), ("inversion_first", "latent_probe"), ("inversion_first", "latent_patience"))
"""The rules graded by default, each a set of the flags on: the larger index, then inversion_first, then
also the latent probe or the latent patience (each against the rule before it without its last flag)."""
VALUES = {"candidates": 5, "reinvert": 3, "max_acc_drop": 0.02}
"""The parameter a flag sets where it is not a switch (fixed before any run, not graded)."""
CHANGES = {
    "latent_gap": {"latent_probe", "latent_patience", "max_acc_drop"},
    "inversion": {"candidates", "reinvert", "max_acc_drop"},
}
"""Flags that change the sweep that follows each signal (and no other)."""


def measure(model: str, path: str, attack: str, fraction: float, reference: dict, flags: tuple[str, ...] = (),
            same_as: list[dict] | None = None) -> list[dict]:  # fmt: skip
    """`verdict` with every threshold of the grid on one shadow model, with the `flags` on. Which signal
    it follows does not depend on the thresholds, and its sweep reads only one of them (`stop_index`
    on the latent shift without the probe, `stop_asr` otherwise): the other axis is not rerun. A model
    whose first run follows the signal its rows under the rule before (`same_as`) followed, where the
    new flag changes nothing on that signal, ran the very same sweeps: those rows are taken over."""
    torch.set_num_threads(1)
    art = load_artifact(path)
    x, y = defense_subset(art, fraction)
    ds = art.dataset()
    before = {k: art.metrics[k] for k in ("acc", "asr", "ra")}
    setting = dict.fromkeys(flags, True)  # as the rows name it

    def run(stop_index: float, stop_asr: float) -> tuple:
        params = {f: VALUES.get(f, True) for f in flags}
        defense = Verdict(stop_index=stop_index, stop_asr=stop_asr, **params, **reference)
        result = defense.run(art.model, x, y)
        return result, evaluate(result.model, ds.test_x, ds.test_y, art.attack)

    first = run(STOP_INDEX[0], STOP_ASR[0])
    follows = first[0].details["follows"]
    reads_index = follows == "latent_gap" and "latent_probe" not in flags
    same_sweep = not flags or flags[-1] not in CHANGES[follows]
    if same_as and same_as[0]["follows"] == follows and same_sweep:
        return [{**r, "key": stop_key(model, fraction, flags), **setting} for r in same_as]
    runs = {STOP_INDEX[0] if reads_index else STOP_ASR[0]: first}  # by the one threshold this model's sweep reads
    rows = []
    for stop_index in STOP_INDEX:
        for stop_asr in STOP_ASR:
            read = stop_index if reads_index else stop_asr
            if read not in runs:
                runs[read] = run(stop_index, stop_asr)
            result, after = runs[read]
            rows.append({"key": stop_key(model, fraction, flags), "model": model, "attack": attack,
                         "fraction": fraction, **setting, "stop_index": stop_index, "stop_asr": stop_asr,
                         "follows": follows, **after, "der": der(before, after), "before": before,
                         "pruned": len(result.pruned)})  # fmt: skip
    return rows


def report(
    rows: list[dict], command: str = "python benchmarks/verdict_stop.py", source: str = "verdict_stop.jsonl"
) -> str:
    by_setting: dict[tuple, list[dict]] = {}
    for r in rows:
        by_setting.setdefault((stop_flags(r), r["stop_index"], r["stop_asr"]), []).append(r)
    n = {len(v) for v in by_setting.values()}
    models = len({r["model"] for r in rows})

    def ms(values: list[float], scale: float = 100.0) -> str:
        return f"{statistics.mean(values) * scale:.1f} ± {statistics.pstdev(values) * scale:.1f}"

    def score(rs: list[dict]) -> tuple[float, float]:
        return statistics.mean(r["der"] for r in rs), -statistics.mean(r["before"]["acc"] - r["acc"] for r in rs)

    best = max(by_setting, key=lambda k: score(by_setting[k]))
    lines = [
        "# `verdict`'s stopping thresholds on the shadow models",
        "",
        f"Generated by `{command}` from `{source}`: the `verdict` defense on "
        f"{models} shadow models of `configs/agent/fashion-mnist-sampled.yaml` (all-to-all draws included), "
        f"{', '.join(f'{f:g}' for f in sorted({r['fraction'] for r in rows}))} of the training split as defense data, "
        "each model judged against the class reference of the protocol fold that left its attack out. Mean ± std "
        f"over {'/'.join(map(str, sorted(n)))} runs per setting, in %; ACC lost in points. `stop_asr` ends a sweep "
        "that follows the inversion, `stop_index` one that follows the latent shift; `inversion_first` follows a "
        "flagged inversion that names the latent shift's class whatever the indices; `latent_probe` stops a latent "
        "sweep by the shift's own rate, `latent_patience` only after two cuts in a row below the line; `candidates` "
        "cuts, of the inversion's next 5 units, the one that keeps the most defense accuracy and takes the most "
        "reversed-trigger probability, `reinvert` inverts again (at most 3 times) once the reversed trigger fails "
        "and goes on while the suspected class stays flagged, `max_acc_drop` ends either sweep before a cut that "
        "takes defense accuracy 2 points below the unpruned model's (5 otherwise). The setting with the best mean "
        "DER (then the least accuracy lost) is marked: chosen here, on the defender's models, it is the one "
        "held-out models are run with ("
        + (
            "`verdict shadow stop` for the thresholds alone, `verdict shadow first` for all three in "
            "onp_vs_baselines.py)."
            if source == "verdict_stop.jsonl"
            else "`verdict shipped candidates` in verdict_rule.py)."
        ),  # fmt: skip
        "",
        "| rule | stop_index | stop_asr | n | ACC lost | ASR % | DER % | pruned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(by_setting.items(), key=lambda kv: (len(kv[0][0]), -kv[0][1], -kv[0][2]))
    for (first, si, sa), rs in order:
        mark = "**" if (first, si, sa) == best else ""
        lost = ms([r["before"]["acc"] - r["acc"] for r in rs])
        bold = [f"{mark}{v}{mark}" for v in (_rule(first), f"{si:g}", f"{sa:g}")]
        lines.append(f"| {' | '.join(bold)} | {len(rs)} | {lost} "
                     f"| {ms([r['asr'] for r in rs])} | {mark}{ms([r['der'] for r in rs])}{mark} "
                     f"| {ms([r['pruned'] for r in rs], 1)} |")  # fmt: skip
    lines += ["", "## Per attack, each setting's mean DER % (followed: the share of runs on the latent shift)", ""]
    attacks = sorted({r["attack"] for r in rows})
    lines += ["| rule | stop_index | stop_asr | " + " | ".join(attacks) + " |",
              "|---|---:|---:|" + "---:|" * len(attacks)]  # fmt: skip
    for (first, si, sa), rs in order:
        cells = []
        for a in attacks:
            sel = [r for r in rs if r["attack"] == a]
            if not sel:  # a run in progress
                cells.append("")
                continue
            lat = sum(r["follows"] == "latent_gap" for r in sel) / len(sel)
            cells.append(f"{statistics.mean(r['der'] for r in sel) * 100:.1f} ({lat:.0%})")
        lines.append(f"| {_rule(first)} | {si:g} | {sa:g} | " + " | ".join(cells) + " |")
    chosen = ", ".join([*(f"`{f}`" for f in best[0]), f"`stop_index={best[1]:g}`", f"`stop_asr={best[2]:g}`"])
    return "\n".join([*lines, "", f"Chosen: {chosen}.", ""])


def _flags(text: str) -> tuple[str, ...]:
    """A rule named on the command line: its flags joined by +, in STOP_FLAGS' order."""
    flags = () if text == "larger" else tuple(text.split("+"))
    if flags != tuple(f for f in STOP_FLAGS if f in flags):
        raise argparse.ArgumentTypeError(f"{text!r}: flags are {', '.join(STOP_FLAGS)}, each once, in that order")
    return flags


def _rule(flags: tuple[str, ...]) -> str:
    return " + ".join(flags) or "larger index"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=Path, default=RUNS, help="the protocol's runs (its folds' reference.json)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--rules", nargs="+", type=_flags, default=list(RULES),
                   help="rules to grade, each its flags joined by + (e.g. inversion_first+candidates; 'larger' for "
                        "none); the rule without its last flag is graded beside it (default: RULES)")  # fmt: skip
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    rules_named = [] if args.rules == list(RULES) else ["--rules", *("+".join(r) or "larger" for r in args.rules)]
    out = args.results.resolve()
    shown = out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out
    results_named = [] if out == RESULTS else ["--results", str(shown)]
    command = " ".join(["python benchmarks/verdict_stop.py", *rules_named, *results_named])
    rules = list(dict.fromkeys(x for r in args.rules for x in ((r[:-1], r) if r else (r,))))  # with the rule before
    jsonl = args.results.with_suffix(".jsonl")
    if not args.report_only:
        cfg = load_agent_config(str(CONFIG), [])
        labs = zoo_configs(cfg)
        rows = read_verdict_stop(jsonl)
        done = {r["key"] for r in rows}
        jobs = [(lab, f, rule) for rule in rules for lab in labs for f in args.fractions
                if stop_key(lab.name, f, rule) not in done]  # fmt: skip
        paths = {lab.name: str(build_artifact(lab, progress=False)) for lab in labs}  # cached by the protocol
        attacks = sorted({lab.attack.name for lab in labs})
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, ctx, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            refs = fold_reference_files(pool, args.runs, CONFIG, paths, attacks)
            # under the rule before: its rows (the key of a rule without a flag is the model's own)
            before = {(lab.name, f, rule): [r for r in rows if rule and r["key"] == stop_key(lab.name, f, rule[:-1])]
                      for lab, f, rule in jobs}  # fmt: skip
            futures = [pool.submit(measure, lab.name, paths[lab.name], lab.attack.name, f, refs[lab.attack.name],
                                   rule, before[lab.name, f, rule] or None) for lab, f, rule in jobs]  # fmt: skip
            for fut in tqdm(as_completed(futures), total=len(futures), desc="shadow models"):
                for row in fut.result():
                    append(jsonl, row)
                write_text_atomic(args.results, report(read_verdict_stop(jsonl), command, jsonl.name))
    write_text_atomic(args.results, report(read_verdict_stop(jsonl), command, jsonl.name))


if __name__ == "__main__":
    exit_2_on_bad_input(main)
