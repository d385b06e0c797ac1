"""The held-out Fashion-MNIST models on which trigger-free signals and detection are measured.

    python benchmarks/signal_models.py [--workers 2]

Per attack of the agent config's zoo (configs/agent/fashion-mnist.yaml: its recipe and trigger
settings), three models with seeds 101-103, each with another target class (0, 3, 7): a signal or
a detector that always names class 0 cannot look good here. Three clean models (seeds 101-103)
for detection, and the reference models a defender would train (`shadows`). Trained through the lab
cache in benchmarks/runs/cache (resumable: a finished model is never trained twice)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.config import load_agent_config
from onp_env import build_artifact
from onp_env.config import LabConfig

HERE = Path(__file__).resolve().parent
CACHE = HERE / "runs" / "cache"
SEEDS_TARGETS = ((101, 0), (102, 3), (103, 7))


def held_out() -> list[LabConfig]:
    """(attack models, 5 x 3) then (clean models, 3)."""
    cfg = load_agent_config(str(HERE.parent / "configs" / "agent" / "fashion-mnist.yaml"), [])
    base = cfg.zoo.base
    out = []
    for attack in cfg.attack_configs():
        for seed, target in SEEDS_TARGETS:
            a = dataclasses.replace(attack, target=target)
            out.append(dataclasses.replace(base, name=f"signals-{attack.name}-s{seed}-t{target}", seed=seed, attack=a))
    out += [dataclasses.replace(base, name=f"signals-clean-s{s}", seed=s, attack=None) for s, _ in SEEDS_TARGETS]
    return out


def shadows() -> list[LabConfig]:
    """The agent config's shadow zoo (every attack, seeds 1-2, target 0) and two clean models of the
    same recipe (seeds 1-2): the reference models a defender trains for itself."""
    from agents.train import zoo_configs

    cfg = load_agent_config(str(HERE.parent / "configs" / "agent" / "fashion-mnist.yaml"), [])
    clean = [dataclasses.replace(cfg.zoo.base, name=f"fashion-mnist-shadow-clean-s{s}", seed=s, attack=None)
             for s in cfg.zoo.seeds]  # fmt: skip
    return zoo_configs(cfg) + clean


def sampled_and_held_out() -> list[tuple[str, str, LabConfig]]:
    """(name, role, lab) of the sampled shadow zoo of configs/agent/fashion-mnist-sampled.yaml (role
    `shadow`) and of held_out()'s backdoored models (role `held-out`)."""
    from agents.train import zoo_configs

    cfg = load_agent_config(str(HERE.parent / "configs" / "agent" / "fashion-mnist-sampled.yaml"), [])
    shadow = [(lab.name, "shadow", lab) for lab in zoo_configs(cfg)]
    return shadow + [(lab.name, "held-out", lab) for lab in held_out() if lab.attack is not None]


def measure_models(results: Path, done: set[str], models: list[tuple[str, str, LabConfig]], workers: int,
                   measure: Callable[..., dict[str, Any]], *args: Any) -> None:  # fmt: skip
    """`measure(name, role, artifact path, *args)` for each model not in `done`, in `workers` spawned
    processes, each model built through the cache first; every row appended to `results` as it comes."""
    from onp_env.results import append

    todo = [m for m in models if m[0] not in done]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        paths = dict(zip([m[0] for m in todo], pool.map(_build, [m[2] for m in todo]), strict=True))
        futures = [pool.submit(measure, name, role, paths[name], *args) for name, role, _ in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="models"):
            append(results, fut.result())


Rows = list[dict[str, Any]]


def read_rows(results: Path) -> Rows:
    """The rows of a results file, one JSON line each."""
    return [json.loads(line) for line in results.read_text().splitlines()]


