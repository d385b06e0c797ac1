import subprocess
import sys
from pathlib import Path

import pytest

from onp_env.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_attack_prints_the_artifact_path_and_inspect_shows_metrics(tmp_path, capsys):
    args = [
        "attack",
        "--config",
        str(ROOT / "configs/attack/badnets-digits.yaml"),
        "--set",
        "train.epochs=2",
        "--set",
        "model.kwargs={hidden: 16}",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(args) == 0
    path = capsys.readouterr().out.strip()
    assert Path(path).parent == tmp_path and (Path(path) / "manifest.json").is_file()
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "badnets all-to-one -> 0" in out and "ASR" in out and "(verified)" in out
    assert '"pattern": "checker"' in out
    assert main(["inspect", path, "--json"]) == 0
    assert '"defense_indices": "<70 indices>"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attack", "--config", "nope.yaml"], "config file nope.yaml not found"),
        (
            ["attack", "--config", str(ROOT / "configs/attack/badnets-digits.yaml"), "--set", "data.name=svhn"],
            "unknown dataset 'svhn'",
        ),
        (
            ["attack", "--config", str(ROOT / "configs/attack/badnets-digits.yaml"), "--set", "model.name=vit"],
            "unknown model 'vit'",
        ),
        (
            ["attack", "--config", str(ROOT / "configs/attack/badnets-digits.yaml"), "--set", "attack.name=lira"],
            "unknown attack 'lira'",
        ),
        (
            ["attack", "--config", str(ROOT / "configs/attack/badnets-digits.yaml"), "--set", "attack.target=12"],
            "target label 12 out of range",
        ),
        (
            ["attack", "--config", str(ROOT / "configs/attack/badnets-digits.yaml"), "--set", "attack.poison_rate=1.2"],
            r"poison_rate must be > 0 and < 1",
        ),
        (
            [
                "attack",
                "--config",
                str(ROOT / "configs/attack/badnets-digits.yaml"),
                "--set",
                "data.defense_fraction=0.001",
            ],
            "leaves class",
        ),
        (["inspect", "/nonexistent/artifact"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path)] if args[0] == "attack" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("onp: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "onp_env.cli", "attack", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout


def test_defend_prints_a_clean_models_fine_tuned_line_and_where_it_is(tmp_path, capsys):
    import dataclasses

    from onp_env import build_artifact

    from .conftest import tiny_config

    art = build_artifact(dataclasses.replace(tiny_config(), attack=None), tmp_path / "zoo", progress=False)
    out = tmp_path / "fp"
    assert (
        main(["defend", "--method", "fp", "--artifact", str(art), "--out", str(out), "--set", "finetune_epochs=1"]) == 0
    )
    tuned = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("tuned")]
    assert len(tuned) == 1 and "ASR n/a" in tuned[0] and "DER None" in tuned[0] and str(out / "finetuned") in tuned[0]


def test_defend_writes_a_pruned_artifact_and_report(tmp_path, capsys):
    import json

    from onp_env import load_artifact
    from onp_env.zoo import default_artifact

    art = default_artifact()
    out = tmp_path / "fp"
    assert (
        main(["defend", "--method", "fp", "--artifact", str(art), "--out", str(out), "--set", "finetune_epochs=1"]) == 0
    )
    assert "ACC" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {"method", "acc", "asr", "ra", "der", "pruned", "seconds", "before", "finetuned"} <= set(report)
    assert report["method"] == "fp" and report["pruned"] == len(load_artifact(out).manifest["defense"]["pruned_units"])
    assert load_artifact(out / "finetuned").metrics["acc"] == report["finetuned"]["acc"]
    assert main(["defend", "--method", "clp", "--artifact", str(art), "--out", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["defend", "--method", "anp", "--artifact", str(art), "--out", str(tmp_path / "x"),
                 "--set", "defense_fraction=0.5"]) == 2  # fmt: skip
    assert "defense_fraction must be in (0, 0.05]" in capsys.readouterr().err
    quick = ["--set", "unlearn_epochs=1", "--set", "recover_epochs=1", "--set", "defense_fraction=0.03", "--json"]
    rnp = ["defend", "--method", "rnp", "--artifact", str(art), "--out", str(tmp_path / "y")]
    assert main(rnp + quick) == 0
    assert json.loads(capsys.readouterr().out)["defense_images"] < 70
