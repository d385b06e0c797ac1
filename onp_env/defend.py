"""A defense applied to an artifact: the pruned model in the artifact format, and report.json.

The defense is any registered one (onp_env.registry: the heuristic baselines, the learned ONP, or a
user's own), found by name, so that the lab and its CLI never import the packages above them; its
`run(model, x, y)` returns a result with the pruned `model`, `pruned` units, `masks`, `details` and
an optional `finetuned` model (baselines.common.DefenseResult).

Only the artifact's defense set is given to the defense; the test split and the trigger are used
afterwards, to report ACC / ASR / RA / DER.

Everything a run is given (method, its parameters, the run keys, the output folder) is checked
before the defense starts, and the output folder appears whole or not at all: it is built in a
hidden sibling folder and renamed into place."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onp_env.artifacts import Artifact, load_artifact, staging_folder, write_artifact, write_text_atomic
from onp_env.config import bounded, from_dict
from onp_env.data import defense_split
from onp_env.devices import resolve_device
from onp_env.errors import OnpError
from onp_env.masking import SEMANTICS
from onp_env.metrics import der, evaluate
from onp_env.presets import preset_of
from onp_env.registry import defense_class
from onp_env.zoo import cache_dir


@dataclass
class RunParams:
    """The keys of a defense run that are not the method's own parameters."""

    defense_fraction: float | None = bounded(None, gt=0, lt=1)
    """Share of the training split given to the defense, at most the artifact's defense set (its
    split.fraction); None: the whole defense set."""
    semantics: str = "zero"
    """How a pruned unit is removed: zero (its whole output) or gamma (only the BatchNorm weight)."""
    seed: int = bounded(0, ge=0, lt=2**63)
    """Seed of the defense and of the defense_fraction subset."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (a GPU when torch sees one): where the defense runs and the model is
    measured. Part of the result (GPU kernels sum in other orders); the outputs are written as always."""


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunParams))


def check_run(run: dict[str, Any], where: str) -> RunParams:
    """The run keys (defense_fraction, semantics, seed, device), typed and checked."""
    params = from_dict(RunParams, run, f"{where} run")
    if params.semantics not in SEMANTICS:
        raise OnpError(f"{where} run.semantics must be one of {', '.join(SEMANTICS)}, got {params.semantics!r}")
    resolve_device(params.device)
    return params


