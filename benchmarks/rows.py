"""The rows of the benchmark scripts' results files (onp.jsonl, onp_fresh.jsonl, onp_stopping.jsonl),
checked on every read like `onp bench`'s (onp_env.results): a report or a resume never reads a
field of a row that is not what the writing script wrote."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onp_env.artifacts import read_json
from onp_env.errors import OnpError
from onp_env.results import (
    ABSENT,
    COUNT,
    FRACTION,
    MEASURES,
    NUMBER,
    REAL,
    TEXT,
    Schema,
    check_row,
    list_of,
    optional,
    read_rows,
    values_of,
)

FIX = "delete that line (the script redoes its work when run again) or restore the file from git"


def _protocol_key(row: dict[str, Any]) -> str | None:
    key = f"{row['attack']}/s{row['seed']}/{row['fraction']:g}/{row['method']}"
    return None if row["key"] == key else f"its key {row['key']!r} does not match its fields ({key!r})"


PROTOCOL_CELL = Schema(
    "protocol cell",
    {
        "key": TEXT, "attack": TEXT, "seed": COUNT, "fraction": FRACTION, "method": TEXT,
        "acc": FRACTION, "asr": FRACTION, "ra": FRACTION, "der": FRACTION, "before": MEASURES,
        "pruned": COUNT, "seconds": NUMBER, "units": list_of(COUNT),
    },
    when={"kind": ABSENT},
    consistent=_protocol_key,
)  # fmt: skip
"""A method on one held-out model at one defense-data fraction (onp_vs_baselines.py)."""

COST = Schema(
    "cost",
    {"key": TEXT, "seconds": NUMBER},
    when={"kind": "cost"},
    consistent=lambda r: None if r["key"].startswith("cost/") else f"its key {r['key']!r} does not start with cost/",
)
"""The seconds a shadow model, a held-out model or an agent took to build (onp_vs_baselines.py)."""


def read_protocol(path: Path) -> list[dict[str, Any]]:
    """onp.jsonl or onp_fresh.jsonl: protocol cells and cost rows."""
    return read_rows(path, PROTOCOL_CELL, COST, fix=FIX)


def _trace_consistent(row: dict[str, Any]) -> str | None:
    key = f"{row['fold']}/{row['role']}/{row['model']}/{row['fraction']:g}"
    if row["key"] != key:
        return f"its key {row['key']!r} does not match its fields ({key!r})"
    if len(row["acc"]) != len(row["steps"]) or len(row["order"]) != sum(row["steps"]):
        return "its acc, steps and order lists disagree in length"
    if "asr" in row and len(row["asr"]) != len(row["acc"]):
        return "its acc and asr lists disagree in length"
    return None


_TRACE = {
    "key": TEXT, "fold": TEXT, "model": TEXT, "attack": TEXT, "fraction": FRACTION,
    "order": list_of(COUNT), "steps": list_of(COUNT), "acc": list_of(FRACTION),
}  # fmt: skip
SHADOW_TRACE = Schema(
    "shadow trace", {**_TRACE, "asr": list_of(FRACTION)}, when={"role": "shadow"}, consistent=_trace_consistent
)
"""One agent's pruning sequence on a shadow model, with ACC and ASR on its defense images after each step."""
HELD_OUT_TRACE = Schema(
    "held-out trace",
    {**_TRACE, "before": MEASURES, "test": values_of(Schema("test measures", {**MEASURES.fields, "der": FRACTION}))},
    when={"role": "held-out"},
    consistent=_trace_consistent,
)
"""The same on a held-out model: defense-image ACC per step, test measures where each rule cuts."""


def read_stopping(path: Path) -> list[dict[str, Any]]:
    """onp_stopping.jsonl: traces of shadow and held-out models."""
    return read_rows(path, SHADOW_TRACE, HELD_OUT_TRACE, fix=FIX)


MARGIN = Schema("margin", {"key": TEXT, "measure": TEXT, "seed": COUNT, "values": values_of(REAL)})
"""One learning test's measured quantities at one seed (test_margins.py)."""


