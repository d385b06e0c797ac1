"""`defend_artifact`'s contract: every input is checked before the defense runs, the output folder
appears whole or not at all, long steps show progress bars on request; and every baseline's
parameters have a documented range that is enforced."""

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest

import onp_env.defend as run_module
from baselines import DEFENSES
from baselines.anp import ANP
from baselines.bnp import BNP
from baselines.clp import CLP
from baselines.common import Defense
from baselines.controls import Magnitude, Random
from baselines.fine_pruning import FinePruning
from baselines.mnp import MNP
from baselines.rnp import RNP
from onp_env import OnpError, load_artifact
from onp_env.defend import defend_artifact

FAST = {
    "fp": {"finetune_epochs": 1},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 2, "batch_size": 16},
    "mnp": {"suppress_epochs": 2, "mask_epochs": 2, "batch_size": 16},
    "bnp": {"epochs": 1},
}


def failing(monkeypatch: pytest.MonkeyPatch, name: str, when, exc: BaseException) -> None:
    """Make onp_env.defend's `name` (a writer taking the destination first) raise `exc` for the
    destinations where `when(dest)` holds."""
    real = getattr(run_module, name)

    def wrapped(dest: Path, *args, **kwargs):
        if when(dest):
            raise exc
        return real(dest, *args, **kwargs)

    monkeypatch.setattr(run_module, name, wrapped)


@pytest.mark.parametrize(
    ("writer", "when", "exc"),
    [
        ("write_artifact", lambda d: d.name != "finetuned", KeyboardInterrupt()),  # the pruned model itself
        ("write_artifact", lambda d: d.name == "finetuned", OSError(28, "No space left on device")),
        ("write_text_atomic", lambda d: d.name == "report.json", OSError(28, "No space left on device")),
        ("write_text_atomic", lambda d: True, KeyboardInterrupt()),
    ],
    ids=["pruned-interrupted", "finetuned-disk-full", "report-disk-full", "report-interrupted"],
)
def test_an_interrupted_write_leaves_nothing_and_the_rerun_succeeds(tiny_artifact, tmp_path, monkeypatch, writer,
                                                                    when, exc):  # fmt: skip
    out = tmp_path / "defenses" / "fp"
    with monkeypatch.context() as m:
        failing(m, writer, when, exc)
        with pytest.raises(type(exc)):
            defend_artifact(tiny_artifact, "fp", FAST["fp"], out)
    assert list(out.parent.iterdir()) == []  # neither a half folder nor the staging folder
    path, report = defend_artifact(tiny_artifact, "fp", FAST["fp"], out)
    assert path == out and sorted(p.name for p in out.parent.iterdir()) == ["fp"]
    assert json.loads((out / "report.json").read_text())["pruned"] == report["pruned"]
    assert load_artifact(out).manifest["defense"]["pruned_units"] == load_artifact(out / "finetuned").manifest[
        "defense"]["pruned_units"]  # fmt: skip