def defense_subset(art: Artifact, fraction: float | None, seed: int = 0,
                   root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The artifact's defense set, or a stratified, seeded part of it that is `fraction` of the
    training split (e.g. 0.01 of a 0.05 defense set keeps a fifth of each class)."""
    x, y = art.defense_set(root)
    held = art.manifest["split"]["fraction"]
    if fraction is None or fraction == held:
        return x, y
    if not 0 < fraction < held:
        raise OnpError(
            f"defense_fraction must be in (0, {held}] for this artifact (its defense set is {held} of train)"
        )
    keep = defense_split(y, fraction / held, seed).defense_idx
    return x[keep], y[keep]


def _measure(model: nn.Module, art: Artifact, before: dict[str, Any] | None, root: str | None,
             device: torch.device) -> dict[str, Any]:  # fmt: skip
    ds = art.dataset(root)
    m = evaluate(copy.deepcopy(model).to(device), ds.test_x, ds.test_y, art.attack)  # a copy: writers take the CPU one
    if before is None:
        return m
    if m["asr"] is not None and before["asr"] is not None:
        m["der"] = der(before, m)  # type: ignore[arg-type]
    else:
        m["der"] = None
    return m


def _check_output(out: Path) -> None:
    """Refuse an output folder that exists or cannot be a folder, before any work is done."""
    if out.exists() or out.is_symlink():
        raise OnpError(f"{out} already exists: pass another --out or remove it")
    for parent in out.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise OnpError(f"cannot write {out}: {parent} is a file, not a folder; pass another --out")
            return


def _staging_folder(out: Path) -> Path:
    """A fresh hidden folder beside `out` (same file system, so the final rename is atomic); making
    it is also the test that `out` can be written at all. A run killed outright leaves only this
    folder behind, under another name than `out`, so it never blocks the next run."""
    try:
        return staging_folder(out)
    except OSError as e:
        raise OnpError(f"cannot write {out}: {e.strerror or e}; pass another --out") from e


def _run(defense: Any, method: str, art: Artifact, x: torch.Tensor, y: torch.Tensor, before: dict[str, Any],
         root: str | None, device: torch.device) -> tuple[Any, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The defense and its measurements: (result, report, manifest of the pruned model)."""
    start = time.perf_counter()
    result = defense.run(art.model, x, y)
    seconds = time.perf_counter() - start
    after = _measure(result.model, art, before, root, device)
    report: dict[str, Any] = {
        "method": method, **after, "pruned": len(result.pruned), "seconds": round(seconds, 2), "before": before,
        "defense_images": len(x), "artifact": str(art.path), "details": result.details,
    }  # fmt: skip
    if result.finetuned is not None:
        report["finetuned"] = _measure(result.finetuned, art, before, root, device)
    manifest = {**art.manifest, "name": f"{art.manifest['name']}-{method}",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": {k: after[k] for k in ("acc", "asr", "ra")},
                "defense": {"method": method, "source": art.manifest["fingerprint"], "pruned_units": result.pruned,
                            "masks": result.masks, "details": result.details}}  # fmt: skip
    return result, report, manifest


def _write(folder: Path, result: Any, report: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The output folder: the pruned model as an artifact, finetuned/ (if any) and report.json."""
    write_artifact(folder, result.model, manifest)
    if result.finetuned is not None:
        write_artifact(folder / "finetuned", result.finetuned, {**manifest, "metrics": {
            k: report["finetuned"][k] for k in ("acc", "asr", "ra")}})  # fmt: skip
    write_text_atomic(folder / "report.json", json.dumps(report, indent=1))


def defend_artifact(path: str | Path | Artifact, method: str, overrides: dict[str, Any] | None = None,
                    out: str | Path | None = None, progress: bool = False, data_root: str | None = None,
                    preset: str | None = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Run `method` on the artifact at `path` (or an already loaded Artifact); returns (output
    directory, report). `overrides` holds the method's parameters and the run keys (RunParams);
    `progress` shows progress bars (on stderr) for methods with long steps; `data_root` is the
    dataset folder for artifacts trained on data of your own (a manifest's own path is not followed);
    `preset` names parameters the method lists (onp_env.presets), which `overrides` then change.

    Everything is checked before the defense runs, and `out` is written whole or not at all."""
    cls = defense_class(method)
    chosen = None if preset is None else preset_of(cls, preset)
    if out is not None:
        _check_output(Path(out))
    overrides = dict(overrides or {})
    run = check_run({k: overrides.pop(k) for k in RUN_KEYS if k in overrides}, method)
    if progress and "progress" in {f.name for f in dataclasses.fields(cls.Params)}:
        overrides.setdefault("progress", True)
    device = resolve_device(run.device)
    # checks its parameters' types and ranges; a preset's as it reads with few images and with many, the one for this
    # defense set kept once its size is known
    if chosen is None:
        defense = cls(semantics=run.semantics, seed=run.seed, device=run.device, **overrides)
    else:
        few, many = (
            cls(semantics=run.semantics, seed=run.seed, device=run.device, **p) for p in chosen.both(overrides)
        )
    art = path if isinstance(path, Artifact) else load_artifact(path)
    x, y = defense_subset(art, run.defense_fraction, run.seed, data_root)
    if chosen is not None:
        defense = few if chosen.is_few(len(x)) else many
    try:
        defense.check_inputs(art.model, x[:2])
    except OnpError as e:  # e.g. a shipped reference refusing another kind of model
        if chosen is None or not chosen.scope:
            raise
        raise OnpError(f"{e} (preset {preset!r} is for {chosen.scope})") from e
    out = Path(out) if out is not None else cache_dir().parent / "defenses" / art.path.name / method
    _check_output(out)
    # measured, not the manifest's claim (a crafted manifest could inflate the DER); this also builds
    # the attack and reads the test split, so a broken artifact fails before the defense runs
    before = {k: v for k, v in _measure(art.model, art, None, data_root, device).items() if k in ("acc", "asr", "ra")}
    staging = _staging_folder(out)
    try:
        result, report, manifest = _run(defense, method, art, x, y, before, data_root, device)
        if preset is not None:
            report["preset"] = preset
        folder = staging / "out"  # built whole here, then renamed into place in one step
        _write(folder, result, report, manifest)
        if out.exists():  # made by someone else while the defense ran: never replace it
            raise OnpError(f"{out} already exists: pass another --out or remove it")
        os.rename(folder, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, report
