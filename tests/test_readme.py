"""The README's examples run as written."""

import copy
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def recommended_command() -> str:
    """The README's recommended `verdict` command, from its section to the end of the paragraph that says what its
    preset stands for."""
    text = README.read_text()
    start = text.index("**Which defense to use today**")
    return text[start : text.index("\n\n", text.index("The preset", start))]


def settings_of(command: str) -> dict:
    """A command's `--set KEY=VALUE` pairs as parameters."""
    from onp_env.config import apply_overrides

    return apply_overrides({}, re.findall(r"--set\s+([^\s`]+)", command))


def benchmark_settings(monkeypatch, name: str = "onp_vs_baselines"):
    """benchmarks/NAME.py (onp_vs_baselines: the settings), imported as the benchmarks run it (its siblings on the
    path)."""
    import importlib.util

    benchmarks = README.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # the script imports rows as a sibling
    spec = importlib.util.spec_from_file_location(name, benchmarks / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_environment_and_sb3_examples_run():
    blocks = section_code("The environment")
    assert len(blocks) == 2, "the environment section should hold the gym.make and the MaskablePPO examples"
    scope: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), scope)
    env = scope["env"].unwrapped
    assert env.action_masks()[int(scope["action"])]


def own_model_example(seed: int = 0) -> dict:
    """The README's "defend a model of your own" code on the BadNets digits model trained with `seed`."""
    from onp_env import build_artifact, load_artifact
    from onp_env.config import LabConfig, load_config

    cfg = load_config(LabConfig, str(README.parent / "configs" / "attack" / "badnets-digits.yaml"), [f"seed={seed}"])
    art = load_artifact(build_artifact(cfg, progress=False))
    x_defense, y_defense = art.defense_set()
    scope = {"model": art.model, "x_defense": x_defense, "y_defense": y_defense}
    scope |= {"x_test": x_defense, "y_test": y_defense}  # stands in for a test split of your own
    (code,) = [c for c in section_code("Baseline defenses") if "defense_class" in c]
    exec(compile(code, str(README), "exec"), scope)
    return scope


def own_model_accuracy(seed: int) -> dict[str, float]:
    scope = own_model_example(seed)
    return {"acc": scope["evaluate"](scope["result"].model, scope["x_defense"], scope["y_defense"])["acc"]}


def test_the_own_model_example_runs():
    scope = own_model_example()
    result = scope["result"]
    assert result.method == "mnp" and all(0 <= u < len(result.scores) for u in result.pruned)
    accuracy = scope["evaluate"](result.model, scope["x_defense"], scope["y_defense"])["acc"]
    assert 0.5 < accuracy <= 1  # MNP keeps the clean accuracy (100% on the defense set at model seeds 0-19)


@pytest.mark.xdist_group("digits-v0-test")  # with test_suite.py: the worker that built the split
def test_the_suite_example_runs(digits_test_split):
    (code,) = section_code("Task suites for RL research")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["info"]["model"] == "digits-v0/test/002" and scope["terminated"] and scope["info"]["stopped"]


def test_the_recommended_defense_command_is_verdicts_preset_and_verdict_accepts_it():
    from baselines.verdict import Verdict

    command = recommended_command()
    assert "onp defend --method verdict --preset recommended --artifact DIR" in command
    params = Verdict.presets["recommended"].resolve(600)
    said = settings_of(command)  # the `--set`s the README says the preset stands for
    assert set(said) <= set(params) and Verdict(**said).params == Verdict(**params).params
    assert params["untargeted"] is True and params["reference_from"] == "fashion-mnist"
    defense = Verdict(**params)  # every setting known, in range, and the shipped reference has what it reads
    assert defense.params.repair_epochs == 5 and defense.params.untargeted and defense.params.repair_blend
    assert defense.params.blend_verdict and len(defense.blend_reference) == 10


