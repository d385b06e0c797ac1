"""Results files are input too: every reader (`onp bench report`, `onp bench --resume`, the benchmark
scripts' reports and resumes) checks each row against its schema. Only a last line cut short by a
crash is dropped, and said so; anything else is one line naming the file, the line and the fix."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onp_env import OnpError
from onp_env.bench.config import BenchConfig, check
from onp_env.bench.run import RESULTS, read_cells, run_bench
from onp_env.cli import main
from onp_env.config import from_dict
from onp_env.results import append, end_last_line
from onp_env.suite.evaluate import read_suite_rows

from .test_readme import benchmark_settings

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_rows():
    """benchmarks/rows.py, loaded from its file (the scripts import it as a sibling)."""
    spec = importlib.util.spec_from_file_location("benchmark_rows", ROOT / "benchmarks" / "rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROWS = _benchmark_rows()
BEFORE = {"acc": 0.9, "asr": 1.0, "ra": 0.0}
PROTOCOL = {"key": "badnets/s101/0.05/onp", "attack": "badnets", "seed": 101, "fraction": 0.05, "method": "onp",
            "acc": 0.88, "asr": 0.05, "ra": 0.6, "der": 0.95, "before": BEFORE, "pruned": 2, "seconds": 3.5,
            "units": [4, 7]}  # fmt: skip
COST = {"key": "cost/model/shadow-badnets-s1", "kind": "cost", "seconds": 81.5}
SHADOW = {"key": "badnets/shadow/m-s1/0.01", "fold": "badnets", "role": "shadow", "model": "m-s1",
          "attack": "blended", "fraction": 0.01, "order": [3, 5], "steps": [0, 1, 1], "acc": [0.9, 0.9, 0.8],
          "asr": [1.0, 0.5, 0.1]}  # fmt: skip
HELD_OUT = {**{k: v for k, v in SHADOW.items() if k != "asr"}, "key": "badnets/held-out/m-s1/0.01", "role": "held-out",
            "before": BEFORE, "test": {"2": {**BEFORE, "der": 0.5}}}  # fmt: skip
TINY = {
    "name": "tiny", "models": [{"name": "small_cnn", "kwargs": {"channels": [8, 8], "hidden": 16}}],
    "attacks": [{"name": "badnets"}], "train": {"epochs": 3}, "seeds": [101], "fractions": [0.05],
    "defenses": [{"name": "magnitude"}, {"name": "random", "params": {"ratio": 0.1}}],
}  # fmt: skip


def tiny() -> BenchConfig:
    cfg = from_dict(BenchConfig, TINY, "tiny")
    check(cfg)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-cell benchmark folder; tests damage copies of it."""
    out = tmp_path_factory.mktemp("bench") / "b"
    run_bench(tiny(), out, progress=False)
    return out


@pytest.fixture
def bench(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "b"))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str], newline: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline else ""))


# The damage every reader is tried with: (what is done to a file of good lines, message expected).
DAMAGE = [
    (lambda ls: [ls[0], "{not json", *ls[1:]], r"line 2: not a JSON row"),
    (lambda ls: [ls[0], "[1, 2, 3]", *ls[1:]], r"line 2: must be a JSON object, got list"),
    (lambda ls: [ls[0], '"a string"', *ls[1:]], r"line 2: must be a JSON object, got str"),
    (lambda ls: [*ls, '{"key": "x", "kind": "something else", "role": "other"}'],
     r"line 3: (not a row of this file|field '\w+' is missing)"),
    (lambda ls: [ls[0], json.dumps({k: v for k, v in json.loads(ls[1]).items() if k != "fraction"})],
     r"line 2: field 'fraction' is missing"),
    (lambda ls: [ls[0], json.dumps({**json.loads(ls[1]), "fraction": "high"})],
     r"line 2: field 'fraction' must be a number in \[0, 1\]"),
    (lambda ls: [ls[0], json.dumps({**json.loads(ls[1]), "fraction": 1.5})],
     r"line 2: field 'fraction' must be a number in \[0, 1\]"),
    (lambda ls: [ls[0], ls[1].replace('"fraction": ', '"fraction": NaN, "x": ', 1)], r"line 2: not a JSON row"),
    (lambda ls: [ls[0], json.dumps({**json.loads(ls[1]), "key": "someone/else"})],
     r"line 2: its key 'someone/else' does not match"),
    (lambda ls: [ls[0], "", ls[1]], r"line 2: not a JSON row"),
    (lambda ls: ["{cut" + ls[0], *ls[1:]], r"line 1: not a JSON row"),  # a damaged line that is not the last
]  # fmt: skip


