"""The `onp` command line. Every subcommand exits non-zero with a one-line reason on bad input.

The lab's commands live here; packages above the lab add theirs through the entry points of group
`onp_env.commands` (onp_env.registry), as the agents package adds `train-agent`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from onp_env.errors import OnpError
from onp_env.registry import command_plugins


def _attack(args: argparse.Namespace) -> None:
    from onp_env.config import LabConfig, load_config
    from onp_env.zoo import build_artifact

    cfg = load_config(LabConfig, args.config, args.set)
    print(build_artifact(cfg, args.out, progress=not args.quiet))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with long index lists replaced by their lengths."""
    out = json.loads(json.dumps(manifest))
    out["split"]["defense_indices"] = f"<{len(manifest['split']['defense_indices'])} indices>"
    if out["attack"]:
        for key in ("poison_indices", "cross_indices"):
            out["attack"][key] = f"<{len(manifest['attack'][key])} indices>"
        if isinstance(out["attack"]["params"].get("pattern"), list):  # TrojanNN's optimised pixels
            out["attack"]["params"]["pattern"] = "<optimised trigger>"
    return out


def _inspect(args: argparse.Namespace) -> None:
    from onp_env.artifacts import load_artifact

    art = load_artifact(args.artifact)
    m = art.manifest
    if args.json:
        print(json.dumps(summarize(m), indent=1))
        return
    d, mo, a, t, mt = m["dataset"], m["model"], m["attack"], m["training"], m["metrics"]
    rows = [
        ("artifact", str(art.path)),
        ("name", m["name"]),
        (
            "dataset",
            f"{d['name']} ({'x'.join(map(str, d['shape']))}, {d['num_classes']} classes); "
            f"defense set {len(m['split']['defense_indices'])} images ({m['split']['fraction']:g} of train)",
        ),
        ("model", f"{mo['name']} {mo['kwargs'] or ''}".strip()),
        (
            "attack",
            "none (clean model)"
            if a is None
            else f"{a['name']} {a['mode']}"
            + (f" -> {a['target']}" if a["mode"] == "all-to-one" else "")
            + f", rate {a['poison_rate']:g} ({len(a['poison_indices'])} images), "
            + json.dumps(summarize(m)["attack"]["params"]),
        ),
        ("training", f"{t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']:g}, {t['seconds']:.1f} s"),
        ("metrics", f"ACC {_pct(mt['acc'])}   ASR {_pct(mt['asr'])}   RA {_pct(mt['ra'])}"),
        ("weights", f"sha256 {m['weights']['sha256'][:16]}... (verified)"),
        ("created", f"{m['created']} with onp-env {m['library_version']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _defend(args: argparse.Namespace) -> None:
    from onp_env.config import apply_overrides
    from onp_env.defend import defend_artifact  # finds the method in onp_env.registry
    from onp_env.presets import preset_of
    from onp_env.registry import defense_class

    overrides = apply_overrides({}, args.set)
    if args.agent is not None:
        overrides["agent"] = args.agent
    out, report = defend_artifact(args.artifact, args.method, overrides, args.out, progress=not args.quiet,
                                  data_root=args.data_root, preset=args.preset)  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    b = report["before"]
    print(f"{report['method']}: pruned {report['pruned']} units in {report['seconds']:.1f} s "
          f"on {report['defense_images']} defense images")  # fmt: skip
    if args.preset is not None:
        print(f"  preset {args.preset}: {preset_of(defense_class(args.method), args.preset).summary}")
    print(f"  before  ACC {_pct(b['acc'])}  ASR {_pct(b['asr'])}  RA {_pct(b['ra'])}")
    print(f"  after   ACC {_pct(report['acc'])}  ASR {_pct(report['asr'])}  RA {_pct(report['ra'])}  "
          f"DER {report['der'] if report['der'] is None else round(report['der'], 4)}")  # fmt: skip
    if "finetuned" in report:
        f = report["finetuned"]
        der = f["der"] if f["der"] is None else round(f["der"], 4)
        print(f"  tuned   ACC {_pct(f['acc'])}  ASR {_pct(f['asr'])}  RA {_pct(f['ra'])}  DER {der}  "
              f"(fine-tuned after pruning: {out / 'finetuned'})")  # fmt: skip
    elif args.preset is None and (hint := defense_class(args.method).run_hint(overrides)):
        print(f"  ({hint})")
    for note in report["details"].get("notes", []):  # what the method decided on its way, for the reader
        print(f"  {note}")
    print(out)


def _detect(args: argparse.Namespace) -> None:
    from onp_env.config import apply_overrides
    from onp_env.detect import detect_artifact, format_detection

    params = apply_overrides({}, args.set)
    run = {k: params.pop(k) for k in ("seed", "device", "defense_fraction") if k in params}
    shipped = None if args.reference_from == "none" else args.reference_from
    found = detect_artifact(args.artifact, params, args.threshold, data_root=args.data_root, reference=args.reference,
                            reference_from=shipped, **run)  # fmt: skip
    print(json.dumps(found, indent=1) if args.json else "\n".join(format_detection(found)))


def _bench(args: argparse.Namespace) -> None:
    from onp_env.bench.report import write_report

    if args.what:
        if args.what[0] != "report" or len(args.what) != 2:
            raise OnpError("usage: onp bench --config FILE [...], or onp bench report DIR")
        print(write_report(args.what[1]))
        return
    if args.config is None:
        raise OnpError("onp bench needs --config FILE (e.g. configs/bench/quick.yaml), or: onp bench report DIR")
    from onp_env.bench.config import load_bench_config
    from onp_env.bench.run import run_bench

    cfg = load_bench_config(args.config, args.set)
    out = args.out or f"runs/bench/{cfg.name}"
    print(run_bench(cfg, out, args.executor, args.address, args.workers, args.resume, progress=not args.quiet))


def _quickstart(args: argparse.Namespace) -> None:
    from onp_env.bench.quickstart import run_quickstart

    run_quickstart(args.out, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onp", description="Backdoor removal by neuron pruning: lab, environment, defenses."
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("attack", help="train (or find in the cache) a backdoored model; prints the artifact path")
    a.add_argument("--config", required=True, help="YAML config, e.g. configs/attack/badnets-digits.yaml")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set attack.poison_rate=0.05 (repeatable)",
    )
    a.add_argument(
        "--out", default=None, help="artifact cache directory (default: $ONP_CACHE or ~/.cache/onp-env/artifacts)"
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_attack)

    i = sub.add_parser("inspect", help="print an artifact's manifest and measured ACC / ASR / RA")
    i.add_argument("artifact", help="artifact directory")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON (index lists as counts)")
    i.set_defaults(func=_inspect)

    d = sub.add_parser("defend", help="run a pruning defense on an artifact; writes the pruned model and report.json")
    d.add_argument(
        "--method",
        required=True,
        help="onp (learned; the agent that ships with onp-env unless --agent), mnp, anp, rnp, bnp, fp, clp, "
        "magnitude, random, or another registered defense",
    )
    d.add_argument(
        "--agent",
        default=None,
        help="agent directory for --method onp (from onp train-agent; default: the shipped agent)",
    )
    d.add_argument("--artifact", required=True, help="artifact directory (from onp attack)")
    d.add_argument("--preset", default=None, metavar="NAME",
                   help="parameters measured together, by name, changed by any --set: `recommended` (onp and "
                        "verdict on Fashion-MNIST small CNNs, the README's commands)")  # fmt: skip
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method parameter (e.g. iterations=500), or defense_fraction / semantics / seed / device",
    )
    d.add_argument("--out", default=None, help="output directory (default: next to the artifact cache)")
    d.add_argument("--data-root", default=None,
                   help="dataset folder for artifacts trained on data of your own (a manifest's paths are not "
                        "followed; default: $ONP_DATA_ROOT)")  # fmt: skip
    d.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_defend)

    t = sub.add_parser("detect", help="is this model backdoored, and toward which class? (trigger inversion)")
    t.add_argument("artifact", help="artifact directory (from onp attack, or a model of your own)")
    t.add_argument("--threshold", type=float, default=None,
                   help="score above which a class is flagged (default: the shipped reference's calibrated line, "
                        "else 2, Neural Cleanse's anomaly index)")  # fmt: skip
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an inversion parameter (e.g. steps=500, images=512), or seed / device / defense_fraction",
    )
    t.add_argument("--reference", nargs="+", default=None, metavar="ARTIFACT",
                   help="other models of the same data and architecture (e.g. your shadow models): each class "
                        "is judged against its mask norm on them")  # fmt: skip
    t.add_argument("--reference-from", default="auto", metavar="NAME",
                   help="a class reference that ships with onp-env, in place of --reference: fashion-mnist-clean "
                        "(12 clean small CNNs, with a calibrated flag line), fashion-mnist (30 shadow small CNNs); "
                        "auto (default): the first with a flag line that describes the model; none: the model "
                        "judged alone")  # fmt: skip
    t.add_argument("--data-root", default=None, help="dataset folder for artifacts trained on data of your own")
    t.add_argument("--json", action="store_true", help="print the verdict and evidence as JSON")
    t.set_defaults(func=_detect)

    b = sub.add_parser("bench", help="the benchmark grid (models x attacks x defenses x seeds x fractions)")
    b.add_argument(
        "what", nargs="*", metavar="report DIR", help="regenerate DIR/results.md and plots from results.jsonl"
    )
    b.add_argument("--config", default=None, help="YAML grid, e.g. configs/bench/quick.yaml")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid value")
    b.add_argument("--executor", default="local", choices=["local", "ray"], help="process pool here, or Ray")
    b.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's)")
    b.add_argument("--resume", action="store_true", help="continue the grid in --out, skipping finished cells")
    b.add_argument("--out", default=None, help="output folder (default: runs/bench/NAME)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_bench)

    q = sub.add_parser("quickstart", help="the first run: digits model, every defense, a short ONP; in minutes")
    q.add_argument("--out", default="runs/quickstart", help="output folder (continued if it exists)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quickstart)

    from onp_env.suite.cli import add_suite

    add_suite(sub)
    for add_command in command_plugins():  # e.g. train-agent, from the agents package
        add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OnpError as e:
        print(f"onp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onp: interrupted (nothing half-written was kept)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader left early (`onp inspect A | head -1`): not an error; silence the flush at exit
        with contextlib.suppress(OSError, ValueError):  # a stdout without a descriptor (captured in tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process stopped by a closed pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())
