"""A suite's pinned zoo: its shipped manifest, and building its models through the lab cache.

The manifest (onp_env/suite/manifests/{suite}.json) lists every model of every split: its stable name,
its lab config's fingerprint and attack, its clean ACC / ASR / RA and the SHA-256 of its weights as
built on the reference machine. Building here trains each model through the lab's cache (once), then
compares it with the manifest: identical weights, or ACC and ASR within the suite's tolerance (torch
builds and CPUs do not give bit-identical weights), or a clear warning naming the model that is not.

The manifest is input like any other: its size is capped, its structure checked, and every model's
name, split and fingerprint must be those the recipe (onp_env/suite/spec.py) derives, so an edited
manifest is refused before anything is trained."""

from __future__ import annotations

import json
import math
import platform
import re
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onp_env.artifacts import load_artifact, read_json, write_text_atomic
from onp_env.config import LabConfig
from onp_env.errors import OnpError
from onp_env.suite.spec import SPLITS, SuiteSpec

MANIFESTS = Path(__file__).resolve().parent / "manifests"
FORMAT = "onp-suite-manifest/1"
MANIFEST_LIMIT = 1 << 20
HEX64 = re.compile(r"[0-9a-f]{64}")


class ZooMismatchWarning(UserWarning):
    """A model built here is outside the manifest's tolerance: its scores are not the reference's."""


@dataclass(frozen=True)
class SuiteModel:
    name: str
    split: str
    path: Path
    entry: dict[str, Any]
    """The manifest's record of it."""
    status: str
    """identical (same weights hash), within (ACC/ASR within tolerance) or outside."""
    metrics: dict[str, float]
    """Clean ACC / ASR / RA of the model built here."""
    sha256: str
    """Of its weights, built here."""


def manifest_path(spec: SuiteSpec) -> Path:
    return MANIFESTS / f"{spec.name}.json"


def _fix(spec: SuiteSpec) -> str:
    return f"reinstall onp-env, or rebuild it with `onp suite build {spec.name} --write-manifest` and bump the version"


def read_manifest(spec: SuiteSpec, path: Path | None = None) -> dict[str, Any]:
    """The suite's manifest, checked against its recipe; OnpError (one line) on anything else."""
    path = manifest_path(spec) if path is None else Path(path)
    if not path.is_file():
        raise OnpError(f"suite {spec.name} has no manifest at {path}: it is not pinned in this release of onp-env "
                       f"(maintainers pin it with `onp suite build {spec.name} --write-manifest`)")  # fmt: skip
    data = read_json(path, MANIFEST_LIMIT, _fix(spec))
    where = f"manifest {path.name}"
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("suite") != spec.name:
        raise OnpError(f"{where} is not a {FORMAT} manifest of suite {spec.name}: {_fix(spec)}")
    models = data.get("models")
    labs = [(name, split, lab) for split in SPLITS for name, lab in spec.labs(split)]
    expected = [(name, split, lab.fingerprint()) for name, split, lab in labs]
    if not isinstance(models, list) or len(models) != len(expected):
        raise OnpError(f"{where} lists {len(models) if isinstance(models, list) else 'no'} models but the recipe "
                       f"has {len(expected)}: {_fix(spec)}")  # fmt: skip
    for m, (name, split, fingerprint) in zip(models, expected, strict=True):
        if not isinstance(m, dict):
            raise OnpError(f"{where}: a model entry is not a mapping: {_fix(spec)}")
        got = (m.get("name"), m.get("split"), m.get("fingerprint"))
        if got != (name, split, fingerprint):
            raise OnpError(f"{where}: entry {str(got[0])[:80]!r} does not match the recipe's {name} (split "
                           f"{split}, fingerprint {fingerprint}): the manifest was edited; {_fix(spec)}")  # fmt: skip
        for key in ("acc", "asr", "ra"):
            v = m.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v <= 1) or math.isnan(v):
                raise OnpError(f"{where}: {name}.{key} must be a number in [0, 1]: {_fix(spec)}")
        if not isinstance(m.get("sha256"), str) or not HEX64.fullmatch(m["sha256"]):
            raise OnpError(f"{where}: {name}.sha256 must be 64 hex digits: {_fix(spec)}")
    for m, (name, _, lab) in zip(models, labs, strict=True):
        if m.get("attack") != attack_record(lab):
            raise OnpError(f"{where}: {name}.attack is not the recipe's: the manifest was edited; {_fix(spec)}")
    return data


def attack_record(lab: LabConfig) -> dict[str, Any]:
    """A suite model's attack as its manifest entry records it (JSON types)."""
    a = lab.attack
    assert a is not None  # every suite model is backdoored
    record = {"name": a.name, "label": a.label, "target": a.target, "mode": a.mode, "poison_rate": a.poison_rate,
              "params": a.params}  # fmt: skip
    return json.loads(json.dumps(record))


def _metrics(measured: dict[str, float | None]) -> dict[str, float]:
    """Clean ACC, ASR and RA of a suite model (every one is backdoored: none is None)."""
    out = {k: measured[k] for k in ("acc", "asr", "ra")}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise OnpError(f"a suite model has no {', '.join(missing)}: it must be a backdoored model")
    return {k: float(v) for k, v in out.items() if v is not None}


