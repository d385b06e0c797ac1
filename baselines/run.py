"""A defense applied to an artifact: the pruned model in the artifact format, and report.json.

Only the artifact's defense set is given to the defense; the test split and the trigger are used
afterwards, to report ACC / ASR / RA / DER."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baselines import build_defense
from onp_env.artifacts import Artifact, load_artifact, write_artifact, write_text_atomic
from onp_env.data import defense_split
from onp_env.errors import OnpError
from onp_env.metrics import der, evaluate
from onp_env.registry import defense_class
from onp_env.zoo import cache_dir

RUN_KEYS = ("defense_fraction", "semantics", "seed")


def defense_subset(art: Artifact, fraction: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The artifact's defense set, or a stratified, seeded part of it that is `fraction` of the
    training split (e.g. 0.01 of a 0.05 defense set keeps a fifth of each class)."""
    x, y = art.defense_set()
    held = art.manifest["split"]["fraction"]
    if fraction is None or fraction == held:
        return x, y
    if not 0 < fraction < held:
        raise OnpError(
            f"defense_fraction must be in (0, {held}] for this artifact (its defense set is {held} of train)"
        )
    keep = defense_split(y, fraction / held, seed).defense_idx
    return x[keep], y[keep]


def _measure(model: nn.Module, art: Artifact, before: dict[str, Any]) -> dict[str, Any]:
    ds = art.dataset()
    m = evaluate(model, ds.test_x, ds.test_y, art.attack)
    if m["asr"] is not None and before["asr"] is not None:
        m["der"] = der(before, m)  # type: ignore[arg-type]
    else:
        m["der"] = None
    return m


def defend_artifact(path: str | Path, method: str, overrides: dict[str, Any] | None = None,
                    out: str | Path | None = None, progress: bool = False) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Run `method` on the artifact at `path`; returns (output directory, report). `progress` shows
    a progress bar for methods with a long optimisation loop (on stderr)."""
    art = load_artifact(path)
    overrides = dict(overrides or {})
    has_bar = "progress" in {f.name for f in dataclasses.fields(defense_class(method).Params)}
    if progress and has_bar:
        overrides.setdefault("progress", True)
    run = {k: overrides.pop(k) for k in RUN_KEYS if k in overrides}
    x, y = defense_subset(art, run.get("defense_fraction"), run.get("seed", 0))
    defense = build_defense(method, semantics=run.get("semantics", "zero"), seed=run.get("seed", 0), **overrides)
    start = time.perf_counter()
    result = defense.run(art.model, x, y)
    seconds = time.perf_counter() - start
    before = {k: art.metrics[k] for k in ("acc", "asr", "ra")}
    after = _measure(result.model, art, before)
    report: dict[str, Any] = {
        "method": method, **after, "pruned": len(result.pruned), "seconds": round(seconds, 2), "before": before,
        "defense_images": len(x), "artifact": str(art.path), "details": result.details,
    }  # fmt: skip
    if result.finetuned is not None:
        report["finetuned"] = _measure(result.finetuned, art, before)
    out = Path(out) if out is not None else cache_dir().parent / "defenses" / art.path.name / method
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        raise OnpError(f"{out} already exists: pass another --out or remove it")
    manifest = {**art.manifest, "name": f"{art.manifest['name']}-{method}",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": {k: after[k] for k in ("acc", "asr", "ra")},
                "defense": {"method": method, "source": art.manifest["fingerprint"], "pruned_units": result.pruned,
                            "masks": result.masks, "details": result.details}}  # fmt: skip
    write_artifact(out, result.model, manifest)
    if result.finetuned is not None:
        write_artifact(out / "finetuned", result.finetuned, {**manifest, "metrics": {
            k: report["finetuned"][k] for k in ("acc", "asr", "ra")}})  # fmt: skip
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    return out, report
