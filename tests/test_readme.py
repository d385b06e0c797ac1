"""The README's examples run as written."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def recommended_command() -> str:
    """The README's recommended `verdict` command, from its section to the paragraph's end."""
    text = README.read_text()
    start = text.index("**Which defense to use today**")
    return text[start : text.index("\n\n", text.index("onp defend", start))]


def settings_of(command: str) -> dict:
    """A command's `--set KEY=VALUE` pairs as parameters."""
    from onp_env.config import apply_overrides

    return apply_overrides({}, re.findall(r"--set (\S+)", command))


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


def test_the_recommended_defense_command_holds_settings_verdict_accepts():
    from baselines.verdict import Verdict

    command = recommended_command()
    assert "--method verdict" in command
    params = settings_of(command)
    assert params["untargeted"] is True and params["reference_from"] == "fashion-mnist"
    defense = Verdict(**params)  # every setting known, in range, and the shipped reference has what it reads
    assert defense.params.repair_epochs == 5 and defense.params.untargeted and defense.params.repair_blend
    assert defense.params.blend_verdict and len(defense.blend_reference) == 10


def test_the_recommended_command_is_the_setting_the_benchmarks_time_and_dump(monkeypatch):
    """deploy_cost.py and verdict_choice.py measure onp_vs_baselines.RECOMMENDED: it must be the README's command."""
    from baselines.verdict import Verdict

    script = benchmark_settings(monkeypatch)
    method, params = script.SETTINGS[script.RECOMMENDED]
    assert method == "verdict" and script.RECOMMENDED in script.REPAIRED
    assert Verdict(**settings_of(recommended_command())).params == Verdict(**params).params


def test_the_shipped_agent_command_repairs_as_the_benchmarks_measured(monkeypatch):
    """The README's `onp defend --method onp` command is onp_vs_baselines' `shipped agent verdict repair` setting."""
    from agents.defense import ONP
    from baselines.verdict import Verdict

    text = README.read_text()
    start = text.index("onp defend --method onp --artifact ARTIFACT_DIR")
    command = settings_of(text[start : text.index("```", start)])
    defense = ONP(**command)
    settings = benchmark_settings(monkeypatch).SETTINGS
    method, params = settings["shipped agent verdict repair"]
    assert method == "onp" and params["repair_with"] == "verdict" and not defense.params.agent
    assert defense.repairer is not None and defense.repairer.params == Verdict(**params["repair"]).params
    # with 1% and 5% defense data the README adds the sweep, lr 0.02 and 8 or 3 epochs: the settings measured, which
    # deploy_cost.py times side by side with ANP
    said, timed = " ".join(text.split()), benchmark_settings(monkeypatch, "deploy_cost").COMPARED
    for fraction, epochs in ((0.01, 8), (0.05, 3)):
        added = {"repair_lr": 0.02, "repair_epochs": epochs}
        assert f"`--set repair_sweep=true --set repair.repair_lr=0.02 --set repair.repair_epochs={epochs}`" in said
        name = f"shipped agent verdict repair sweep agent limit lr {epochs} epochs"
        with_sweep, measured = (
            ONP(**{**command, "repair": {**command["repair"], **added}}, repair_sweep=True),
            ONP(**settings[name][1]),
        )
        assert replace(with_sweep.params, repair={}) == replace(measured.params, repair={})
        assert with_sweep.repairer is not None and measured.repairer is not None
        assert with_sweep.repairer.params == measured.repairer.params
        assert name in timed[f"agent repairs at {fraction:.0%}"][1]