def read_margins(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, MARGIN, fix=FIX)


ANP_REFERENCE = Schema("ANP reference", {"key": TEXT, "model": TEXT, "seconds": NUMBER}, when={"key": "anp 2000"})
SEPARABILITY = Schema(
    "model's features",
    {
        "key": TEXT, "attack": optional(TEXT), "seed": COUNT, "target": optional(COUNT), "seconds": values_of(NUMBER),
        "detection": values_of(Schema("verdict", {"anomaly_index": REAL, "suspect": NUMBER, "norms": list_of(NUMBER)})),
    },
    optional={"layer": TEXT, "positives_in_layer": COUNT, "role": TEXT,
              "auc": values_of(Schema("AUCs", {"layer": FRACTION, "all": FRACTION}))},
)  # fmt: skip
"""feature_separability.py: a model's AUC per feature, seconds per signal and each signal's per-class verdict."""


def read_separability(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, ANP_REFERENCE, SEPARABILITY, fix=FIX)


SIGNAL_SCALE = Schema(
    "model's signal scales",
    {"key": TEXT, "role": TEXT, "attack": TEXT, "layer": TEXT,
     "signals": values_of(Schema("stand-out", {"stand_out": REAL, "auc": FRACTION}))},
)  # fmt: skip
"""signal_scale.py: per signal and scale, how far the oracle's units stand out of their layer."""


def read_signal_scale(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, SIGNAL_SCALE, fix=FIX)


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


INVERTED_ASR = Schema(
    "model's inverted-trigger path",
    {"key": TEXT, "role": TEXT, "attack": TEXT, "mode": TEXT, "names_target": _flag, "spearman": optional(REAL),
     "real_at_stop": optional(FRACTION), "stop_step": optional(COUNT), "real": list_of(FRACTION),
     "probe": list_of(FRACTION)},
)  # fmt: skip
"""inverted_asr.py: the real and the inverted trigger's success rate along one pruning path."""


def read_inverted_asr(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, INVERTED_ASR, fix=FIX)


CHOICES = Schema(
    "policy's choices",
    {"key": TEXT, "variant": TEXT, "attack": TEXT, "seed": COUNT, "auc_signals": values_of(FRACTION),
     "auc_path": list_of(FRACTION), "p_oracle_path": list_of(FRACTION), "p_stop_path": list_of(FRACTION),
     "pruned": COUNT, "oracle_pruned": COUNT, "activity_policy_top3": REAL, "activity_oracle_top3": REAL,
     "oracle_top3_layers": list_of(TEXT)},
    optional={"followed": list_of(TEXT), "larger_verdict": TEXT},
)  # fmt: skip
"""onp_choices.py: how a fold agent ranks the oracle's units along its own path, against its signals."""


def read_choices(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, CHOICES, fix=FIX)


VERDICTS = Schema(
    "model's verdicts",
    {"key": TEXT, "role": TEXT, "model": TEXT, "attack": TEXT, "target": COUNT, "mode": TEXT, "reference": TEXT,
     "verdicts": values_of(Schema("verdict", {"suspect": COUNT, "anomaly_index": REAL}))},
    consistent=lambda r: None if r["key"] == f"{r['role']}/{r['model']}" else f"its key {r['key']!r} does not match "
    "its role and model",
)  # fmt: skip
"""signal_verdicts.py: each verdict signal's suspected class and anomaly index on one model."""


def read_verdicts(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, VERDICTS, fix=FIX)


_FOUND = Schema("class verdict", {"suspect": COUNT, "score": REAL, "norms": list_of(REAL)})
CHOICE = Schema(
    "model's verdict choice",
    {"model": TEXT, "role": TEXT, "mode": TEXT, "target": optional(COUNT),
     "cells": list_of(Schema("cell", {"fraction": FRACTION, "follows": TEXT, "inversion": _FOUND,
                                      "latent_gap": _FOUND, "blend": _FOUND}).problem)},
)  # fmt: skip
"""verdict_choice.py: each class verdict's suspect and score on one model, per defense-data fraction."""


