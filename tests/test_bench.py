"""`onp bench`: a tiny grid end to end, resume without double counting, reports from the results
file alone, identical numbers for any worker count, and bad grids refused before any work."""

import json
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import onp_env.registry as registry
from baselines.common import Defense, top_units
from onp_env import OnpError
from onp_env.bench.config import BenchConfig, check, load_bench_config
from onp_env.bench.report import table
from onp_env.bench.run import RESULTS, read_cells, run_bench
from onp_env.cli import main
from onp_env.config import bounded, from_dict
from onp_env.registry import defense_names

from .conftest import fake_cifar10, fake_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny", "models": [{"name": "small_cnn", "kwargs": {"channels": [8, 8], "hidden": 16}}],
    "attacks": [{"name": "badnets"}], "train": {"epochs": 3}, "seeds": [101, 102], "fractions": [0.02, 0.05],
    "defenses": [{"name": "magnitude"}, {"name": "random", "params": {"ratio": 0.1}}],
}  # fmt: skip


def tiny(**changes):
    cfg = from_dict(BenchConfig, {**TINY, **changes}, "tiny")
    check(cfg)
    return cfg


def test_a_grid_runs_resumes_and_reports(tmp_path):
    report = run_bench(tiny(), tmp_path / "b", progress=False)
    rows = read_cells(tmp_path / "b" / RESULTS)
    assert len(rows) == 2 * 2 * 2 == len({r["key"] for r in rows})
    r = rows[0]
    assert {"acc", "asr", "ra", "der", "before", "pruned", "units", "seconds", "version", "host", "config"} <= set(r)
    text = report.read_text()
    assert "### DER" in text and "**" in text and "2% defense data" in text
    for name in ("asr_acc_vs_pruned.png", "der.png", "seconds.png"):
        assert (tmp_path / "b" / "plots" / name).stat().st_size > 5000
    # a killed run: drop two cells (and leave a half line), resume redoes exactly those
    lines = (tmp_path / "b" / RESULTS).read_text().splitlines()
    (tmp_path / "b" / RESULTS).write_text("\n".join(lines[:-2]) + '\n{"key": "cut sh')
    with pytest.raises(OnpError, match="pass --resume"):
        run_bench(tiny(), tmp_path / "b", progress=False)
    run_bench(tiny(), tmp_path / "b", resume=True, progress=False)
    again = read_cells(tmp_path / "b" / RESULTS)
    assert len(again) == 8 and {r["key"] for r in again} == {r["key"] for r in rows}
    redone = {r["key"]: r for r in again[-2:]}
    assert all(redone[k]["units"] == next(r for r in rows if r["key"] == k)["units"] for k in redone)
    # the report comes from the results file alone
    (tmp_path / "b" / "results.md").unlink()
    assert main(["bench", "report", str(tmp_path / "b")]) == 0 and (tmp_path / "b" / "results.md").is_file()


def test_a_grid_holds_several_labelled_settings_of_one_attack(tmp_path):
    two_px = {"patch_size": 2, "position": "top-left"}
    attacks = [
        {"name": "badnets", "label": "badnets-3px"},
        {"name": "badnets", "label": "badnets-2px-tl", "params": two_px},
    ]
    cfg = tiny(attacks=attacks, seeds=[101], fractions=[0.05], defenses=[{"name": "magnitude"}])
    report = run_bench(cfg, tmp_path / "b", progress=False)
    rows = read_cells(tmp_path / "b" / RESULTS)
    assert sorted(r["key"].split("/")[2] for r in rows) == ["badnets-2px-tl", "badnets-3px"]
    assert rows[0]["before"] != rows[1]["before"]  # two models, not one trained twice
    assert "badnets-3px (digits" in report.read_text() and "badnets-2px-tl (digits" in report.read_text()