@pytest.mark.parametrize("damage, match", DAMAGE)
@pytest.mark.parametrize(
    "reader, good",
    [
        (read_cells, None),  # a bench's results.jsonl: rows from the fixture
        (ROWS.read_protocol, [PROTOCOL, {**PROTOCOL, "key": "badnets/s101/0.05/mnp", "method": "mnp"}]),
        (ROWS.read_stopping, [SHADOW, HELD_OUT]),
    ],
    ids=["bench", "onp.jsonl", "onp_stopping.jsonl"],
)
def test_every_reader_refuses_damaged_and_foreign_rows_with_file_and_line(
    reader, good, damage, match, finished, tmp_path
):
    path = tmp_path / "rows.jsonl"
    lines = _lines(finished / RESULTS) if good is None else [json.dumps(r) for r in good]
    _write(path, lines)
    assert len(reader(path)) == 2
    _write(path, damage(lines))
    with pytest.raises(OnpError, match=rf"^{path}, {match}.*; (delete that line|.*restore)"):
        reader(path)


@pytest.mark.parametrize(
    "reader, good",
    [(read_cells, None), (ROWS.read_protocol, [PROTOCOL, COST]), (ROWS.read_stopping, [SHADOW, HELD_OUT])],
    ids=["bench", "onp.jsonl", "onp_stopping.jsonl"],
)
def test_every_reader_drops_a_last_line_cut_short_and_says_so(reader, good, finished, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    lines = _lines(finished / RESULTS) if good is None else [json.dumps(r) for r in good]
    _write(path, [lines[0], lines[1][: len(lines[1]) // 2]], newline=False)
    assert len(reader(path)) == 1
    assert "dropped its last line (2), cut short by a crash" in capsys.readouterr().err
    _write(path, [lines[0], lines[1][: len(lines[1]) // 2]], newline=True)  # a newline after it: not a crash
    with pytest.raises(OnpError, match="line 2: not a JSON row"):
        reader(path)
    assert reader(tmp_path / "absent.jsonl") == []
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(OnpError, match="not UTF-8"):
        reader(path)


@pytest.mark.parametrize("file", ["bench", "protocol", "stopping"])
def test_every_reader_refuses_the_rows_of_the_other_files(file, finished, tmp_path):
    own = {
        "bench": [json.loads(_lines(finished / RESULTS)[0])],
        "protocol": [PROTOCOL, COST],
        "stopping": [SHADOW, HELD_OUT],
    }
    reader = {"bench": read_cells, "protocol": ROWS.read_protocol, "stopping": ROWS.read_stopping}[file]
    path = tmp_path / "rows.jsonl"
    for other, rows in own.items():
        for row in rows:
            _write(path, [json.dumps(row)])
            if other == file:
                assert reader(path) == [row]
            else:
                with pytest.raises(OnpError, match=rf"^{path}, line 1: "):
                    reader(path)


def test_bench_report_exits_2_with_one_line_on_a_damaged_row(bench, capsys):
    lines = _lines(bench / RESULTS)
    _write(bench / RESULTS, [lines[0], json.dumps([1]), lines[1]])
    assert main(["bench", "report", str(bench)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"onp: error: {bench / RESULTS}, line 2: must be a JSON object") and err.count("\n") == 1
    _write(bench / RESULTS, [lines[0], json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "asr"})])
    assert main(["bench", "report", str(bench)]) == 2
    assert "line 2: field 'asr' is missing" in capsys.readouterr().err


def test_bench_report_gives_a_fine_tuned_model_a_row_of_its_own_and_checks_its_measures(bench, capsys):
    lines = _lines(bench / RESULTS)
    row = json.loads(lines[1])
    tuned = {"acc": 0.5, "asr": 0.25, "ra": 0.5, "der": 0.75}
    _write(bench / RESULTS, [lines[0], json.dumps({**row, "finetuned": tuned})])
    assert main(["bench", "report", str(bench)]) == 0
    der = [line for line in (bench / "results.md").read_text().splitlines() if line.startswith(f"| {row['defense']}")]
    assert der[0] == f"| {row['defense']} + fine-tune | **75.0** |"  # first in its section's DER table
    assert der[1].startswith(f"| {row['defense']} | ")
    _write(bench / RESULTS, [lines[0], json.dumps({**row, "finetuned": {**tuned, "der": "high"}})])
    assert main(["bench", "report", str(bench)]) == 2
    assert "line 2: field 'finetuned'" in capsys.readouterr().err


def test_bench_report_tells_of_a_dropped_last_line(bench, capsys):
    lines = _lines(bench / RESULTS)
    _write(bench / RESULTS, [lines[0], lines[1][:40]], newline=False)
    assert main(["bench", "report", str(bench)]) == 0
    assert "dropped its last line (2)" in capsys.readouterr().err
    assert "(1 cells)" in (bench / "results.md").read_text()


def test_resume_refuses_a_damaged_file_before_any_work_and_leaves_it_as_it_was(bench, no_work):
    lines = _lines(bench / RESULTS)
    _write(bench / RESULTS, [lines[0], '{"key": 1', lines[1]])
    before = (bench / RESULTS).read_bytes()
    with pytest.raises(OnpError, match=r"results\.jsonl, line 2: not a JSON row"):
        run_bench(tiny(), bench, resume=True, progress=False)
    assert (bench / RESULTS).read_bytes() == before


def test_resume_refuses_another_grids_cells(bench, no_work):
    row = json.loads(_lines(bench / RESULTS)[0])
    row["config"]["attack"]["name"], row["key"] = "blended", row["key"].replace("badnets", "blended")
    append(bench / RESULTS, row)
    with pytest.raises(OnpError, match="1 cell\\(s\\) this grid does not have .*another grid's file"):
        run_bench(tiny(), bench, resume=True, progress=False)


def test_resume_after_a_crash_mid_append_redoes_the_cut_cell_once(bench, capsys):
    lines = _lines(bench / RESULTS)
    _write(bench / RESULTS, [lines[0], lines[1][:-5]], newline=False)
    run_bench(tiny(), bench, resume=True, progress=False)
    assert "dropped its last line" in capsys.readouterr().err
    again = read_cells(bench / RESULTS)
    assert sorted(r["key"] for r in again) == sorted(json.loads(s)["key"] for s in lines)


def test_a_whole_last_row_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, [json.dumps(PROTOCOL), json.dumps(COST)], newline=False)
    assert len(ROWS.read_protocol(path)) == 2
    end_last_line(path)
    append(path, {**PROTOCOL, "key": "badnets/s101/0.05/mnp", "method": "mnp"})
    assert [r["key"] for r in ROWS.read_protocol(path)] == [PROTOCOL["key"], COST["key"], "badnets/s101/0.05/mnp"]


def test_the_committed_results_files_pass_their_readers():
    results = ROOT / "benchmarks" / "results"
    for name in ("onp.jsonl", "onp_fresh.jsonl", "onp_signals.jsonl", "onp_sampled.jsonl", "onp_shipped_repair.jsonl"):
        assert ROWS.read_protocol(results / name)
    for path in sorted(results.glob("suite-*.jsonl")):
        assert read_suite_rows(path)
    assert ROWS.read_stopping(results / "onp_stopping.jsonl")
    assert ROWS.read_margins(results / "test_margins.jsonl")
    assert ROWS.read_separability(results / "feature_separability.jsonl")
    assert ROWS.read_choices(results / "onp_choices.jsonl")
    assert ROWS.read_verdicts(results / "signal_verdicts.jsonl")
    for path in sorted(results.glob("verdict_choice*.jsonl")):
        assert ROWS.read_verdict_choice(path)
    for folder in sorted(results.glob("bench-*")):
        assert read_cells(folder / RESULTS)


def test_a_benchmark_script_exits_2_with_one_line_on_a_damaged_file(tmp_path):
    path = tmp_path / "onp.jsonl"
    _write(path, [json.dumps(PROTOCOL), json.dumps({**PROTOCOL, "asr": None})])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "onp_units.py"), "--results", str(path), "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"onp_units.py: error: {path}, line 2: field 'asr' must be a number in [0, 1]; {ROWS.FIX}\n"


def test_bench_units_names_a_missing_label_or_model_in_one_line(tmp_path):
    results = str(ROOT / "benchmarks" / "results" / "bench-fashion-mnist-shift-onp-repair" / RESULTS)
    script = str(ROOT / "benchmarks" / "bench_units.py")
    env = {**os.environ, "ONP_CACHE": str(tmp_path)}
    for label, message in [("onp-nope", "holds no cell of defense 'onp-nope'"), ("onp", "is not in the cache")]:
        args = [sys.executable, script, results, label, results, "onp-verdict-repair", "--out", str(tmp_path / "u.md")]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "u.md").exists()


def test_the_margins_reader_refuses_damaged_rows(tmp_path):
    path = tmp_path / "test_margins.jsonl"
    good = {"key": "m/0", "measure": "m", "seed": 0, "values": {"asr": 0.95, "margin": -0.01}}
    _write(path, [json.dumps(good)])
    assert ROWS.read_margins(path) == [good]
    for bad, match in [
        ({**good, "values": {"asr": "high"}}, "in 'values'|field 'values' entry 'asr': must be a finite number"),
        ({k: v for k, v in good.items() if k != "seed"}, "field 'seed' is missing"),
        (PROTOCOL, "field 'measure' is missing"),
    ]:
        _write(path, [json.dumps(good), json.dumps(bad)])
        with pytest.raises(OnpError, match=rf"^{path}, line 2: .*({match})"):
            ROWS.read_margins(path)


def test_a_report_json_is_checked_before_a_script_resumes_from_it(tiny_artifact, tmp_path):
    from onp_env.defend import defend_artifact

    out, report = defend_artifact(tiny_artifact, "magnitude", {"ratio": 0.1}, tmp_path / "cell")
    assert ROWS.read_report(out / "report.json") == report
    for damage, match in [
        (lambda r: {**r, "asr": 2.0}, "field 'asr' must be a number in \\[0, 1\\]"),
        (lambda r: {k: v for k, v in r.items() if k != "before"}, "field 'before' is missing"),
        (lambda r: {**r, "before": {"acc": 0.9}}, "in 'before': field 'asr' is missing"),
        (lambda r: [r], "must be a JSON object, got list"),
    ]:
        (out / "report.json").write_text(json.dumps(damage(report)))
        with pytest.raises(OnpError, match=rf"^{out / 'report.json'}: {match}; remove its folder"):
            ROWS.read_report(out / "report.json")
    (out / "report.json").write_text('{"acc": 1e999}')
    with pytest.raises(OnpError, match="not valid JSON .*overflows"):
        ROWS.read_report(out / "report.json")


def test_optional_fields_are_checked_where_present(tmp_path):
    path = tmp_path / "feature_separability.jsonl"
    clean = {"key": "m", "attack": None, "seed": 1, "target": None, "seconds": {"inversion": 3.0},
             "detection": {"inversion": {"anomaly_index": 1.5, "suspect": 8, "norms": [20.0, 30.0]}}}  # fmt: skip
    backdoored = {**clean, "attack": "badnets", "target": 0, "layer": "fc", "positives_in_layer": 12,
                  "auc": {"gamma": {"layer": 0.5, "all": 0.4}}}  # fmt: skip
    _write(
        path, [json.dumps(clean), json.dumps(backdoored), json.dumps({"key": "anp 2000", "model": "m", "seconds": 9})]
    )
    assert len(ROWS.read_separability(path)) == 3
    _write(path, [json.dumps({**backdoored, "auc": {"gamma": {"layer": 1.5, "all": 0.4}}})])
    with pytest.raises(OnpError, match="line 1: field 'auc' entry 'gamma': field 'layer' must be a number in"):
        ROWS.read_separability(path)


def test_the_protocol_report_groups_a_configs_training_seeds_and_pairs_their_models(monkeypatch):
    script = benchmark_settings(monkeypatch)
    names = ["onp", "cand", "cand seed 1", "cand seed 2", "orphan seed 1"]
    assert script.training_seeds(names) == {"cand": {0: "cand", 1: "cand seed 1", 2: "cand seed 2"}}

    def cell(method, seed, der):
        return {**PROTOCOL, "method": method, "seed": seed, "der": der, "asr": 1 - der, "acc": 0.9 - der / 10}

    # seed 1's agent has not reached model 103 yet: every seed's mean is over 101 and 102 alone
    cells = [cell("cand", 101, 0.9), cell("cand", 102, 0.7), cell("cand", 103, 0.1),
             cell("cand seed 1", 101, 0.5), cell("cand seed 1", 102, 0.5)]  # fmt: skip
    row = [line for line in script._seeds_md(cells, ["cand", "cand seed 1"]) if line.startswith("| cand |")]
    assert row == ["| cand | 5% | 2 | 2 | 80.0 / 50.0 | 65.0 ± 21.2 | 35.0 ± 21.2 | 6.5 ± 2.1 |"]
    assert script._seeds_md(cells, ["cand"]) == []


def test_the_protocol_report_tables_a_fraction_without_the_methods_run_only_at_another(monkeypatch, tmp_path):
    script = benchmark_settings(monkeypatch)
    path, out = tmp_path / "p.jsonl", tmp_path / "p.md"
    ran = {0.01: ["onp", "onp verdict repair sweep agent limit lr 8 epochs"],
           0.05: ["onp", "onp verdict repair sweep agent limit lr 3 epochs"]}  # fmt: skip
    for fraction, methods in ran.items():
        for method in methods:
            for seed in (101, 102):
                append(path, {**PROTOCOL, "key": f"badnets/s{seed}/{fraction:g}/{method}", "seed": seed,
                              "fraction": fraction, "method": method})  # fmt: skip
    script.report_md(path, out)
    text = out.read_text()
    for fraction in ("1%", "5%"):  # each summary table over both models, of the methods run at its fraction
        assert f"## All held-out attacks, {fraction} defense data (badnets; 2 models on which every method ran)" in text
    assert (
        "Before: ACC 90.0 ± 0.0, ASR 100.0 ± 0.0, RA 0.0 ± 0.0 (2 models)." in text
    )  # without the oracle: one before a model


def test_the_protocol_report_tables_a_setting_run_at_one_fraction_and_holds_back_one_still_running(
    monkeypatch, tmp_path
):
    script = benchmark_settings(monkeypatch)
    command = "shipped agent verdict repair sweep agent limit lr {} epochs"
    assert {command.format(8), command.format(3)} <= set(script.SETTINGS)
    path, out = tmp_path / "p.jsonl", tmp_path / "p.md"
    ran = {(0.01, command.format(8)): (101, 102), (0.05, command.format(3)): (101, 102),
           (0.01, "mnp"): (101, 102), (0.05, "mnp"): (101, 102), (0.05, "anp"): (101,)}  # fmt: skip
    for (fraction, method), seeds in ran.items():
        for seed in seeds:
            append(path, {**PROTOCOL, "key": f"badnets/s{seed}/{fraction:g}/{method}", "seed": seed,
                          "fraction": fraction, "method": method})  # fmt: skip
    script.report_md(path, out)
    text = out.read_text()
    # each command has every model at the one fraction it runs at: a row of its table, not "still running";
    # anp has one model of two at 5%
    assert "Still running, left out of the tables until they reach every model: `anp` (1 of 2 cells)." in text
    for fraction, epochs in (("1%", 8), ("5%", 3)):
        table = text.split(f"## All held-out attacks, {fraction} defense data (badnets; 2 models")[1].split("##")[0]
        assert f"| {command.format(epochs)} | 2 |" in table and "| mnp | 2 |" in table and "anp" not in table


def test_the_verdicts_report_counts_the_larger_verdict_naming_the_target(monkeypatch):
    script = benchmark_settings(monkeypatch, "signal_verdicts")

    def row(model, attack, inversion, latent):
        verdicts = {"inversion": dict(zip(("suspect", "anomaly_index"), inversion, strict=True)),
                    "latent_gap": dict(zip(("suspect", "anomaly_index"), latent, strict=True))}  # fmt: skip
        return {"key": f"held-out/{model}", "role": "held-out", "model": model, "attack": attack, "target": 0,
                "mode": "all-to-one", "reference": "r", "verdicts": verdicts}  # fmt: skip

    rows = [row("a", "badnets", (0, 8.0), (6, 1.0)), row("b", "wanet", (8, 1.0), (0, 9.0)),
            row("c", "wanet", (8, 3.0), (0, 2.0)), row("d", "sig", (4, 3.0), (9, 1.0))]  # fmt: skip
    for r in rows:
        assert ROWS.VERDICTS.problem(r) is None
    assert [script.larger(r) for r in rows] == ["inversion", "latent_gap", "inversion", "inversion"]
    text = script.report(rows)
    assert "| wanet | 2 | 0 | 2.0 (1.0-3.0) | 2 | 5.5 (2.0-9.0) | 1 | 0 |" in text
    assert "| all | 4 | 1 | 3.0 (1.0-8.0) | 2 | 1.5 (1.0-9.0) | 2 | 1 |" in text
    assert "| c | wanet | 0 | 8 (3.00) | 0 (2.00) | inversion (wrong class) |" in text


def test_the_verdict_stop_report_marks_the_setting_with_the_best_shadow_der(monkeypatch):
    script = benchmark_settings(monkeypatch, "verdict_stop")
    before = {"acc": 0.9, "asr": 1.0, "ra": 0.0}

    def row(model, attack, stop_index, der, acc=0.89):
        return {"key": f"{model}/0.05", "model": model, "attack": attack, "fraction": 0.05, "stop_index": stop_index,
                "stop_asr": 0.05, "follows": "latent_gap" if attack == "wanet" else "inversion", "acc": acc,
                "asr": 2 * (1 - der), "ra": 0.5, "der": der, "before": before, "pruned": 3}  # fmt: skip

    rows = [row("a", "wanet", 2.0, 0.6), row("b", "badnets", 2.0, 0.9),
            row("a", "wanet", 0.0, 0.8, acc=0.85), row("b", "badnets", 0.0, 0.9)]  # fmt: skip
    for r in rows:
        assert ROWS.VERDICT_STOP.problem(r) is None
    text = script.report(rows)
    assert "| **larger index** | **0** | **0.05** | 2 | 3.0 ± 2.0 | 30.0 ± 10.0 | **85.0 ± 5.0** | 3.0 ± 0.0 |" in text
    assert "| larger index | 2 | 0.05 | 90.0 (0%) | 60.0 (100%) |" in text
    assert "Chosen: `stop_index=0`, `stop_asr=0.05`." in text
    assert ROWS.VERDICT_STOP.problem({**rows[0], "key": "a/0.01"}) is not None
    first = {**rows[2], "key": "a/0.05/inversion first", "inversion_first": True, "der": 0.95, "acc": 0.89}
    assert ROWS.VERDICT_STOP.problem(first) is None
    assert ROWS.VERDICT_STOP.problem({**first, "key": "a/0.05"}) is not None
    assert "| inversion_first | 0 | 0.05 |  | 95.0 (100%) |" in script.report([*rows, first])  # in progress
    text = script.report([*rows, first, {**rows[3], "key": "b/0.05/inversion first", "inversion_first": True}])
    best = "| **inversion_first** | **0** | **0.05** | 2 | 1.0 ± 0.0 | 30.0 ± 10.0 | **92.5 ± 2.5** | 3.0 ± 0.0 |"
    assert best in text
    assert "Chosen: `inversion_first`, `stop_index=0`" in text
    probe = {**first, "key": "a/0.05/inversion first/latent probe", "latent_probe": True}
    assert ROWS.VERDICT_STOP.problem(probe) is None and ROWS.VERDICT_STOP.problem({**probe, "key": first["key"]})
    assert "| inversion_first + latent_probe | 0 | 0.05 |" in script.report([*rows, first, probe])