def test_an_interrupted_defense_leaves_nothing(tiny_artifact, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Defense, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        defend_artifact(tiny_artifact, "magnitude", {}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_loaded_artifact_is_accepted_and_a_stale_staging_folder_does_not_block(tiny_artifact, tmp_path):
    (tmp_path / ".out.killed").mkdir()  # what a run killed outright leaves behind
    out, report = defend_artifact(load_artifact(tiny_artifact), "magnitude", {"ratio": 0.1}, tmp_path / "out")
    assert (out / "report.json").is_file() and report["pruned"] > 0


@pytest.mark.parametrize(
    ("method", "overrides", "match"),
    [
        ("nope", {}, "unknown defense 'nope'"),
        ("magnitude", {"ratio": "abc"}, "ratio must be float"),
        ("magnitude", {"ratio": 5.0}, "ratio must be >= 0 and <= 1"),
        ("magnitude", {"radio": 0.1}, "unknown key"),
        ("rnp", {"batch_size": 0}, "batch_size must be >= 1"),
        ("fp", {"lr": "fast"}, "lr must be float"),
        ("magnitude", {"defense_fraction": 0.5}, "defense_fraction must be in"),  # more than the artifact holds
        ("magnitude", {"defense_fraction": -0.01}, "defense_fraction must be >"),
        ("magnitude", {"defense_fraction": "abc"}, "defense_fraction must be float"),
        ("magnitude", {"semantics": "half"}, "semantics must be one of zero, gamma"),
        ("magnitude", {"seed": "abc"}, "seed must be int"),
        ("magnitude", {"seed": 1.5}, "seed must be int"),
        ("magnitude", {"seed": -1}, "seed must be >= 0"),
        ("magnitude", {"device": "tpu"}, "unknown device 'tpu'"),
        ("magnitude", {"device": "cuda:x"}, "unknown device 'cuda:x'"),
    ],
)
def test_bad_inputs_are_refused_before_the_defense_runs(tiny_artifact, tmp_path, no_work, method, overrides, match):
    with pytest.raises(OnpError, match=match):
        defend_artifact(tiny_artifact, method, overrides, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_is_refused_before_the_defense_runs(tiny_artifact, tmp_path, no_work):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "out", tmp_path / "file"):
        with pytest.raises(OnpError, match="already exists: pass another --out or remove it"):
            defend_artifact(tiny_artifact, "magnitude", {}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"] and not any((tmp_path / "out").iterdir())


def test_an_output_under_a_file_is_refused_before_the_defense_runs(tiny_artifact, tmp_path, no_work):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OnpError, match="is a file, not a folder"):
        defend_artifact(tiny_artifact, "magnitude", {}, tmp_path / "file" / "deeper" / "out")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system (Linux)")
def test_an_output_that_cannot_be_created_is_refused_before_the_defense_runs(tiny_artifact, no_work):
    with pytest.raises(OnpError, match="cannot write /proc/onp-no-such-dir/out"):  # not writable, even for root
        defend_artifact(tiny_artifact, "magnitude", {}, "/proc/onp-no-such-dir/out")


BAD = [
    (ANP, "iterations", 0),
    (ANP, "alpha", 1.5),
    (ANP, "momentum", 1.0),
    (ANP, "eps", -0.1),
    (MNP, "mu", -1e-4),
    (MNP, "threshold", 1.2),
    (MNP, "mask_epochs", 0),
    (RNP, "recover_lr", 0.0),
    (RNP, "unlearn_epochs", 0),
    (RNP, "threshold", math.nan),
    (RNP, "clean_threshold", 2),
    (BNP, "ratio", 5.0),
    (BNP, "rms_decay", 1.0),
    (BNP, "lr", -0.01),
    (FinePruning, "max_acc_drop", -0.01),
    (FinePruning, "batch_size", 0),
    (FinePruning, "finetune_epochs", 0),
    (CLP, "u", -1.0),
    (Magnitude, "ratio", 5.0),
    (Random, "ratio", -0.5),
]


@pytest.mark.parametrize(("cls", "key", "value"), BAD, ids=[f"{c.name}-{k}-{v}" for c, k, v in BAD])
def test_out_of_range_parameters_are_refused(cls, key, value):
    with pytest.raises(OnpError, match=rf"{cls.name} parameters\.{key} must be ([<>]|a finite number)"):
        cls(**{key: value})


@pytest.mark.parametrize("cls", DEFENSES.values(), ids=list(DEFENSES))
def test_every_numeric_parameter_has_a_range_that_holds_its_default(cls):
    hints = typing.get_type_hints(cls.Params)
    fields = dataclasses.fields(cls.Params)
    unranged = [f.name for f in fields if hints[f.name] in (int, float) and not f.metadata.get("bounds")]
    assert unranged == [], f"{cls.name}: no declared range for {unranged}"
    defaults = dataclasses.asdict(cls.Params())
    assert dataclasses.asdict(cls(**defaults).params) == defaults  # the defaults pass their own checks


def test_range_ends_are_accepted_and_integers_become_floats():
    assert Magnitude(ratio=0).params.ratio == 0.0 and Magnitude(ratio=1).params.ratio == 1.0
    assert isinstance(Magnitude(ratio=1).params.ratio, float)


BARS = {
    "fp": ["fp: pruning", "fp: fine-tuning"],
    "rnp": ["rnp: unlearning", "rnp: recovering masks"],
    "mnp": ["mnp: suppressing", "mnp: learning masks"],
    "bnp": ["bnp: adaptive regularisation"],
}


@pytest.mark.parametrize("method", list(BARS))
def test_long_steps_show_progress_bars_on_stderr_only_when_asked(tiny_artifact, tmp_path, capfd, method):
    defend_artifact(tiny_artifact, method, FAST[method], tmp_path / "quiet")
    quiet = capfd.readouterr()
    assert not any(desc in quiet.err + quiet.out for desc in BARS[method])
    defend_artifact(tiny_artifact, method, FAST[method], tmp_path / "loud", progress=True)
    loud = capfd.readouterr()
    assert all(desc in loud.err for desc in BARS[method]) and loud.out == ""