def read_verdict_choice(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, CHOICE, fix=FIX)


STOP_FLAGS = ("inversion_first", "latent_probe", "latent_patience", "candidates", "reinvert", "max_acc_drop")
"""verdict_stop.py's rule flags, in the order its keys name them."""


def stop_key(model: str, fraction: float, flags: tuple[str, ...]) -> str:
    """verdict_stop.py's key: the model, the fraction, then each flag on."""
    return f"{model}/{fraction:g}" + "".join(f"/{f.replace('_', ' ')}" for f in flags)


def stop_flags(row: dict[str, Any]) -> tuple[str, ...]:
    """The rule flags a verdict_stop.py row has on."""
    return tuple(f for f in STOP_FLAGS if row.get(f))


VERDICT_STOP = Schema(
    "verdict stop setting",
    {"key": TEXT, "model": TEXT, "attack": TEXT, "fraction": FRACTION, "stop_index": REAL, "stop_asr": FRACTION,
     "follows": TEXT, "acc": FRACTION, "asr": FRACTION, "der": FRACTION, "before": MEASURES, "pruned": COUNT},
    optional=dict.fromkeys(STOP_FLAGS, _flag),
    consistent=lambda r: None if r["key"] == stop_key(r["model"], r["fraction"], stop_flags(r)) else f"its key "
    f"{r['key']!r} does not match its model, fraction and setting",
)  # fmt: skip
"""verdict_stop.py: the `verdict` defense with one stop setting on one shadow model and fraction."""


def read_verdict_stop(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, VERDICT_STOP, fix=FIX)


def repair_key(model: str, fraction: float, epochs: int, unlearn: float, sweep: str = "first") -> str:
    """verdict_repair.py's key: the model, the fraction, the repair setting and the sweep (named unless `first`)."""
    return f"{model}/{fraction:g}/repair {epochs}/unlearn {unlearn:g}" + ("" if sweep == "first" else f"/{sweep}")


VERDICT_REPAIR = Schema(
    "verdict repair setting",
    {"key": TEXT, "model": TEXT, "attack": TEXT, "fraction": FRACTION, "epochs": COUNT, "unlearn": FRACTION,
     "follows": TEXT, "flagged": _flag, "acc": FRACTION, "asr": FRACTION, "der": FRACTION, "before": MEASURES,
     "pruned": COUNT, "seconds": NUMBER},
    optional={"sweep": TEXT, "stopped": TEXT},
    consistent=lambda r: None if r["key"] == repair_key(r["model"], r["fraction"], r["epochs"], r["unlearn"],
                                                        r.get("sweep", "first")) else
    f"its key {r['key']!r} does not match its model, fraction and setting",
)  # fmt: skip
"""verdict_repair.py: `verdict`'s pruned model on one shadow model and fraction, then one repair setting."""


def read_verdict_repair(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, VERDICT_REPAIR, fix=FIX)


_MAYBE = {"acc": FRACTION, "asr": optional(FRACTION), "ra": optional(FRACTION)}  # a clean model has no ASR
REPORT = Schema(
    "defense report",
    {
        **_MAYBE, "method": TEXT, "der": optional(FRACTION), "pruned": COUNT, "seconds": NUMBER,
        "before": Schema("measures", _MAYBE), "defense_images": COUNT,
    },
)  # fmt: skip
"""A defended model's report.json (onp_env.defend), as baseline_defenses.py resumes from it."""


def read_report(path: Path) -> dict[str, Any]:
    """A report.json left by an earlier run, checked like a results row."""
    fix = "remove its folder: the script redoes that cell"
    return check_row(read_json(path, 64 << 20, fix), (REPORT,), str(path), fix)


def exit_2_on_bad_input(main: Callable[[], None]) -> None:
    """Run a script's main as `onp` runs a command: bad input ends it with code 2 and one line."""
    try:
        main()
    except OnpError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
