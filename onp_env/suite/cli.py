"""`onp suite list | build | evaluate | validate | report`: the task suites from the command line."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from onp_env.errors import OnpError


def _list(args: argparse.Namespace) -> None:
    from onp_env.suite.spec import SPLITS, SUITES, get_suite
    from onp_env.suite.zoo import read_manifest

    if not args.suite:
        for s in SUITES.values():
            counts = ", ".join(f"{split} {len(s.labs(split))}" for split in SPLITS)
            print(f"{s.name:18} {s.gym_id:26} {counts}; held-out attack {s.held_out_attack}: {s.description}")
        return
    spec = get_suite(args.suite)
    entries = read_manifest(spec)["models"]
    print(f"{'model':30} {'attack':12} {'target':>6} {'mode':11} {'rate':>6} {'ACC':>6} {'ASR':>6}")
    for m in entries:
        if args.split in (None, m["split"]):
            a = m["attack"]
            print(f"{m['name']:30} {a['name']:12} {a['target']:>6} {a['mode']:11} {a['poison_rate']:>6.3f} "
                  f"{m['acc']:>6.3f} {m['asr']:>6.3f}")  # fmt: skip


def _build(args: argparse.Namespace) -> None:
    from onp_env.suite.spec import SPLITS, get_suite
    from onp_env.suite.zoo import build_split, write_manifest

    spec = get_suite(args.suite)
    if args.write_manifest:
        print(write_manifest(spec, args.cache, progress=not args.quiet, workers=args.workers))
        return
    outside = 0
    for split in [args.split] if args.split else list(SPLITS):
        for m in build_split(spec, split, args.cache, progress=not args.quiet, workers=args.workers):
            outside += m.status == "outside"
            print(f"{m.name:28} {m.status:9} ACC {m.metrics['acc']:.3f} (manifest {m.entry['acc']:.3f}) "
                  f"ASR {m.metrics['asr']:.3f} (manifest {m.entry['asr']:.3f})  {m.path}")  # fmt: skip
    if outside:
        raise OnpError(f"{outside} model(s) fall outside the manifest's tolerance {spec.tolerance}: scores on them "
                       "are not comparable with the reference table; report that with your results")  # fmt: skip


def _evaluate(args: argparse.Namespace) -> None:
    from onp_env.config import apply_overrides
    from onp_env.suite.evaluate import evaluate
    from onp_env.suite.policies import make_policy

    params = apply_overrides({}, args.param)
    policy = make_policy(args.policy, params, args.seed)  # an unknown name fails before the zoo is built
    rows = evaluate(policy, args.suite, args.split, name=args.name or args.policy, seed=args.seed,
                    models=args.model or None, out=Path(args.out), device=args.device, cache=args.cache,
                    progress=not args.quiet, train_steps=args.train_steps)  # fmt: skip
    print(f"{len(rows)} rows appended to {args.out}")


def _validate(args: argparse.Namespace) -> None:
    from onp_env.suite.evaluate import read_suite_rows, validate

    rows = read_suite_rows(Path(args.rows))
    n = validate(rows, device=args.device, cache=args.cache, progress=not args.quiet)
    print(f"{n} rows of {args.rows} replay to the same actions and numbers")


def _report(args: argparse.Namespace) -> None:
    from onp_env.artifacts import write_text_atomic
    from onp_env.suite.evaluate import read_suite_rows
    from onp_env.suite.report import report_md

    rows = [r for path in args.rows for r in read_suite_rows(Path(path))]
    text = report_md(rows, f"{platform.machine()}, {platform.system()}")
    if args.out:
        write_text_atomic(Path(args.out), text)
    print(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 0 .. 2**32 - 1")
    return value


def _workers(text: str) -> int:
    value = _count(text)
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{text!r}: workers must be between 1 and 256")
    return value


def add_suite(sub: argparse._SubParsersAction) -> None:
    from onp_env.suite.spec import SPLITS

    s = sub.add_parser("suite", help="the RL task suites: list, build, evaluate a policy, validate rows, report")
    cmd = s.add_subparsers(dest="suite_command", required=True)
    ls = cmd.add_parser("list", help="the suites, or one suite's models with their manifest ACC / ASR")
    ls.add_argument("suite", nargs="?")
    ls.add_argument("--split", choices=SPLITS)
    ls.set_defaults(func=_list)
    b = cmd.add_parser("build", help="build a suite's models (lab cache) and check them against its manifest")
    b.add_argument("suite")
    b.add_argument("--split", choices=SPLITS)
    b.add_argument("--write-manifest", action="store_true", help="maintainers: build every split, write the manifest")
    b.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="processes training the missing models, one thread each (same weights as 1)",
    )
    b.set_defaults(func=_build)
    e = cmd.add_parser("evaluate", help="run a policy on every model of a split; appends one row per model")
    e.add_argument("suite")
    e.add_argument("--split", required=True, choices=SPLITS)
    e.add_argument("--policy", required=True, help="stop, random, oracle, a heuristic (mnp, ...) or onp")
    e.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter, e.g. agent=DIR")
    e.add_argument("--name", help="the policy's name in the rows (default: --policy)")
    e.add_argument("--seed", type=_count, default=0, help="the run's seed (its training seed, for an agent)")
    e.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    e.add_argument("--train-steps", type=_count, help="environment steps the policy trained for, for the report")
    e.add_argument("--out", required=True, help="rows file (JSON lines), appended to")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_evaluate)
    v = cmd.add_parser("validate", help="replay a rows file's actions and check every number")
    v.add_argument("rows")
    v.add_argument("--device", default="cpu")
    v.set_defaults(func=_validate)
    r = cmd.add_parser("report", help="the reference table (markdown) from rows files")
    r.add_argument("rows", nargs="+")
    r.add_argument("--out")
    r.set_defaults(func=_report)
    for p in (b, e, v):
        p.add_argument("--cache", help="lab cache folder (default $ONP_CACHE or ~/.cache/onp-env/artifacts)")
    for p in (b, e, v, r):
        p.add_argument("--quiet", action="store_true")