@pytest.mark.slow  # two spawned workers and the model trained twice (about 15 s); resume's worker test stays
def test_worker_count_does_not_change_the_numbers(tmp_path, monkeypatch):
    runs = []
    for workers in (1, 2):  # a cache each: the model trains under each worker count, whatever ran before
        monkeypatch.setenv("ONP_CACHE", str(tmp_path / f"cache-{workers}"))
        runs.append(run_bench(tiny(fractions=[0.05], seeds=[101]), tmp_path / f"w{workers}", workers=workers,
                              progress=False))  # fmt: skip
    one, two = runs

    def strip(p):
        return sorted((r["key"], r["acc"], r["asr"], r["units"]) for r in read_cells(p.parent / RESULTS))

    assert strip(one) == strip(two)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"defenses": [{"name": "nope"}]}, "unknown defense 'nope'"),
        ({"defenses": [{"name": "magnitude", "params": {"ratio": 5}}]}, "ratio must be"),
        ({"defenses": [{"name": "magnitude"}, {"name": "magnitude"}]}, "repeat a label"),
        ({"fractions": [0.0]}, "fractions"),
        ({"seeds": []}, "seeds is empty"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"attacks": [{"name": "badnets", "poison_rate": 2}]}, "poison_rate"),
        ({"defenses": [{"name": "onp", "params": {"agent_config": {"zoo": {"seeds": "x"}}}}]}, "seeds"),
        (
            {"defenses": [{"name": "onp", "params": {"repair_with": "nc", "repair": {"bogus": 1}}}]},
            "bogus in onp parameters: repair .nc.",
        ),
        ({"defenses": [{"name": "onp", "params": {"repair_with": "mnp"}}]}, "mnp has no repair of its own"),
        ({"defenses": [{"name": "onp", "params": {"budget_x": 1}}]}, "unknown key.s. budget_x in onp parameters"),
        ({"defenses": [{"name": "magnitude", "label": "../../../../tmp/victim"}]}, "becomes a folder name"),
        ({"name": "../up"}, "becomes a folder name"),
        ({"defenses": [{"name": "magnitude", "label": "m" * 65}]}, "use 1-64 letters"),
        ({"defenses": [{"name": "magnitude", "params": {"seed": 3}}]}, "come from the grid"),
        ({"defenses": [{"name": "magnitude", "params": {"semantics": "bogus"}}]}, "semantics must be one of"),
        ({"attacks": [{"name": "badnets"}, {"name": "badnets", "params": {"patch_size": 2}}]}, "own label"),
        ({"attacks": [{"name": "badnets", "label": "a/../b"}]}, "becomes part of folder names"),
        ({"datasets": [{"name": "digits"}, {"name": "digits"}]}, "lists a name twice"),
        ({"attacks": [{"name": "nope"}]}, "unknown attack 'nope'"),
        ({"attacks": [{"name": "badnets", "params": {"patch_size": 50}}]}, "patch"),
        ({"attacks": [{"name": "badnets", "target": 12}]}, "target label 12"),
        ({"models": [{"name": "small_cnn", "kwargs": {"depth": 3}}]}, "bad arguments for model"),
        ({"train": {"augment": "zzz"}}, "unknown augment"),
        ({"train": {"device": "tpu"}}, "unknown device"),
        ({"defenses": [{"name": "magnitude", "params": {"device": "tpu"}}]}, "unknown device 'tpu'"),
        ({"defenses": [{"name": "verdict", "preset": "best"}]}, "verdict has no preset 'best'"),
        ({"defenses": [{"name": "verdict", "preset": ["recommended"]}]}, r"bench.defenses\[0\].preset must be"),
        ({"defenses": [{"name": "verdict", "preset": "recommended", "params": {"unlearn": 2}}]}, "unlearn"),
        ({"fractions": [0.05, 0.0500000001]}, "distinct"),
        ({"seeds": [2**64]}, "seeds"),
    ],
)
def test_bad_grids_are_refused_before_any_work(change, match):
    with pytest.raises(OnpError, match=match):
        tiny(**change)


