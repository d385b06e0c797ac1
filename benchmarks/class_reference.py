"""Write the class reference that ships with onp-env (onp_env/signals/references/fashion-mnist.json): each
class's median trigger size, under the inversion and the latent shift, over the protocol's shadow
models (configs/agent/fashion-mnist-sampled.yaml's zoo: 30 small CNNs, all five attacks), a model's
own target class left out of that class's median (onp_env.signals.base.class_reference); and the
untargeted inversion's size in each form over the same models (`verdict`'s `untargeted`).

`verdict`, `nc`, the env's verdict signals and `onp detect --reference-from` read it with
reference_from=fashion-mnist (onp_env.signals.shipped): a user of a Fashion-MNIST small CNN then needs
no shadow models of their own. The per-model sizes are those onp_vs_baselines.py computes (each signal
at its defaults, seed 0, on the model's defense set) and are shared with it through RUNS/shadow-norms;
missing models and sizes are built here, one at a time, and each is kept as soon as it is made.

    ONP_CACHE=$PWD/benchmarks/runs/cache python benchmarks/class_reference.py [--untargeted-only]

`--untargeted-only` adds the untargeted sizes to the reference there and keeps its class sizes: the
shipped class sizes come from the first build of the 30 shadow models, the untargeted ones (added
2026-12-03) from a rebuild of the same configurations on another host. `--blend-only` adds, the same
way, each class's median size of its trigger inverted as a whole-image blend (signal name
`inversion_blend`, the inversion's settings; `verdict`'s `blend_verdict`; added 2026-12-04 from the
rebuild). `--spread-only --spread-seeds 0 1 ...` adds, per signal of `verdict`'s three class verdicts, each class's
median and spread of its log-ratio score over the shadow models whose target is another class (ClassSpread: `verdict`'s
`class_spread`), from verdict_choice.py's records of the shadow models with those defense seeds (both fractions); no
model is built or defended for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from onp_vs_baselines import fold_references, shadow_norms
from rows import exit_2_on_bad_input, read_verdict_choice
from tqdm import tqdm
from verdict_choice import results_of

import onp_env
from agents.config import load_agent_config
from agents.train import zoo_configs
from onp_env import build_artifact, load_artifact
from onp_env.artifacts import Artifact, write_text_atomic
from onp_env.signals import SIGNALS
from onp_env.signals.base import class_reference, log_ratio, log_spread, median_spread
from onp_env.signals.shipped import BLEND_SIGNAL, FORMAT, FORMAT_VERSION, READ_ONLY, REFERENCES, UNTARGETED_FORMS
from onp_env.signals.trigger_inversion import UNTARGETED_VERSION, InversionParams, invert, invert_untargeted

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "agent" / "fashion-mnist-sampled.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs" / "onp-sampled")
    p.add_argument("--out", type=Path, default=REFERENCES / "fashion-mnist.json")
    p.add_argument(
        "--untargeted-only",
        action="store_true",
        help="add (or replace) the untargeted sizes in the reference at --out, its class sizes kept",
    )
    p.add_argument(
        "--blend-only",
        action="store_true",
        help="add (or replace) the per-class blend sizes (inversion_blend) in the reference at --out, the rest kept",
    )
    p.add_argument(
        "--spread-only",
        action="store_true",
        help="add (or replace) each class verdict's per-class spread in the reference at --out, the rest kept",
    )
    p.add_argument("--spread-seeds", type=int, nargs="+", default=[0], help="the verdict_choice records' defense seeds")
    args = p.parse_args()
    if args.spread_only:
        signals = spread_signals(json.loads(args.out.read_text())["signals"], args.spread_seeds)
        amend(args.out, "spread", "--spread-only", signals=signals)
        print(f"{args.out}: per-class spreads from verdict_choice seeds {args.spread_seeds} added")
        return
    torch.set_num_threads(1)
    folder = args.runs / "shadow-norms"
    labs = zoo_configs(load_agent_config(str(CONFIG), []))
    norms, untargeted, blend, shape = {}, {}, {}, None
    for lab in tqdm(labs, desc="shadow models"):
        path = build_artifact(lab, progress=False)
        norms[lab.name] = kept(folder / f"{lab.name}.json", lambda p=path: shadow_norms(str(p))[0])
        art = load_artifact(path)
        if args.blend_only:
            blend[lab.name] = kept(folder / f"{lab.name}.blend.json", lambda a=art: blend_sizes(a))
        else:
            untargeted[lab.name] = kept(folder / f"{lab.name}.untargeted.json", lambda a=art: untargeted_sizes(a))
        model = art.manifest["model"]
        found = (type(art.model).__name__, sum(p.numel() for p in art.model.parameters()), list(model["in_shape"]),
                 model["num_classes"])  # fmt: skip
        if shape not in (None, found):
            raise SystemExit(f"the shadow models differ ({shape} and {found}): one reference describes one kind")
        shape = found
    assert shape is not None
    if args.untargeted_only:
        amend(args.out, "untargeted", "--untargeted-only", untargeted=untargeted_entry(list(untargeted.values())))
        print(f"{args.out}: untargeted sizes of {len(untargeted)} shadow models added")
        return
    if args.blend_only:
        names = sorted(blend)
        sizes = class_reference([torch.tensor(blend[n]) for n in names], [norms[n]["target"] for n in names])
        defaults = dataclasses.asdict(InversionParams())
        settings = {k: v for k, v in defaults.items() if k not in READ_ONLY}
        signals = json.loads(args.out.read_text())["signals"]
        signals[BLEND_SIGNAL] = {"version": SIGNALS["inversion"].version, "sizes": sizes.tolist(), "settings": settings}
        amend(args.out, "blend", "--blend-only", signals=signals)
        print(f"{args.out}: per-class blend sizes of {len(names)} shadow models added")
        return
    sizes = fold_references(norms)
    kind = dict(zip(("architecture", "parameters", "input_shape", "classes"), shape, strict=True))
    targets = {n: norms[n]["target"] for n in norms}
    write_reference(args.out, labs[0].data.name, kind, targets,
                    {"inversion": sizes["reference"], "latent_gap": sizes["latent_reference"]},
                    "benchmarks/class_reference.py",
                    untargeted=untargeted_entry(list(untargeted.values())))  # fmt: skip
    print(f"{args.out}: {len(norms)} shadow models")


SPREAD_SIGNALS = {"inversion": "inversion", "latent_gap": "latent_gap", "blend": BLEND_SIGNAL}
"""verdict_choice.py's name of each class verdict -> the reference's name of its signal."""


def spread_signals(signals: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """`signals` with each class verdict's ClassSpread added: per class, the median and spread of its log-ratio score
    against the reference's sizes over the shadow models' recorded cells (verdict_choice.py, defense `seeds`, both
    fractions), a model whose backdoor targets the class left out of that class's."""
    rows = [r for seed in seeds for r in read_verdict_choice(results_of(seed)) if r["role"] == "shadow"]
    models = len({r["model"] for r in rows})
    out = {name: dict(entry) for name, entry in signals.items()}
    for verdict, signal in SPREAD_SIGNALS.items():
        reference = torch.tensor(signals[signal]["sizes"], dtype=torch.float64)
        per_class: list[list[float]] = [[] for _ in reference]
        for r in rows:
            for cell in r["cells"]:
                score = log_ratio(torch.tensor(cell[verdict]["norms"], dtype=torch.float64), reference).tolist()
                for k, value in enumerate(score):
                    if r["mode"] != "all-to-one" or r["target"] != k:
                        per_class[k].append(value)
        spreads = [median_spread(values) for values in per_class]
        where = f"seeds {', '.join(map(str, seeds))}, 1% and 5% defense data"
        out[signal]["spread"] = {
            "median": [round(m, 6) for m, _ in spreads],
            "spread": [round(s, 6) for _, s in spreads],
            "from": f"verdict_choice.py's records of {models} shadow models, defense {where}",
        }
    return out