def complete_rows(results: Path, models: list[tuple[str, str, LabConfig]], workers: int,
                  measure: Callable[..., dict[str, Any]],
                  missing: Callable[[dict[str, Any]], list[str]]) -> None:  # fmt: skip
    """Rows of `results` (what they measured under `cells`) that lack some of what `measure` now
    measures (`missing(row)`: the parts it lacks), measured for those parts only (`measure(name, role,
    path, parts)` returns a row with their cells), merged into their rows; the file is rewritten
    atomically after each model."""
    from onp_env.artifacts import write_text_atomic

    rows = read_rows(results)
    todo = {r["model"]: missing(r) for r in rows if missing(r)}
    if not todo:
        return
    labs = {name: (role, lab) for name, role, lab in models}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        paths = dict(zip(todo, pool.map(_build, [labs[n][1] for n in todo]), strict=True))
        futures = {pool.submit(measure, n, labs[n][0], paths[n], parts): n for n, parts in todo.items()}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="models, completed"):
            new = fut.result()
            rows = [{**r, "cells": {**r.get("cells", {}), **new["cells"]}} if r["model"] == new["model"] else r
                    for r in rows]  # fmt: skip
            write_text_atomic(results, "".join(json.dumps(r) + "\n" for r in rows))


def per_set_main(doc: str, flag: str, models_of: dict[str, Callable[[], list[tuple[str, str, LabConfig]]]],
                 results_of: Callable[[str], Path], measure: Callable[..., dict[str, Any]],
                 report: Callable[[Rows], str]) -> None:  # fmt: skip
    """per_model_main over the models of one set, named by `flag` (required; its value goes to `measure` after the
    artifact path): `models_of` maps each value to its models, `results_of` to its results file."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument(flag, choices=list(models_of), required=True)
    value = getattr(peek.parse_known_args()[0], flag.lstrip("-").replace("-", "_"))
    per_model_main(doc, results_of(value), models_of[value](), measure, report,
                   option=(flag, {"choices": list(models_of), "required": True}, results_of))  # fmt: skip


def per_model_main(doc: str, results: Path, models: list[tuple[str, str, LabConfig]],
                   measure: Callable[..., dict[str, Any]], report: Callable[[Rows], str],
                   complete: Callable[[dict[str, Any]], list[str]] | None = None,
                   option: tuple[str, dict[str, Any], Callable[[Any], Path]] | None = None) -> None:  # fmt: skip
    """A per-model benchmark's command line (`--workers N`, `--report-only`): measure the models not yet
    in `results` (measure_models), complete the rows that lack parts (complete_rows, where `complete`
    names a row's missing parts), then write report(rows, in the models' order) beside it as .md.
    `option` = (flag, argparse settings, results file of a value): one more argument, passed to `measure`
    after the artifact path, whose value chooses the results file (each value's rows in their own)."""
    if option is not None and complete is not None:  # complete_rows passes `parts` where the option's value would go
        raise TypeError("per_model_main takes `option` or `complete`, not both")
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    if option is not None:
        p.add_argument(option[0], **option[1])
    args = p.parse_args()
    extra = () if option is None else (getattr(args, option[0].lstrip("-").replace("-", "_")),)
    if option is not None:
        results = option[2](extra[0])
    done = {r["model"] for r in read_rows(results)} if results.is_file() else set()
    if not args.report_only:
        measure_models(results, done, models, args.workers, measure, *extra)
        if complete is not None:
            complete_rows(results, models, args.workers, measure, complete)
    order = {name: i for i, (name, _, _) in enumerate(models)}
    rows = sorted(read_rows(results), key=lambda r: order[r["model"]])
    out = results.with_suffix(".md")
    out.write_text(report(rows))
    print(out)


def _build(lab: LabConfig) -> str:
    import torch

    torch.set_num_threads(1)
    return str(build_artifact(lab, CACHE, progress=False))


def build_all(workers: int) -> list[str]:
    labs = held_out() + shadows()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(tqdm(pool.map(_build, labs), total=len(labs), desc="models"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    for path in build_all(p.parse_args().workers):
        print(path)