def test_cli_bench_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # quick.yaml names its agent config relative to the repository, as users run it
    assert main(["bench"]) == 2
    assert main(["bench", "report", str(tmp_path)]) == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the optional extra
    quick = str(ROOT / "configs/bench/quick.yaml")
    args = ["bench", "--config", quick, "--executor", "ray", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert 'pip install "onp-env[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_shipped_bench_configs_load(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their agent_config paths are relative to the repository
    # Their schema is checked on stand-in data of the right shape: Fashion-MNIST is optional here.
    monkeypatch.setenv("ONP_FASHION_MNIST_DIR", str(fake_idx_dataset(tmp_path / "fashion-mnist")))
    cifar = [f"datasets=[{{name: cifar10, root: {fake_cifar10(tmp_path / 'cifar')}}}]"]  # data of your own
    for path in sorted((ROOT / "configs" / "bench").glob("*.yaml")):
        cfg = load_bench_config(path, cifar if path.stem == "cifar10" else [])
        assert cfg.defenses and json.dumps(cfg.datasets)


def test_the_cifar10_grid_names_its_directory_and_runs_everything_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "configs" / "bench" / "cifar10.yaml"
    with pytest.raises(OnpError, match=r"^cifar10 needs its directory: .*ONP_CIFAR10_DIR"):
        load_bench_config(path)
    with pytest.raises(OnpError, match="not found: extract cifar-10-python.tar.gz there"):
        load_bench_config(path, [f"datasets=[{{name: cifar10, root: {tmp_path / 'nowhere'}}}]"])
    cfg = load_bench_config(path, [f"datasets=[{{name: cifar10, root: {fake_cifar10(tmp_path / 'cifar')}}}]"])
    assert [m["name"] for m in cfg.models] == ["preact_resnet18"]
    assert [a["name"] for a in cfg.attacks] == ["badnets", "blended", "wanet"]
    assert cfg.train.device == "auto" and all(s.params.get("device") == "auto" for s in cfg.defense_specs())
    assert sorted(s.name for s in cfg.defense_specs()) == defense_names()  # every defense, the learned one too


@pytest.mark.slow  # the quickstart's grid twice: about 10 minutes on 2 cores
def test_ray_gives_the_same_numbers_as_the_local_pool_on_the_quick_grid(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason='needs Ray: pip install "onp-env[ray]"')
    monkeypatch.chdir(ROOT)  # the grid names its agent config relative to the repository
    grid = load_bench_config(ROOT / "configs" / "bench" / "quick.yaml")
    local = run_bench(grid, tmp_path / "local", progress=False)
    remote = run_bench(grid, tmp_path / "ray", executor="ray", progress=False)  # a local 2-CPU cluster

    def strip(p):
        return sorted((r["key"], r["acc"], r["asr"], r["units"]) for r in read_cells(p.parent / RESULTS))

    assert strip(local) == strip(remote)


def test_one_worker_writes_each_cell_before_the_next(tmp_path, monkeypatch):
    import onp_env.bench.run as run_module

    real, calls = run_module.cell_task, []

    def killed_at_the_third(*args):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(run_module, "cell_task", killed_at_the_third)
    grid = tiny(fractions=[0.05])
    with pytest.raises(KeyboardInterrupt):
        run_bench(grid, tmp_path / "b", workers=1, progress=False)
    assert len(read_cells(tmp_path / "b" / RESULTS)) == 2  # the two finished cells were kept
    monkeypatch.setattr(run_module, "cell_task", real)
    run_bench(grid, tmp_path / "b", workers=1, resume=True, progress=False)
    assert len({r["key"] for r in read_cells(tmp_path / "b" / RESULTS)}) == 4


def test_a_cell_whose_defense_fails_is_listed_and_the_grid_goes_on(tmp_path, monkeypatch):
    import onp_env.defend

    real = onp_env.defend.defend_artifact

    def diverging(path, method, params, out, **kw):
        if method == "random" and params["seed"] == 102:
            raise OnpError("training diverged (loss nan): lower lr")
        return real(path, method, params, out, **kw)

    monkeypatch.setattr(onp_env.defend, "defend_artifact", diverging)
    grid, out = tiny(fractions=[0.05]), tmp_path / "b"
    with pytest.raises(OnpError, match=r"^1 of 4 cells failed, the first in the grid \S*/s102/0.05/random: training "
                                       r"diverged \(loss nan\): lower lr; \S*results.md lists them all"):  # fmt: skip
        run_bench(grid, out, workers=1, progress=False)
    assert sorted((r["defense"], r["seed"]) for r in read_cells(out / RESULTS)) == [
        ("magnitude", 101), ("magnitude", 102), ("random", 101)]  # fmt: skip
    text = (out / "results.md").read_text()
    assert "## Failed cells" in text and "s102/0.05/random | training diverged (loss nan): lower lr |" in text
    monkeypatch.setattr(onp_env.defend, "defend_artifact", real)  # --resume tries it again
    run_bench(grid, out, workers=1, resume=True, progress=False)
    assert len(read_cells(out / RESULTS)) == 4 and "Failed cells" not in (out / "results.md").read_text()
    assert not (out / "failed.jsonl").exists()


def _named(name):
    return name


def test_the_local_pool_reserves_each_tasks_cores():
    from concurrent.futures import Future

    from onp_env.bench.run import LocalExecutor

    started: dict[str, Future] = {}

    class Pool:  # starts nothing: the test finishes each task by hand
        def submit(self, fn, name):
            started[name] = Future()
            return started[name]

    pool = LocalExecutor(2, cores=2)
    pool.close()
    pool.pool = Pool()
    pending = {pool.submit(_named, "a", cpus=1), pool.submit(_named, "two", cpus=2), pool.submit(_named, "b")}
    assert list(started) == ["a", "b"]  # the 2-core task waits, the 1-core one behind it starts
    finished = pool.completed(pending)
    started["a"].set_result("a")
    assert next(finished)[1] == "a" and list(started) == ["a", "b"]  # one core free: not enough
    started["b"].set_result("b")
    assert next(finished)[1] == "b" and list(started) == ["a", "b", "two"]
    pending.add(pool.submit(_named, "huge", cpus=8))
    pending.add(pool.submit(_named, "c"))
    assert list(started) == ["a", "b", "two"]  # `two` holds both cores
    started["two"].set_result("two")
    assert next(finished)[1] == "two" and list(started)[3:] == ["huge"]  # more than the machine: alone
    started["huge"].set_result("huge")
    assert next(finished)[1] == "huge" and list(started)[4:] == ["c"]
    started["c"].set_result("c")
    assert next(finished)[1] == "c" and not pending


def test_bench_cells_reserve_the_cores_their_defense_uses(tmp_path, monkeypatch):
    from onp_env.bench.run import LocalExecutor, cell_task

    real, asked = LocalExecutor.submit, []

    def spy(self, fn, *args, cpus=1):
        if fn is cell_task:
            asked.append((args[3]["name"], cpus))
        return real(self, fn, *args, cpus=cpus)

    monkeypatch.setattr(LocalExecutor, "submit", spy)
    anp = {"name": "anp", "params": {"parallel": True, "iterations": 2}}
    grid = tiny(fractions=[0.05], seeds=[101], defenses=[{"name": "magnitude"}, anp])
    run_bench(grid, tmp_path / "b", workers=1, progress=False)
    assert sorted(asked) == [("anp", 2), ("magnitude", 1)]


def test_resume_ignores_worker_counts_but_not_a_corrupt_folder(tmp_path):
    run_bench(tiny(fractions=[0.05], seeds=[101]), tmp_path / "b", workers=1, progress=False)
    run_bench(tiny(fractions=[0.05], seeds=[101], workers=2), tmp_path / "b", resume=True, progress=False)
    (tmp_path / "b" / "config.json").write_text("{broken")
    with pytest.raises(OnpError, match="is corrupt"):
        run_bench(tiny(fractions=[0.05], seeds=[101]), tmp_path / "b", resume=True, progress=False)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "a/../../b"])