def kept(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON kept at `path`, computed and written first where it is missing: a rerun measures nothing twice."""
    if not path.is_file():
        write_text_atomic(path, json.dumps(compute()))
    return json.loads(path.read_text())


def amend(out: Path, what: str, flag: str, **entries: Any) -> None:
    """Add (or replace) `entries` in the reference at `out`, the rest kept, with a note of when `flag` added
    `what` (its `WHAT_added` entry)."""
    ref = json.loads(out.read_text())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ref |= {**entries, f"{what}_added": f"{now} by benchmarks/class_reference.py {flag}, on the models built then"}
    write_text_atomic(out, json.dumps(ref, indent=1) + "\n")


def untargeted_sizes(art: Artifact) -> dict[str, float]:
    """The untargeted inversion's size in each form (its default settings, seed 0) on the model's own
    defense set."""
    x, y = art.defense_set()
    return {form: float(invert_untargeted(art.model, x, y, InversionParams(), 0, torch.device("cpu"),
                                          form).norms[0]) for form in UNTARGETED_FORMS}  # fmt: skip


def blend_sizes(art: Artifact) -> list[float]:
    """Every class's trigger inverted as a whole-image blend (the inversion's default settings, seed 0) on the
    model's own defense set: its sizes."""
    x, y = art.defense_set()
    with torch.no_grad():
        classes = int(art.model(x[:1]).shape[1])
    return invert(art.model, x, y, classes, InversionParams(), 0, torch.device("cpu"), "blend").norms.tolist()


def untargeted_entry(sizes: list[dict[str, float]]) -> dict:
    """A shipped reference's `untargeted` entry (onp_env.signals.shipped.UntargetedSizes): per form, the
    median of the models' log sizes and their spread (1.4826 MAD)."""
    forms = {}
    for form in UNTARGETED_FORMS:
        med, spread = log_spread([s[form] for s in sizes])
        forms[form] = {"median_log": med, "spread": spread}
    defaults = dataclasses.asdict(InversionParams())
    return {"version": UNTARGETED_VERSION, "settings": {k: v for k, v in defaults.items() if k not in READ_ONLY},
            "forms": forms}  # fmt: skip


def write_reference(out: Path, data: str, kind: dict, targets: dict[str, int | None], sizes: dict[str, list[float]],
                    made_by: str, detect: dict | None = None, untargeted: dict | None = None) -> None:  # fmt: skip
    """Write a shipped class reference (onp_env.signals.shipped's format): `sizes` per verdict signal,
    measured at the signal's default settings, seed 0, on each model's own defense set; `kind`: the
    models' architecture, parameters, input_shape and classes; `targets`: model name -> its target."""
    signals = {}
    for name, values in sizes.items():
        defaults = dataclasses.asdict(SIGNALS[name].Params())
        signals[name] = {"version": SIGNALS[name].version, "sizes": values,
                         "settings": {k: v for k, v in defaults.items() if k not in READ_ONLY}}  # fmt: skip
    ref = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": out.stem, "data": data, **kind,
           "made_by": made_by, "library_version": onp_env.__version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "settings": "each signal with the settings below, seed 0, on each model's own defense set",
           "models": sorted(targets), "targets": [targets[n] for n in sorted(targets)], "signals": signals,
           **({"detect": detect} if detect is not None else {}),
           **({"untargeted": untargeted} if untargeted is not None else {})}  # fmt: skip
    write_text_atomic(out, json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    exit_2_on_bad_input(main)
