"""Presets (`onp defend --preset NAME`, a bench spec's `preset`): parameters measured together, by name, the
user's own settings on top, the values that depend on the defense set's size resolved once it is read."""

import json
from pathlib import Path

import pytest

from baselines.controls import Magnitude
from onp_env.bench.run import RESULTS, read_cells, run_bench
from onp_env.cli import main
from onp_env.defend import defend_artifact
from onp_env.presets import Preset, merged

from .test_bench import tiny


def test_merged_changes_one_key_of_a_section_and_neither_input():
    base = {"repair_with": "verdict", "repair": {"repair_epochs": 3, "unlearn": 0.5}}
    over = {"repair": {"repair_epochs": 5}, "budget": 0.1}
    assert merged(base, over) == {"repair_with": "verdict", "repair": {"repair_epochs": 5, "unlearn": 0.5},
                                  "budget": 0.1}  # fmt: skip
    assert base["repair"] == {"repair_epochs": 3, "unlearn": 0.5} and over == {"repair": {"repair_epochs": 5},
                                                                                "budget": 0.1}  # fmt: skip
    assert merged({"repair": {"a": 1}}, {"repair": 7}) == {"repair": 7}  # a value replaces a section whole
    assert merged({"repair": {"a": 1}, "b": 2}, {"repair": {}}) == {"repair": {}, "b": 2}  # an empty one empties it


def test_a_preset_takes_its_few_images_values_below_its_line():
    p = Preset("test", {"repair": {"repair_epochs": 3, "unlearn": 0.5}}, few={"repair": {"repair_epochs": 8}},
               few_below=1342)  # fmt: skip
    assert p.resolve(600) == {"repair": {"repair_epochs": 8, "unlearn": 0.5}}
    assert p.resolve(1342) == p.resolve(3000) == {"repair": {"repair_epochs": 3, "unlearn": 0.5}}
    assert p.both({"repair": {"unlearn": 0.4}}) == ({"repair": {"repair_epochs": 8, "unlearn": 0.4}},
                                                    {"repair": {"repair_epochs": 3, "unlearn": 0.4}})  # fmt: skip
    assert p.both({"repair": {}}) == ({"repair": {}}, {"repair": {}})  # `--set repair={}`: the section goes


