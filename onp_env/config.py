"""The config schema: dataclasses loaded from YAML with `--set key=value` overrides, strict about
unknown keys, and hashed canonically so that identical requests share one cached artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from onp_env.errors import OnpError

T = TypeVar("T")
BOUNDS = ("ge", "gt", "le", "lt")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:  # fmt: skip
    """A dataclass field with a documented range, checked by from_dict (and so by every loader of
    configs and parameters): e.g. `lr: float = bounded(0.01, gt=0)`. On a list field (`seeds:
    list[int] = bounded([1, 2], ge=0)`) the range holds for every element, and each instance gets
    its own copy of the default list."""
    bounds = {k: v for k, v in zip(BOUNDS, (ge, gt, le, lt), strict=True) if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
"""Names that become folder names (a grid's, a defense's or an attack setting's label): no separators,
no dot-names."""
NAME_RULE = "use 1-64 letters, digits and _ . + -, the first a letter or digit"


def check_labels(keys: list[str], where: str) -> None:
    for key in keys:
        if not NAME.fullmatch(key):
            raise OnpError(f"{where}: the name {short_repr(key)} becomes part of folder names: {NAME_RULE}")


SEED_LIMIT = 2**63
"""Seeds stay below this: torch.Generator.manual_seed takes 64-bit values."""


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for error messages about untrusted values (an int of
    more than sys.get_int_max_str_digits() digits has no repr at all)."""
    try:
        text = repr(value)
    except ValueError:
        return f"a value too large to show (over {sys.get_int_max_str_digits()} digits)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_bound(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_bounds(value: Any, bounds: dict[str, float], where: str) -> None:
    if isinstance(value, list) and bounds:
        for i, v in enumerate(value):
            _check_bounds(v, bounds, f"{where}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    rule = " and ".join(f"{words[k]} {_show_bound(v)}" for k, v in bounds.items())
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float: out of every range a config field has
        raise OnpError(f"{where} must be a finite number{' ' + rule if rule else ''}, got an integer of "
                       f"{int(value).bit_length()} bits") from None  # fmt: skip
    if not finite:
        raise OnpError(f"{where} must be a finite number, got {value!r}")
    ok = {"ge": value >= bounds.get("ge", value), "gt": "gt" not in bounds or value > bounds["gt"],
          "le": value <= bounds.get("le", value), "lt": "lt" not in bounds or value < bounds["lt"]}  # fmt: skip
    if not all(ok.values()):
        raise OnpError(f"{where} must be {rule}, got {short_repr(value)}")


@dataclass
class DataConfig:
    name: str = "digits"
    """Dataset name: digits, fashion-mnist, mnist or cifar10."""
    root: str | None = None
    """Directory of the dataset files, for datasets not bundled (see onp_env.data)."""
    defense_fraction: float = bounded(0.05, gt=0, lt=1)
    """Share of each class of the training split held out as the clean defense set."""
    split_seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    """Seed of the defense split."""


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    """Architecture: small_cnn, vgg or preact_resnet18."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments, e.g. {width: 0.5} for preact_resnet18."""


@dataclass
class AttackConfig:
    name: str = "badnets"
    """badnets, blended, wanet, sig or trojannn."""
    target: int = bounded(0, ge=0)
    """Target label (all-to-one)."""
    mode: str = "all-to-one"
    """all-to-one, or all-to-all (label y -> y + 1 mod classes)."""
    poison_rate: float = bounded(0.1, gt=0, lt=1)
    """Share of the (non-defense) training images that are poisoned."""
    params: dict[str, Any] = field(default_factory=dict)
    """Trigger parameters of the attack (see its Params dataclass)."""
    label: str | None = None
    """Its name in model names and tables (default: name): several settings of one attack in a grid
    or a shadow zoo need distinct labels. Not part of the model's fingerprint."""

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class TrainConfig:
    epochs: int = bounded(30, ge=1, le=100_000)
    batch_size: int = bounded(64, ge=1, le=1_000_000)
    lr: float = bounded(0.05, gt=0)
    """Initial SGD learning rate (cosine-annealed to 0)."""
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(5e-4, ge=0)
    augment: str = "none"
    """none, crop (random 2-pixel shift) or crop-flip."""
    threads: int = bounded(1, ge=1, le=1024)
    """torch threads while training; part of the result, since float sums depend on it."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (a GPU when torch sees one): where training runs. Part of the
    result (GPU kernels sum in other orders); the trained model is returned on the CPU."""


@dataclass
class LabConfig:
    """One backdoored (or clean, with attack: null) model: what `onp attack` builds."""

    name: str = "model"
    """Label for the artifact directory; not part of the hash."""
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    """Seed of weight initialisation, batch order and poisoned-index choice."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig | None = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (not name, not data.root)."""
        d = to_dict(self)
        d.pop("name")
        if d["attack"] is not None:  # a display name: the default hashes as before the field existed
            d["attack"].pop("label")
        d["data"].pop("root")
        if d["train"]["device"] == "cpu":  # the default hashes as before the field existed: caches stay valid
            d["train"].pop("device")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_dict(obj: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside `tp`, which may be `X` or `X | None`."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg  # type: ignore[return-value]
    return None


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise OnpError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if not isinstance(key, str):
            raise OnpError(f"{where} has the key {short_repr(key)}, which is not a name: keys are text, one of "
                           f"{', '.join(sorted(names))}")  # fmt: skip
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - names)
    if unknown:
        raise OnpError(f"unknown key(s) {', '.join(unknown)} in {where}: valid keys are {', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise OnpError(f"{where} lacks required key(s) {', '.join(missing)}")
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_of(hints[key])
        if sub and value is not None:
            value = from_dict(sub, value, f"{where}.{key}")
        else:
            _check_type(hints[key], value, f"{where}.{key}")
            _check_bounds(value, fields[key].metadata.get("bounds", {}), f"{where}.{key}")
            if hints[key] in (float, float | None) and isinstance(value, int):
                value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


_SCALARS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}


def _check_type(tp: Any, value: Any, where: str) -> None:
    """Reject a wrong type (e.g. epochs: "ten"), and a wrong element of a `list[scalar]`; what is
    inside a dict is its user's to check."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for o in options:
        (elem,) = typing.get_args(o) if typing.get_origin(o) is list and typing.get_args(o) else (None,)
        if elem in _SCALARS and isinstance(value, list):
            for i, v in enumerate(value):
                _check_type(elem, v, f"{where}[{i}]")
    options = tuple(typing.get_origin(o) or o for o in options)
    if value is None and type(None) in options:
        return
    if any(o not in _SCALARS and o is not type(None) for o in options):
        return
    allowed = tuple(t for o in options for t in _SCALARS.get(o, ()))
    if isinstance(value, bool) and bool not in options:
        allowed = ()
    if not isinstance(value, allowed):
        names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
        raise OnpError(f"{where} must be {names}, got {short_repr(value)}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings applied to nested dicts; values are parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise OnpError(f"--set needs key=value, got '{item}'")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise OnpError(f"--set '{item}': the key needs dotted names such as train.epochs")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise OnpError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = parse_yaml(raw, f"--set {key}")
    return data


MAX_CONFIG_BYTES = 1 << 20


class _PlainLoader(yaml.SafeLoader):
    """safe_load without aliases (a few aliased lines can expand into gigabytes: "billion laughs"),
    without explicit tags (plain data is all a config holds) and without implicit timestamps
    (`2001-01-01` stays the string it looks like, not a date no config field can hold)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed", event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML tags (!name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """Plain YAML data (no tags, no aliases), or a one-line OnpError naming `where`."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise OnpError(f"{where} nests too deeply to be a config: flatten it") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer beyond Python's digit limit
        first = " ".join(str(e).split())[:200]
        raise OnpError(f"{where} is not valid YAML ({first}): fix it (tags and aliases are refused)") from e


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise OnpError(f"config file {p} not found: pass a path such as configs/attack/badnets-digits.yaml")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise OnpError(f"{p} is larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OnpError(f"{p} is not UTF-8 text: pass a YAML config file") from None
    data = parse_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise OnpError(f"{p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or []), str(path or "config"))