def test_shipped_files_cannot_leave_their_folder(tmp_path, name):
    from onp_env.bench.run import unpack

    with pytest.raises(OnpError, match="leaves"):
        unpack({name: b"x"}, tmp_path / "art")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "art").exists()


@dataclass
class PreparedParams:
    count: int = bounded(1, ge=0)
    prepared: bool = False


class Prepared(Defense):
    """A learned defense in miniature: `prepare` runs once before its cells and sets `prepared`."""

    name = "prepared"
    Params = PreparedParams

    @classmethod
    def prepare(cls, params, workdir, progress=True):
        return {**params, "prepared": workdir is not None}

    def scores(self, model, layout, x, y):
        return torch.arange(layout.num_units, dtype=torch.float)

    def select(self, scores, model, layout, x, y):
        if not self.params.prepared:
            raise OnpError("a cell of a learned defense ran before its preparation")
        return top_units(scores, torch.ones_like(scores, dtype=torch.bool))[: self.params.count]


def test_a_learned_defenses_cells_wait_for_its_preparation(tmp_path, monkeypatch):
    entries = dict(registry._entries())
    entries["prepared"] = EntryPoint("prepared", "tests.test_bench:Prepared", registry.GROUP)
    monkeypatch.setattr(registry, "_entries", lambda: entries)
    grid = tiny(defenses=[{"name": "magnitude"}, {"name": "prepared", "params": {"count": 2}}])
    run_bench(grid, tmp_path / "b", workers=1, progress=False)
    rows = read_cells(tmp_path / "b" / RESULTS)
    assert len(rows) == len({r["key"] for r in rows}) == 8
    assert sorted(r["pruned"] for r in rows if r["method"] == "prepared") == [2] * 4


def test_tables_rank_defenses_and_average_all_attacks_only_where_complete():
    def row(defense, attack, der):
        cfg = {"attack": {"name": attack}, "data": {"name": "d"}, "model": {"name": "m"}}
        return {"defense": defense, "config": cfg, "der": der}

    rows = [row("a", "x", 0.6), row("a", "y", 0.8), row("b", "x", 0.9), row("b", "x", 0.7), row("b", "y", 0.9)]
    rows += [row("c", "x", 0.99)]  # a partial run: c has not reached attack y
    lines = table(rows, "der", "max")
    assert lines[0] == "| defense | x (d, m) | y (d, m) | all attacks |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| c", "| b", "| a"]  # by mean DER
    assert lines[2] == "| c | **99.0** |  |  |"
    assert lines[3] == "| b | 80.0 ± 14.1 | **90.0** | **83.3 ± 11.5** |"
    assert lines[4] == "| a | 60.0 | 80.0 | 70.0 ± 14.1 |"