def _status(spec: SuiteSpec, entry: dict[str, Any], sha: str, metrics: dict[str, float]) -> str:
    if sha == entry["sha256"]:
        return "identical"
    close = all(abs(metrics[k] - entry[k]) <= spec.tolerance[k] for k in spec.tolerance)
    return "within" if close else "outside"


def _build_paths(labs: list[tuple[str, LabConfig]], cache: str | Path | None, progress: bool, desc: str,
                 workers: int) -> list[Path]:  # fmt: skip
    """Each lab config's artifact, trained where not cached; `workers` > 1 trains in that many spawned
    processes (each model trains on the threads its config names, so the weights do not depend on it).
    Spawned workers import the library afresh: what a script registered or patched at run time is not
    there, and the script needs an `if __name__ == "__main__":` guard."""
    from onp_env.zoo import build_artifact, cache_dir, find_cached, reference_config  # the lab, on use only

    root = Path(cache) if cache is not None else cache_dir()
    missing = [lab for _, lab in labs if not root.is_dir() or find_cached(lab, root) is None]
    if workers > 1 and len(missing) > 1:
        # a TrojanNN model waits for the clean model its trigger is optimised on, trained once for all
        after: dict[str, list[LabConfig]] = {}
        first: list[LabConfig] = []
        for lab in missing:
            ref = reference_config(lab)
            if ref is None:
                first.append(lab)
            else:
                if ref.fingerprint() not in after:
                    first.append(ref)
                after.setdefault(ref.fingerprint(), []).append(lab)
        with ProcessPoolExecutor(workers, get_context("spawn")) as pool, \
                tqdm(total=len(missing), desc=f"{desc} (training)", disable=not progress) as bar:  # fmt: skip
            running = {pool.submit(build_artifact, lab, root, False): lab for lab in first}
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        lab = running.pop(f)
                        f.result()
                        bar.update(lab in missing)
                        for waiting in after.pop(lab.fingerprint(), []):
                            running[pool.submit(build_artifact, waiting, root, False)] = waiting
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the first error, not after every build
                raise
    return [build_artifact(lab, root, progress=False) for _, lab in tqdm(labs, desc=desc, disable=not progress)]


def build_split(spec: SuiteSpec, split: str, cache: str | Path | None = None, progress: bool = True,
                manifest: Path | None = None, workers: int = 1,
                names: list[str] | None = None) -> list[SuiteModel]:  # fmt: skip
    """Every model of `split` (or only those `names` lists, in the split's order), built (or found) in the
    lab cache and compared with the manifest. A model outside the tolerance warns (ZooMismatchWarning)
    with its numbers; it is still returned. `workers` processes train the missing models (the same
    weights as one)."""
    if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
        raise OnpError(f"workers must be a whole number >= 1, got {workers!r}")
    entries = {m["name"]: m for m in read_manifest(spec, manifest)["models"]}
    out = []
    labs = spec.labs(split)
    if names is not None:
        known = [name for name, _ in labs]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise OnpError(f"no model {(unknown or [''])[0]!r} in {spec.name}/{split}: name some of {known[0]} .. "
                           f"{known[-1]} (`onp suite list {spec.name} --split {split}`)")  # fmt: skip
        labs = [(name, lab) for name, lab in labs if name in names]
    paths = _build_paths(labs, cache, progress, f"{spec.name} {split}", workers)
    for (name, _), path in zip(labs, paths, strict=True):
        art = load_artifact(path)
        metrics = _metrics(art.metrics)
        sha = art.manifest["weights"]["sha256"]
        status = _status(spec, entries[name], sha, metrics)
        if status == "outside":
            e = entries[name]
            warnings.warn(
                f"{name} built here has ACC {metrics['acc']:.3f} / ASR {metrics['asr']:.3f}, the manifest "
                f"{e['acc']:.3f} / {e['asr']:.3f} (tolerance {spec.tolerance['acc']} / {spec.tolerance['asr']}): "
                "scores on it are not comparable with the reference's; report it with your results",
                ZooMismatchWarning,
                stacklevel=2,
            )
        out.append(SuiteModel(name, split, path, entries[name], status, metrics, sha))
    return out


def write_manifest(spec: SuiteSpec, cache: str | Path | None = None, progress: bool = True,
                   path: Path | None = None, workers: int = 1) -> Path:  # fmt: skip
    """Build every split and write the manifest (the maintainers' step when a version is created)."""
    from onp_env import __version__

    models = []
    for split in SPLITS:
        labs = spec.labs(split)
        for (name, lab), built in zip(labs, _build_paths(labs, cache, progress, f"{spec.name} {split}", workers),
                                      strict=True):  # fmt: skip
            art = load_artifact(built)
            models.append({"name": name, "split": split, "fingerprint": lab.fingerprint(), "seed": lab.seed,
                           "attack": attack_record(lab),
                           **{k: round(v, 6) for k, v in _metrics(art.metrics).items()},
                           "sha256": art.manifest["weights"]["sha256"]})  # fmt: skip
    data = {"format": FORMAT, "suite": spec.name, "library": __version__, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": models}  # fmt: skip
    out = manifest_path(spec) if path is None else Path(path)
    write_text_atomic(out, json.dumps(data, indent=1) + "\n")
    return out