@pytest.mark.parametrize(
    ("method", "preset", "message"),
    [
        ("verdict", "best", r"verdict has no preset 'best' \(its presets: recommended\)"),
        ("magnitude", "recommended", r"magnitude has no preset 'recommended' \(it has none; set its parameters"),
    ],
)
def test_an_unknown_preset_exits_2_with_one_line_before_any_work(method, preset, message, tiny_artifact, tmp_path,
                                                                 capsys, no_work):  # fmt: skip
    args = ["defend", "--method", method, "--preset", preset, "--artifact", str(tiny_artifact)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onp: error: ") and err.count("\n") == 1 and __import__("re").search(message, err)
    assert not (tmp_path / "o").exists()


def test_onps_resnet_preset_is_the_setting_its_bench_config_measured():
    import yaml

    from agents.defense import ONP

    path = Path(__file__).parents[1] / "configs" / "bench" / "fashion-mnist-resnet-onp-reinit-inversion.yaml"
    (spec,) = yaml.safe_load(path.read_text())["defenses"]  # read as text: the grid's Fashion-MNIST is optional here
    assert spec["name"] == "onp" and ONP.presets["resnet"].resolve(3000) == spec["params"]
    defense = ONP(**spec["params"])  # its parameters pass the checks a deployment makes first
    assert defense.repairer is not None and defense.repairer.params.repair_reinit_head == "inversion"


def test_a_users_set_that_breaks_a_preset_is_refused_before_any_work(tiny_artifact, tmp_path, capsys, no_work):
    args = ["defend", "--method", "onp", "--preset", "recommended", "--artifact", str(tiny_artifact)]
    assert main([*args, "--set", "repair.unlearn=2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unlearn" in err


def test_defend_resolves_a_preset_by_the_defense_sets_size_the_users_sets_on_top(tiny_artifact, tmp_path,
                                                                                monkeypatch, capsys):  # fmt: skip
    full = len(json.loads((tiny_artifact / "manifest.json").read_text())["split"]["defense_indices"])
    preset = Preset("test", {"ratio": 0.2}, few={"ratio": 0.1}, few_below=full)
    monkeypatch.setattr(Magnitude, "presets", {"p": preset})
    _, many = defend_artifact(tiny_artifact, "magnitude", {}, tmp_path / "a", preset="p")
    _, few = defend_artifact(tiny_artifact, "magnitude", {"defense_fraction": 0.03}, tmp_path / "b", preset="p")
    _, mine = defend_artifact(tiny_artifact, "magnitude", {"ratio": 0.3, "defense_fraction": 0.03}, tmp_path / "c",
                              preset="p")  # fmt: skip
    assert few["defense_images"] < full == many["defense_images"]
    assert [r["details"]["params"]["ratio"] for r in (many, few, mine)] == [0.2, 0.1, 0.3]
    assert many["preset"] == few["preset"] == "p" and many["pruned"] > few["pruned"]
    assert main(["defend", "--method", "magnitude", "--preset", "p", "--artifact", str(tiny_artifact), "--out",
                 str(tmp_path / "d"), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["details"]["params"]["ratio"] == 0.2


def test_a_bench_spec_takes_a_preset_per_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(Magnitude, "presets", {"p": Preset("test", {"ratio": 0.2}, few={"ratio": 0.1},
                                                           few_below=40)})  # fmt: skip
    cfg = tiny(seeds=[101], defenses=[{"name": "magnitude", "preset": "p", "label": "mag-p"}])
    run_bench(cfg, tmp_path / "b", progress=False)
    rows = {r["fraction"]: r for r in read_cells(tmp_path / "b" / RESULTS)}
    assert rows[0.02]["defense_images"] < 40 <= rows[0.05]["defense_images"]
    assert rows[0.02]["pruned"] < rows[0.05]["pruned"] and {r["preset"] for r in rows.values()} == {"p"}
    assert [rows[f]["preset_params"]["ratio"] for f in (0.02, 0.05)] == [0.1, 0.2]  # what ran, not only the name


def test_a_bench_spec_whose_preset_breaks_only_with_few_images_is_refused_before_any_work(monkeypatch):
    from onp_env import OnpError

    monkeypatch.setattr(Magnitude, "presets", {"p": Preset("test", {"ratio": 0.2}, few={"ratio": 2.0}, few_below=40)})
    with pytest.raises(OnpError, match="ratio"):
        tiny(seeds=[101], defenses=[{"name": "magnitude", "preset": "p"}])


@pytest.mark.parametrize("method", ["verdict", "onp"])
def test_a_preset_refused_by_a_model_it_was_not_measured_on_says_which_models_it_is_for(
    method, tiny_artifact, tmp_path, capsys, no_work
):
    args = ["defend", "--method", method, "--preset", "recommended", "--artifact", str(tiny_artifact)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describes SmallCNN models of 206970 parameters" in err
    assert err.rstrip().endswith("(preset 'recommended' is for Fashion-MNIST small CNNs: it reads the class "
                                 "reference measured on them)")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_defend_prints_the_notes_a_method_left_in_its_details(tiny_artifact, tmp_path, monkeypatch, capsys):
    scores = Magnitude.scores

    def noting(self, *args):
        self.extra["notes"] = ["first thing decided", "second"]
        return scores(self, *args)

    monkeypatch.setattr(Magnitude, "scores", noting)
    assert (
        main(["defend", "--method", "magnitude", "--artifact", str(tiny_artifact), "--out", str(tmp_path / "o")]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["  first thing decided", "  second", str(tmp_path / "o")]


def test_the_hint_after_a_run_is_the_defense_classs_and_only_where_a_better_measured_setting_exists():
    from onp_env.registry import defense_class

    onp = defense_class("onp")
    assert "--preset recommended" in onp.run_hint({})
    # an agent of one's own, or a run already repaired, is not the case the hint's numbers describe
    assert onp.run_hint({"agent": "my-agent"}) is None and onp.run_hint({"repair_with": "verdict"}) is None
    assert defense_class("magnitude").run_hint({}) is None
