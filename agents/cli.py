"""`onp train-agent`: added to the `onp` command line through the entry point group onp_env.commands."""

from __future__ import annotations

import argparse
from typing import Any


def _train_agent(args: argparse.Namespace) -> None:
    from agents.config import load_agent_config
    from agents.train import train_agent

    cfg = load_agent_config(args.config, args.set)
    out = args.out or f"runs/agents/{cfg.name}"
    print(train_agent(cfg, out, resume=args.resume, progress=not args.quiet))


def add_train_agent(sub: Any) -> None:
    t = sub.add_parser("train-agent", help="train a GNN pruning policy on shadow models (MaskablePPO)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/agent/digits.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ppo.total_steps=5000 (repeatable)")  # fmt: skip
    t.add_argument("--out", default=None, help="run folder (default: runs/agents/NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_agent)