def test_the_recommended_command_is_the_setting_the_benchmarks_time_and_dump(monkeypatch):
    """deploy_cost.py and verdict_choice.py measure onp_vs_baselines.RECOMMENDED: it must be the README's command,
    whatever the defense set's size."""
    from baselines.verdict import Verdict

    script = benchmark_settings(monkeypatch)
    method, params = script.SETTINGS[script.RECOMMENDED]
    assert method == "verdict" and script.RECOMMENDED in script.REPAIRED
    preset = Verdict.presets["recommended"]
    assert preset.resolve(600) == preset.resolve(3000) == params


def test_the_shipped_agent_command_repairs_as_the_benchmarks_measured(monkeypatch):
    """The README's `onp defend --method onp --preset recommended` is onp_vs_baselines' agent command measured with
    600 images (1% of Fashion-MNIST's training split: 8 epochs) and with 3000 (5%: 4 epochs), which deploy_cost.py
    times side by side with ANP; the README says what the preset stands for."""
    from agents.defense import FEW_IMAGES, ONP

    text = README.read_text()
    assert "onp defend --method onp --preset recommended --artifact ARTIFACT_DIR" in text
    said = " ".join(text.split())
    assert f"or `--set repair.repair_epochs=8` where the defense set holds fewer than {FEW_IMAGES} images" in said
    assert "`--set repair_sweep=true --set repair.repair_lr=0.02 --set repair.repair_epochs=4`" in said
    script = benchmark_settings(monkeypatch)
    settings = script.SETTINGS
    compared = benchmark_settings(monkeypatch, "deploy_cost").COMPARED
    timed = {name for _, names in compared.values() for name in names}
    preset = ONP.presets["recommended"]
    for images, epochs in ((600, 8), (3000, 4)):  # the preset as it runs today
        assert settings[f"shipped agent verdict repair sweep agent limit lr {epochs} epochs give back verify"] == (
            "onp", preset.resolve(images))  # fmt: skip
        # as onp_vs_baselines --agent-preset names its runs (run_cell finds the setting by the name's ending) and as
        # deploy_cost's `presets at N%` times it
        suffix = script.preset_suffix(images)
        assert next(s for s in script.AGENT_REPAIRS if f"onp{suffix}".endswith(s)) == suffix
        assert script.SETTINGS[script.AGENT_REPAIRS[suffix]] == ("onp", preset.resolve(images))
        fraction, names = compared[f"presets at {images // 600}%"]
        assert fraction == images / 60_000 and names[0] == script.AGENT_REPAIRS[suffix]
    assert "shipped agent verdict repair sweep agent limit lr 4 epochs give back verify" in timed  # 4 since 2026-12-07
    # 4 epochs with 3000 images since 2026-12-07 (repair_epochs_folds_choose-folds.md): the runs measured before it
    # with 3, and before verify_sweep and give_back, are the preset with those changed
    for images, epochs in ((600, 8), (3000, 3)):
        name = f"shipped agent verdict repair sweep agent limit lr {epochs} epochs"
        resolved = copy.deepcopy(preset.resolve(images))
        resolved["repair"]["repair_epochs"] = epochs
        assert settings[f"{name} give back verify"] == ("onp", resolved)
        # verify_sweep since 2026-12-07 (verify_sweep_choose-folds.md), give_back since that morning: each changes only
        # the runs it flags or a model verdict does not flag (onp_unflagged.py), so the runs measured before stand
        assert resolved["repair"].pop("verify_sweep") is True and settings[f"{name} give back"] == ("onp", resolved)
        assert resolved.pop("unflagged") == "give_back" and "and `--set unflagged=give_back` (since 2026-12-07" in said
        assert settings[name] == ("onp", resolved) and name in timed
    verdict = settings[benchmark_settings(monkeypatch).RECOMMENDED][1]
    assert preset.resolve(600)["repair"] == {**verdict, "repair_lr": 0.02, "repair_epochs": 8}
    defense = ONP(**preset.resolve(600))
    assert not defense.params.agent and defense.repairer is not None
