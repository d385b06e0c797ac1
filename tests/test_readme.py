"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_environment_and_sb3_examples_run():
    blocks = section_code("The environment")
    assert len(blocks) == 2, "the environment section should hold the gym.make and the MaskablePPO examples"
    scope: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), scope)
    env = scope["env"].unwrapped
    assert env.action_masks()[int(scope["action"])]


def test_the_own_model_example_runs():
    from onp_env import build_artifact, load_artifact
    from onp_env.config import LabConfig, load_config

    cfg = load_config(LabConfig, str(README.parent / "configs" / "attack" / "badnets-digits.yaml"))
    art = load_artifact(build_artifact(cfg))
    x_defense, y_defense = art.defense_set()
    scope = {"model": art.model, "x_defense": x_defense, "y_defense": y_defense}
    scope |= {"x_test": x_defense, "y_test": y_defense}  # stands in for a test split of your own
    (code,) = [c for c in section_code("Baseline defenses") if "defense_class" in c]
    exec(compile(code, str(README), "exec"), scope)
    result = scope["result"]
    assert result.method == "mnp" and all(0 <= u < len(result.scores) for u in result.pruned)
    assert 0.5 < scope["evaluate"](result.model, x_defense, y_defense)["acc"] <= 1  # MNP keeps the clean accuracy
