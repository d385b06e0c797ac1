"""Results files: JSON lines, one finished piece of work (a cell, a cost, a trace) per line.

A results folder travels (a colleague's, a cluster's, one resumed after a crash), so every reader
treats it as hostile input: each row is checked against the schema of its kind before anything
reads a field. Only one damage is expected and tolerated: a last line cut short by a crash in the
middle of an append (the work it stood for is redone). Anything else (a corrupt line elsewhere, a
row of the wrong shape, a row of another file) is an OnpError naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onp_env.artifacts import loads_finite, write_text_atomic
from onp_env.errors import OnpError

Check = Callable[[Any], str | None]
"""A field's check: None when the value is acceptable, else what is wrong with it."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _real(v: Any) -> str | None:
    return None if _is_number(v) else "must be a finite number"


def _number(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "must be a finite number >= 0"


def _fraction(v: Any) -> str | None:
    return None if _is_number(v) and 0 <= v <= 1 else "must be a number in [0, 1]"


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def list_of(check: Check) -> Check:
    def check_list(v: Any) -> str | None:
        if not isinstance(v, list):
            return "must be a list"
        for i, item in enumerate(v):
            if (problem := check(item)) is not None:
                return f"item {i} {problem}"
        return None

    return check_list


def values_of(check: Check | Schema) -> Check:
    """A JSON object whose every value passes `check` (its keys are strings by JSON's rules)."""

    def check_values(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "must be a JSON object"
        for k, item in v.items():
            if (problem := check.problem(item) if isinstance(check, Schema) else check(item)) is not None:
                return f"entry {k!r}: {problem}"
        return None

    return check_values


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _anything(v: Any) -> str | None:
    return None


REAL: Check = _real
NUMBER: Check = _number
FRACTION: Check = _fraction
COUNT: Check = _count
TEXT: Check = _text
ANY: Check = _anything


@dataclass(frozen=True)
class Schema:
    """The fields a row of one kind must have (extra fields are allowed: later versions add some)."""

    what: str
    """The row's kind, as a reader names it: 'bench cell', 'cost'."""
    fields: Mapping[str, Check | Schema]
    when: Mapping[str, Any] = field(default_factory=dict)
    """Fields whose values mark a row as this kind (a file mixes kinds); {} matches any row."""
    consistent: Callable[[dict[str, Any]], str | None] | None = None
    """A check across fields (a key built from the others, say); None when the row is consistent."""
    optional: Mapping[str, Check | Schema] = field(default_factory=dict)
    """Fields a row of this kind may lack, checked where present."""

    def problem(self, row: Any) -> str | None:
        if not isinstance(row, dict):
            return f"must be a JSON object, got {type(row).__name__}"
        for name, check in [*self.fields.items(), *((k, c) for k, c in self.optional.items() if k in row)]:
            if name not in row:
                return f"field '{name}' is missing"
            found = check.problem(row[name]) if isinstance(check, Schema) else check(row[name])
            if found is not None:
                return f"field '{name}' {found}" if not isinstance(check, Schema) else f"in '{name}': {found}"
        return self.consistent(row) if self.consistent is not None else None

    def matches(self, row: Any) -> bool:
        return isinstance(row, dict) and all(row.get(k, ABSENT) == v for k, v in self.when.items())


ABSENT = object()
"""As a value in `when`: the row must not have that field (onp.jsonl's cells have no `kind`)."""

MEASURES = Schema("measures", {"acc": FRACTION, "asr": FRACTION, "ra": FRACTION})
"""ACC, ASR and RA of a model, as fractions (a row's `before`)."""


def append(path: Path, row: dict[str, Any]) -> None:
    """One finished piece of work, durably: the line and its newline in one write, then fsync."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def end_last_line(path: Path) -> None:
    """Before appending after a crash: a last line left without its newline gets one if it is a whole
    row, and is cut if it is not (read_rows has already dropped it: its work is redone)."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            head, _, last = data.rpartition(b"\n")
            try:
                loads_finite(last)  # as read_rows parses it: what it kept stays, what it dropped goes
            except (ValueError, RecursionError):
                write_text_atomic(path, (head + b"\n" if head else b"").decode("utf-8", errors="replace"))
            else:
                write_text_atomic(path, data.decode("utf-8", errors="replace") + "\n")


MAX_RESULTS_BYTES = 1 << 30
"""A 100,000-cell bench writes about 250 MB; a larger file is not ours and is refused before it is read."""


def _say(message: str) -> None:
    print(f"onp: note: {message}", file=sys.stderr)


def read_rows(path: Path, *schemas: Schema, fix: str, say: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    """Every row of a results file, each checked against the first of `schemas` that `matches` it.

    A missing file holds no rows. A last line without its newline that does not parse is dropped,
    and `say` tells so. Any other bad line raises OnpError('{path}, line {n}: {problem}; {fix}').
    """
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise OnpError(
            f"{path} is larger than {MAX_RESULTS_BYTES >> 20} MiB, more than any results file of ours: {fix}"
        )
    try:
        data = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OnpError(f"{path}: not UTF-8 text (byte {e.start}): {fix}") from None
    except OSError as e:
        raise OnpError(f"cannot read {path} ({e.strerror}): {fix}") from None
    lines = data.split("\n")
    cut_short = lines[-1] != ""  # the file does not end with a newline: its last line may be partial
    if not cut_short:
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = loads_finite(line)
        except (ValueError, RecursionError):
            if cut_short and n == len(lines):
                say(f"{path}: dropped its last line ({n}), cut short by a crash; its work is redone on --resume")
                break
            raise OnpError(f"{path}, line {n}: not a JSON row; {fix}") from None
        rows.append(check_row(row, schemas, f"{path}, line {n}", fix))
    return rows


def check_row(row: Any, schemas: tuple[Schema, ...], where: str, fix: str) -> dict[str, Any]:
    """`row` if it is a row of one of `schemas` (the first whose `when` matches); else an OnpError
    '{where}: {problem}; {fix}'."""
    if not isinstance(row, dict):
        raise OnpError(f"{where}: must be a JSON object, got {type(row).__name__}; {fix}")
    schema = next((s for s in schemas if s.matches(row)), None)
    if schema is None:
        kinds = " or ".join(s.what for s in schemas)
        raise OnpError(f"{where}: not a row of this file (expected a {kinds} row); {fix}")
    if (problem := schema.problem(row)) is not None:
        raise OnpError(f"{where}: {problem}; {fix}")
    return row
